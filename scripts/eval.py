"""Evaluate an autoencoder with the paper's protocol: rFID, PSNR, SSIM, LPIPS, latent equivariance error.

    python scripts/eval.py --vae PATH --data MDS_OR_IMAGE_FOLDER --out results.json
    composer -n 8 scripts/eval.py --vae PATH --data DATA --out results.json   # same numbers, 8x faster
    composer -n 8 scripts/eval.py --protocol reference --vae PATH --data IMAGENET_VAL_FOLDER --out ref.json

``--protocol reference`` measures as the reference's eval.py does, for numbers to set beside the
paper's table (docs/REFERENCE_EVAL.md). Weights for rFID (Inception) and LPIPS (VGG16) are resolved
before anything else is loaded; offline and missing, the run stops with the file name and where to put it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import torch
from composer.devices import DeviceCPU, DeviceGPU
from composer.utils import dist

from eqvae_composer.checkpoints import load_autoencoder
from eqvae_composer.cli import run_cli
from eqvae_composer.evaluation import (
    ALL_METRICS,
    DEFAULT_METRICS,
    PROTOCOLS,
    REFERENCE_METRICS,
    EvalProtocol,
    build_eval_dataset,
    evaluate,
    format_markdown,
    load_inception,
    load_reference_inception,
)
from eqvae_composer.introspection import adapter_for
from eqvae_composer.models.lpips import load_lpips
from eqvae_composer.weights import MissingWeightsError


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--vae', required=True, help='diffusers folder, checkpoint file or hub id')
    parser.add_argument('--subfolder', default=None, help="subfolder of --vae, e.g. 'vae'")
    parser.add_argument('--data', required=True, help='MDS folder/URL (with index.json) or an image folder')
    parser.add_argument('--out', required=True, help='results JSON')
    parser.add_argument(
        '--protocol',
        choices=PROTOCOLS,
        default='default',
        help="'reference': the reference eval.py's preprocessing, sharding, quantization and "
        'averaging, and pytorch-fid (image folders with class subfolders only)',
    )
    parser.add_argument(
        '--metrics',
        default=None,
        help=f'comma list from {",".join(ALL_METRICS)} (default: {",".join(DEFAULT_METRICS)}, and codebook '
        f'for a VQModel; with --protocol reference {",".join(REFERENCE_METRICS)}, all it can measure)',
    )
    parser.add_argument('--num-images', type=int, default=None, help='first N images (default: all)')
    parser.add_argument('--batch-size', type=int, default=16, help='per process')
    parser.add_argument('--resolution', type=int, default=256)
    latent = parser.add_mutually_exclusive_group()
    latent.add_argument('--sample', dest='sample', action='store_true', default=True, help='z ~ q(z|x) (default)')
    latent.add_argument('--mode', dest='sample', action='store_false', help='z = mode of q(z|x)')
    parser.add_argument('--seed', type=int, default=0, help='seeds the per-image posterior noise')
    parser.add_argument(
        '--inception-weights',
        default=None,
        help="Inception weight file or folder (rFID): torch-fidelity's, or pytorch-fid's with --protocol reference",
    )
    parser.add_argument('--lpips-weights', default=None, help='VGG16 weight file or folder (LPIPS)')
    parser.add_argument('--device', default=None, help="'cpu' or 'gpu' (default: gpu when available)")
    parser.add_argument('--num-workers', type=int, default=0)
    parser.add_argument('--no-progress', action='store_true')
    parser.add_argument(
        '--save-images',
        default=None,
        metavar='DIR',
        help='with --protocol reference: also write its PNG folders DIR/ref_images and DIR/decoded_images',
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    reference = args.protocol == 'reference'
    if args.save_images is not None and not reference:
        print('error: --save-images writes the PNG folders of --protocol reference; add it.', file=sys.stderr)
        return 2
    default_metrics = REFERENCE_METRICS if reference else DEFAULT_METRICS
    metrics = [m.strip() for m in (args.metrics or ','.join(default_metrics)).split(',') if m.strip()]
    known = REFERENCE_METRICS if reference else ALL_METRICS
    unknown = sorted(set(metrics) - set(known))
    if unknown:
        print(
            f'error: metrics {unknown} are not in --protocol {args.protocol}; choose from {",".join(known)}',
            file=sys.stderr,
        )
        return 2
    # Weights first: a missing file must stop the run before the VAE and data are loaded.
    try:
        load_fid_network = load_reference_inception if reference else load_inception
        inception = load_fid_network(args.inception_weights) if 'rfid' in metrics else None
        lpips_net = load_lpips(args.lpips_weights) if 'lpips' in metrics else None
    except MissingWeightsError as error:
        hint = 'Pass the file with --inception-weights / --lpips-weights, or leave rfid/lpips out of --metrics.'
        raise MissingWeightsError(f'{error} {hint}') from None
    use_gpu = args.device == 'gpu' or (args.device is None and torch.cuda.is_available())
    device = DeviceGPU() if use_gpu else DeviceCPU()
    dist.initialize_dist(device)
    # DeviceGPU made this rank's GPU (its local rank) the current one.
    torch_device = torch.device('cuda', torch.cuda.current_device()) if use_gpu else torch.device('cpu')
    vae = load_autoencoder(args.vae, subfolder=args.subfolder)
    if args.metrics is None and not reference and adapter_for(vae).codes is not None:
        metrics.append('codebook')  # a vector-quantized autoencoder's codebook usage
    dataset = build_eval_dataset(args.data, args.resolution, protocol=args.protocol)
    protocol = EvalProtocol(args.resolution, sample_posterior=args.sample, seed=args.seed, name=args.protocol)
    results = evaluate(
        vae,
        dataset,
        metrics,
        protocol,
        num_images=args.num_images,
        batch_size=args.batch_size,
        inception=inception,
        lpips_net=lpips_net,
        device=torch_device,
        num_workers=args.num_workers,
        progress=not args.no_progress,
        image_dir=args.save_images,
    )
    if dist.get_global_rank() == 0:
        results = {'vae': str(args.vae), 'data': str(args.data), **results}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, 'w') as f:
            json.dump(results, f, indent=2)
        print(format_markdown(results, name=os.path.basename(os.path.normpath(str(args.vae)))))
    return 0


if __name__ == '__main__':
    run_cli(main)
