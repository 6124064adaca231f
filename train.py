"""Fine-tune an AutoencoderKL with EQ-VAE: ``composer train.py yamls/<name>.yaml [key=value ...]``."""

import sys

from eqvae_composer.cli import run_cli
from eqvae_composer.train import train_from_yaml


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ('-h', '--help'):
        sys.exit(__doc__)
    train_from_yaml(sys.argv[1], sys.argv[2:])


if __name__ == '__main__':
    run_cli(main)
