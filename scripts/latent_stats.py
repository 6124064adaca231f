"""Measure an autoencoder's latent mean and std and print the ``scaling_factor`` / ``shift_factor`` to use.

    python scripts/latent_stats.py --vae exported/eq-vae --data data/demo/val --num-images 1000
    python scripts/latent_stats.py --vae exported/eq-vae --data data/demo/val --write-config exported/eq-vae

Default: posterior samples, all channels pooled; ``scaling_factor = 1/std`` (LDM's scale_by_std),
``shift_factor = mean``. ``--mode`` measures posterior means instead.
"""

from __future__ import annotations

import argparse

import torch

from eqvae_composer.checkpoints import (
    image_loader,
    latent_statistics,
    load_autoencoder,
    set_latent_factors,
)
from eqvae_composer.cli import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--vae', required=True, help='anything load_autoencoder accepts (folder, file, hub id)')
    parser.add_argument('--subfolder', help='subfolder of --vae, e.g. vae')
    parser.add_argument('--data', required=True, help='MDS dataset folder (index.json) or a folder of images')
    parser.add_argument('--num-images', type=int, default=1000, help='images to encode (default: 1000)')
    parser.add_argument('--resolution', type=int, default=256, help='image side after the eval transform')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--mode', action='store_true', help='posterior means instead of posterior samples')
    parser.add_argument('--no-shift', action='store_true', help='write shift_factor null (SD-v1-style latents)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the posterior samples')
    parser.add_argument('--write-config', metavar='DIR', help='diffusers folder whose config.json gets the factors')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    vae = load_autoencoder(args.vae, subfolder=args.subfolder)
    if torch.cuda.is_available():
        vae = vae.cuda()
    stats = latent_statistics(
        vae,
        image_loader(args.data, args.resolution, args.batch_size),
        num_images=args.num_images,
        sample_posterior=not args.mode,
        generator=torch.Generator(next(vae.parameters()).device).manual_seed(args.seed),
    )
    print(stats.summary())
    if args.write_config:
        set_latent_factors(args.write_config, stats.scaling_factor, None if args.no_shift else stats.shift_factor)
        print(f'Wrote the factors into {args.write_config}/config.json')


if __name__ == '__main__':
    run_cli(main, extra_errors=(ValueError,))  # latent_statistics' ValueErrors: empty data, zero spread
