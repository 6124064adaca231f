"""Eval throughput (images/s) of ``evaluate`` for the demo model at 256 px, on random images.

    python scripts/bench_eval.py [--metrics psnr,ssim,equivariance] [--num-images 32] [--batch-size 8]

The demo architecture comes from yamls/demo.yaml (``model.vae.config``), randomly initialised:
throughput does not depend on the weights. Data loading is excluded (images are in memory).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch
from omegaconf import OmegaConf

from eqvae_composer.checkpoints import load_autoencoder
from eqvae_composer.evaluation import EvalProtocol, evaluate


class _RandomImages(torch.utils.data.Dataset):
    def __init__(self, count: int, resolution: int) -> None:
        self.images = torch.rand(count, 3, resolution, resolution, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {'image': self.images[index]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', default='yamls/demo.yaml')
    parser.add_argument('--metrics', default='psnr,ssim,equivariance')
    parser.add_argument('--num-images', type=int, default=32)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--resolution', type=int, default=256)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args(argv)
    config = OmegaConf.to_container(OmegaConf.load(args.config).model.vae.config, resolve=False)
    config['sample_size'] = args.resolution  # the demo interpolates its own resolution here
    vae = load_autoencoder(config)
    dataset = _RandomImages(args.num_images, args.resolution)
    metrics = args.metrics.split(',')
    evaluate(
        vae,
        dataset,
        metrics,
        EvalProtocol(args.resolution),
        num_images=args.batch_size,
        batch_size=args.batch_size,
        device=args.device,
        progress=False,
    )  # warm-up
    result = evaluate(
        vae,
        dataset,
        metrics,
        EvalProtocol(args.resolution),
        batch_size=args.batch_size,
        device=args.device,
        progress=False,
    )
    summary = {
        'images_per_second': result['images_per_second'],
        'resolution': args.resolution,
        'metrics': metrics,
        'batch_size': args.batch_size,
        'num_images': args.num_images,
        'device': args.device,
        'threads': torch.get_num_threads(),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == '__main__':
    sys.exit(main())
