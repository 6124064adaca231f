"""Hand our MDS latents to another latent-diffusion codebase, in the layout its loader reads.

    python scripts/export_latents.py fast-dit     data/latents/train  features/            # fast-DiT --feature-path
    python scripts/export_latents.py repa         data/latents/train  data/repa-imagenet/  # REPA --data-dir
    python scripts/export_latents.py lightningdit data/latents/train  data/lightningdit/   # LightningDiT data_path

DiT and SiT encode images in every training step and read no latents: fast-DiT is DiT's code with a
latent loader, REPA SiT's. ``handoff.json`` in the output says the scaling to set on their side.
"""

from __future__ import annotations

import argparse

from eqvae_composer.cli import run_cli
from eqvae_composer.diffusion.handoff import TARGETS, export_latents


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('target', choices=sorted(TARGETS))
    parser.add_argument('latents', help='a folder written by scripts/encode_latents.py')
    parser.add_argument('out', help='the output folder')
    parser.add_argument('--images', help='repa: the images the latents came from (default: latents.json input.data)')
    parser.add_argument('--seed', type=int, default=0, help='fast-dit, lightningdit: seed of the posterior samples')
    parser.add_argument('--mean', action='store_true', help='fast-dit, lightningdit: the posterior mean, no sample')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.target == 'repa':
        kwargs = {'images': args.images}
    else:
        kwargs = {'seed': args.seed, 'sample_posterior': not args.mean}
    count = export_latents(args.target, args.latents, args.out, **kwargs)
    print(f'Wrote {count} samples for {args.target} to {args.out} (see {args.out}/handoff.json)')


if __name__ == '__main__':
    run_cli(main, extra_errors=(ValueError,))
