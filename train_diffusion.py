"""Train the diffusion probe on latents: ``composer train_diffusion.py yamls/diffusion/<name>.yaml [key=value ...]``."""

import sys

from eqvae_composer.cli import run_cli
from eqvae_composer.diffusion.train import train_from_yaml


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ('-h', '--help'):
        sys.exit(__doc__)
    train_from_yaml(sys.argv[1], sys.argv[2:])


if __name__ == '__main__':
    run_cli(main)
