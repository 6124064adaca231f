"""Sample a trained diffusion probe and score it: gFID (Inception, offline-safe) and SWD against held-out images.

    python scripts/eval_diffusion.py yamls/diffusion/sit-b2.yaml --checkpoint runs/.../ep0-ba400000-rank0.pt \\
        --references data/imagenet/val --num-samples 50000 --out runs/sit-b2/quality.json

The YAML is the run's (the network and objective to rebuild); the checkpoint's model weights are the EMA's
when the run had EMA (Composer swaps them in to save). Samples are decoded with the VAE ``latents.json``
records (``--vae`` to read it elsewhere). References take the eval transform (resize + centre crop).
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from eqvae_composer.checkpoints import image_loader
from eqvae_composer.cli import run_cli
from eqvae_composer.diffusion.quality import generate_latents, sample_quality
from eqvae_composer.diffusion.train import build_model, load_config
from eqvae_composer.diffusion.vae import LatentDecoder, latent_metadata
from eqvae_composer.evaluation.fid import load_inception


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help="the run's YAML (train_diffusion.py's)")
    parser.add_argument('overrides', nargs='*', help='key=value overrides of the YAML')
    parser.add_argument('--checkpoint', required=True, help='a Composer checkpoint of the run (.pt)')
    parser.add_argument('--references', required=True, help='held-out images: MDS folder/URL or image folder')
    parser.add_argument('--num-samples', type=int, default=10000, help='generated images (default: 10000)')
    parser.add_argument('--num-references', type=int, default=None, help='reference images (default: all)')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--guidance-scale', type=float, default=1.0, help='CFG scale; 1: none (default)')
    parser.add_argument('--num-steps', type=int, default=250, help='sampler steps (default: 250)')
    parser.add_argument('--sampler', help='euler/heun (flow) or ddpm/ddim (ddpm); default heun / ddpm')
    parser.add_argument('--swd-images', type=int, default=2048, help='images per set for SWD (default: 2048)')
    parser.add_argument('--inception-weights', help='the Inception file or its folder (default: torch hub cache)')
    parser.add_argument('--vae', help="a diffusers folder to decode with instead of latents.json's vae.source")
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', help='write the metrics here as JSON')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    inception = load_inception(args.inception_weights)  # before any sampling: a missing file is a one-line error
    metadata = latent_metadata(cfg.train_loader.dataset['local'])
    latent_shape = tuple(metadata['latent_shape'])
    model = build_model(cfg, latent_shape)
    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f'--checkpoint {args.checkpoint} does not exist.')
    state = torch.load(args.checkpoint, map_location='cpu', weights_only=False)['state']['model']
    model.load_state_dict(state)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    model.to(device)
    decoder = LatentDecoder(metadata, args.vae).to(device)
    resolution = int(metadata['preprocessing']['resolution'])

    def samples():
        for latents in generate_latents(
            model,
            latent_shape,
            args.num_samples,
            args.batch_size,
            args.guidance_scale,
            args.num_steps,
            args.sampler,
            args.seed,
        ):
            yield decoder(latents.float()).cpu()

    def references():
        seen = 0
        for batch in image_loader(args.references, resolution, args.batch_size):
            if args.num_references is not None and seen >= args.num_references:
                return
            seen += len(batch['image'])
            yield batch['image']

    inception.to(device)
    metrics = sample_quality(samples(), references(), inception, swd_images=args.swd_images, swd_seed=args.seed)
    print(json.dumps(metrics, indent=2))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump({'metrics': metrics, 'args': vars(args)}, f, indent=2)


if __name__ == '__main__':
    run_cli(main)
