"""The latent of one image as a picture: input | first three principal components of E(x) as RGB.

python scripts/vis_latent.py --vae PATH --image photo.jpg --out latent.png
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from torchvision.utils import save_image

from eqvae_composer.checkpoints import load_autoencoder
from eqvae_composer.cli import run_cli
from eqvae_composer.evaluation import image_rows, latent_pca_rgb, load_eval_image, upsample_nearest


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--vae', required=True, help='diffusers folder, checkpoint file or hub id')
    parser.add_argument('--subfolder', default=None, help="subfolder of --vae, e.g. 'vae'")
    parser.add_argument('--image', required=True, help='an image file')
    parser.add_argument('--out', required=True, help='PNG to write')
    parser.add_argument('--resolution', type=int, default=256, help='resize shorter side + center crop')
    return parser.parse_args(argv)


@torch.no_grad()
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    vae = load_autoencoder(args.vae, subfolder=args.subfolder).eval()
    image = load_eval_image(args.image, args.resolution)[None]
    latents = vae.encode(image).latent_dist.mode()
    size = image.shape[-2:]
    pca = upsample_nearest(latent_pca_rgb(latents), size) * 2 - 1  # image_rows takes [-1, 1]
    save_image(image_rows([image, pca], size), args.out)
    print(f'wrote {args.out} (latent {tuple(latents.shape[1:])})')
    return 0


if __name__ == '__main__':
    run_cli(main)
