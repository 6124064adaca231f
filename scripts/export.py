"""Export an autoencoder as a diffusers folder and/or an LDM-format file.

    python scripts/export.py --checkpoint runs/eqvae/latest-rank0.pt --out exported/eq-vae
    python scripts/export.py --checkpoint runs/eqvae/latest-rank0.pt --out exported/eq-vae --ldm exported/eq-vae.ckpt
    python scripts/export.py --checkpoint runs/eqvae-sdvae-fsdp/checkpoints/ep0-ba2000 --out exported/eq-vae  # FSDP
    python scripts/export.py --checkpoint model.ckpt --out sd-vae            # LDM .ckpt -> diffusers
    python scripts/export.py --checkpoint vqgan_imagenet_f16_16384/checkpoints/last.ckpt --out vqgan-f16  # taming VQGAN
    python scripts/export.py --checkpoint runs/eqvae-vq/latest-rank0.pt --ldm eq-vqgan.ckpt   # VQModel -> taming keys

``--checkpoint`` is a Composer checkpoint of this project (EMA weights when the run used EMA,
``--raw`` for the training weights): a file, or with ``fsdp.state_dict_type: sharded`` the
checkpoint folder (or ``latest-rank0.pt``, which links to it), read in this one process; or anything
``load_autoencoder`` accepts (diffusers folder, hub id, LDM ``.ckpt`` / ``.safetensors``, a taming-transformers
VQGAN ``.ckpt``, bare state dict). ``--ldm`` writes a ``VQModel`` with taming's VQGAN key names.
"""

from __future__ import annotations

import argparse

from eqvae_composer.checkpoints import (
    export_diffusers,
    export_ldm,
    image_loader,
    latent_statistics,
    load_for_export,
    set_latent_factors,
)
from eqvae_composer.cli import run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        '--checkpoint',
        required=True,
        help='Composer checkpoint (file or sharded folder), LDM file, diffusers folder or hub id',
    )
    parser.add_argument('--out', help='diffusers folder to write (config.json + safetensors)')
    parser.add_argument(
        '--ldm',
        help='LDM-format file to write (taming VQGAN keys for a VQModel): .ckpt ({"state_dict": ...}) or .safetensors',
    )
    parser.add_argument('--ldm-prefix', action='store_true', help='prefix LDM keys with first_stage_model.')
    parser.add_argument('--raw', action='store_true', help='export the raw training weights, not the EMA ones')
    parser.add_argument(
        '--config',
        help='architecture: diffusers folder, config.json or hub id (default: recorded '
        'in the Composer checkpoint, else the SD-VAE config)',
    )
    parser.add_argument('--subfolder', help='subfolder of --checkpoint or --config, e.g. vae')
    parser.add_argument(
        '--latent-stats',
        metavar='DATA',
        help='MDS or image folder: measure the latent scale and write scaling_factor/shift_factor into --out',
    )
    parser.add_argument('--num-images', type=int, default=1000, help='images for --latent-stats (default: 1000)')
    parser.add_argument('--resolution', type=int, default=256, help='image side for --latent-stats (default: 256)')
    args = parser.parse_args(argv)
    if not args.out and not args.ldm:
        parser.error('nothing to write: pass --out and/or --ldm.')
    if args.latent_stats and not args.out:
        parser.error('--latent-stats writes into the diffusers config: pass --out.')
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    vae, weights = load_for_export(args.checkpoint, config=args.config, subfolder=args.subfolder, ema=not args.raw)
    what = {'EMA': 'the EMA weights', 'raw': 'the raw training weights', 'stored': 'the weights'}[weights]
    if weights == 'raw' and not args.raw:
        what += ' (the run used no EMA)'
    if args.out:
        export_diffusers(vae, args.out)
        print(f'Exported {what} of {args.checkpoint} as a diffusers folder: {args.out}')
    if args.ldm:
        export_ldm(vae, args.ldm, prefix=args.ldm_prefix)
        print(f'Exported {what} of {args.checkpoint} as an LDM file: {args.ldm}')
    if args.latent_stats:
        stats = latent_statistics(vae, image_loader(args.latent_stats, args.resolution), num_images=args.num_images)
        print(stats.summary())
        set_latent_factors(args.out, stats.scaling_factor, stats.shift_factor)
        print(f'Wrote scaling_factor and shift_factor into {args.out}/config.json')


if __name__ == '__main__':
    run_cli(main)
