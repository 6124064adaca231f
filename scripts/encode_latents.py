"""Encode an image dataset with a (fine-tuned) VAE into an MDS dataset of latents for diffusion training.

    python scripts/encode_latents.py --vae runs/eqvae/vae --data mds/train --out mds/latents-train --resolution 256
    composer -n 8 scripts/encode_latents.py --vae runs/eqvae/vae --data s3://bucket/imagenet/train \\
        --out /data/latents-train --flip          # 8 ranks, each its parts; rank 0 merges the index

Images are centre-cropped as DiT/ADM do, encoded, and the posterior's mean and std (or one sample)
stored in fp16/bf16, with the label when the input has one. ``--resolution`` must be a multiple of the
VAE's downsampling factor (8 for SD-VAE, 4 for kl-f4, 16 for kl-f16). One input differs from what DiT's
``ImageFolder`` loader sees, as it ignores the EXIF orientation tag: ``convert_dataset.py`` stores
EXIF-rotated photos upright, so their latents are of the upright photo (an image folder given as
``--data`` is read unrotated, as DiT reads it). ``latents.json`` beside the index records
the VAE (source, weights' sha256, ``scaling_factor``/``shift_factor``) and the preprocessing.
Killed, the same command resumes; unreadable images are listed in ``skipped.jsonl``, not fatal.
Read the output with ``eqvae_composer.latents.StreamingLatentDataset``.
"""

from __future__ import annotations

import argparse

from eqvae_composer.cli import run_cli
from eqvae_composer.data.parts import OutputExistsError
from eqvae_composer.latents import EncodeOptions, encode_latents, format_summary
from eqvae_composer.latents.encode import COMPUTE_DTYPES, NothingEncodedError, ShardReadError
from eqvae_composer.latents.preprocess import CROPS
from eqvae_composer.latents.storage import DTYPES, STORES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--vae', required=True, help='diffusers folder, LDM .ckpt/.safetensors, Composer checkpoint')
    parser.add_argument('--data', required=True, help='image MDS folder or URL (s3://...), or an image folder')
    parser.add_argument('--out', required=True, help='local output folder, shared across nodes (MDS of latents)')
    parser.add_argument('--resolution', type=int, default=256, help='image side after the crop (default: 256)')
    parser.add_argument('--crop', choices=CROPS, default='adm', help="preprocessing (default: adm, DiT's)")
    parser.add_argument('--store', choices=list(STORES), default='mean_std', help='what to keep (default: mean_std)')
    parser.add_argument('--dtype', choices=list(DTYPES), default='float16', help='stored dtype (default: float16)')
    parser.add_argument('--flip', action='store_true', help='also store the latents of the flipped images')
    parser.add_argument('--batch-size', type=int, default=32, help='images per encoder call (default: 32)')
    parser.add_argument('--part-size', type=int, default=1024, help='samples per resumable part (default: 1024)')
    parser.add_argument('--seed', type=int, default=0, help='noise seed of --store sample (default: 0)')
    parser.add_argument('--limit', type=int, help='encode only the first N samples')
    parser.add_argument('--device', help="torch device (default: this rank's GPU, else cpu)")
    parser.add_argument(
        '--compute-dtype', choices=COMPUTE_DTYPES, default='float32', help='encoder precision (default: float32)'
    )
    parser.add_argument('--channels-last', action='store_true', help='NHWC encoder (faster convolutions on CPU)')
    parser.add_argument('--local', help='cache folder for a remote --data')
    parser.add_argument('--image-column', help='MDS column with the image (default: found)')
    parser.add_argument('--label-column', help='MDS column with the label (default: found, if any)')
    parser.add_argument('--overwrite', action='store_true', help='delete an existing --out first')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = EncodeOptions(
        resolution=args.resolution,
        crop=args.crop,
        store=args.store,
        dtype=args.dtype,
        flip=args.flip,
        batch_size=args.batch_size,
        part_size=args.part_size,
        seed=args.seed,
        limit=args.limit,
        device=args.device,
        compute_dtype=args.compute_dtype,
        channels_last=args.channels_last,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    summary = encode_latents(
        args.vae,
        args.data,
        args.out,
        options,
        local=args.local,
        image_column=args.image_column,
        label_column=args.label_column,
    )
    if summary.rank == 0:
        print(format_summary(summary))
    return 0


if __name__ == '__main__':
    run_cli(main, extra_errors=(OutputExistsError, NothingEncodedError, ShardReadError, ValueError, KeyError))
