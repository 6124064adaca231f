"""Fine-tune an AutoencoderKL with EQ-VAE: ``composer train.py yamls/<name>.yaml [key=value ...]``."""

import sys

from eqvae_composer.train import ConfigError, train_from_yaml

if __name__ == '__main__':
    if len(sys.argv) < 2 or sys.argv[1] in ('-h', '--help'):
        sys.exit(__doc__)
    try:
        train_from_yaml(sys.argv[1], sys.argv[2:])
    except (ConfigError, FileNotFoundError) as error:
        sys.exit(f'error: {error}')
