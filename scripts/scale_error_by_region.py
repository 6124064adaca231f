"""Where in the latent a scale's equivariance error sits: the border ring of cells against the interior.

At 128 px an f8 latent is 16x16 and scale 0.25 leaves 4x4, of which 12 cells are on the border:
E(tau(x)) there mostly sees the encoder's zero padding, and tau(E(x)) is a bilinear resize whose
outer cells interpolate towards the edge. This splits ``||tau(E(x)) - E(tau(x))||^2 / ||E(tau(x))||^2``
into the border ring and the interior (each region normalised by its own ``||E(tau(x))||^2``), per
evaluation scale, for models trained by ``scripts/replicate.py``:

    python scripts/scale_error_by_region.py --runs runs/replicate --resolution 128 256
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch

from eqvae_composer.algorithms.equivariance.transforms import SpatialTransform
from eqvae_composer.checkpoints import load_autoencoder
from eqvae_composer.cli import run_cli
from eqvae_composer.evaluation import build_eval_dataset
from eqvae_composer.evaluation.datasets import dataset_size
from eqvae_composer.evaluation.metrics import EVAL_SCALES, transformed_latent_pairs
from eqvae_composer.introspection import vae_downsample_factor

DEFAULT_MODELS = ('base', 'control-s17', 'control-s18', 'eq-s17', 'eq-s18', 'eq-discrete-s17', 'eq-discrete-s18')


def border_mask(height: int, width: int, ring: int) -> torch.Tensor:
    """``(height, width)`` bool, True on the outer ``ring`` cells of every side."""
    mask = torch.ones(height, width, dtype=torch.bool)
    mask[ring : height - ring, ring : width - ring] = False
    return mask


def region_errors(transformed: torch.Tensor, target: torch.Tensor, ring: int) -> dict[str, torch.Tensor]:
    """Per image: the error over all cells, the border ring, the interior, and the border's share of the error."""
    squared_diff = (transformed - target).pow(2).sum(1)  # (B, h, w): summed over channels
    squared_target = target.pow(2).sum(1)
    border = border_mask(*squared_diff.shape[-2:], ring)

    def error(cells: torch.Tensor) -> torch.Tensor:
        return squared_diff[:, cells].sum(1) / squared_target[:, cells].sum(1).clamp_min(1e-12)

    total_diff = squared_diff.flatten(1).sum(1).clamp_min(1e-12)
    return {
        'all': error(torch.ones_like(border)),
        'border': error(border),
        'interior': error(~border) if (~border).any() else torch.full_like(total_diff, float('nan')),
        'border_share': squared_diff[:, border].sum(1) / total_diff,
    }


@torch.inference_mode()
def measure(vae_folder: str, val: str, resolution: int, ring: int, num_images: int) -> dict[float, dict[str, float]]:
    """``{scale: {region: mean over held-out images}}`` for one exported VAE."""
    vae = load_autoencoder(vae_folder).eval()
    dataset = build_eval_dataset(val, resolution)
    seen = min(num_images, dataset_size(dataset))
    images = torch.stack([dataset[i]['image'] for i in range(seen)])
    taus = [SpatialTransform(s, s) for s in EVAL_SCALES]
    sums: dict[float, dict[str, float]] = {s: {} for s in EVAL_SCALES}
    for batch in images.split(24):
        pairs = transformed_latent_pairs(
            lambda x: vae.encode(x).latent_dist.mode(), batch, taus, vae_downsample_factor(vae)
        )
        for scale, (transformed, target) in zip(EVAL_SCALES, pairs):
            for region, values in region_errors(transformed, target, ring).items():
                sums[scale][region] = sums[scale].get(region, 0.0) + values.sum().item()
    return {s: {region: total / seen for region, total in regions.items()} for s, regions in sums.items()}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--runs', default='runs/replicate', help='the replicate.py output folder')
    parser.add_argument('--models', nargs='+', default=list(DEFAULT_MODELS), help='its stages to measure')
    parser.add_argument('--resolution', type=int, nargs='+', default=[128, 256])
    parser.add_argument('--ring', type=int, default=1, help='width of the border ring, in latent cells')
    parser.add_argument('--num-images', type=int, default=48)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    val = os.path.join(args.runs, 'data', 'val')
    for resolution in args.resolution:
        print(f'\nAt {resolution} px ({args.ring}-cell border ring); error all / border / interior, border share:\n')
        print('| model | ' + ' | '.join(f'scale {s:g}' for s in EVAL_SCALES) + ' |')
        print('|---|' + '---|' * len(EVAL_SCALES))
        for model in args.models:
            per_scale = measure(
                os.path.join(args.runs, model, 'vae'),  # replicate.py's export_folder
                val,
                resolution,
                args.ring,
                args.num_images,
            )
            cells = [
                f'{r["all"]:.3f} / {r["border"]:.3f} / {r["interior"]:.3f}, {100 * r["border_share"]:.0f}%'
                for r in per_scale.values()
            ]
            print(f'| {model} | ' + ' | '.join(cells) + ' |', flush=True)
    return 0


if __name__ == '__main__':
    run_cli(main)
