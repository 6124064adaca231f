"""How diffusable a VAE's latents look, without training a diffusion model: one JSON and one PNG.

    python scripts/diffusability_report.py --vae exported/eq-vae --data data/imagenet/val --num-images 1000 \\
        --out runs/report-eq-vae

For ``--num-images`` images (eval transform) and their latents (the posterior mode), it writes
``report.json`` and ``report.png`` with: the radially averaged power spectrum of the images and of
the latents and each one's high-frequency share (Skorokhodov et al. 2025), per-channel statistics of
the latents as diffusion sees them (``(z - shift_factor) * scaling_factor``), the latent equivariance
errors R and S (paper App. C.3, as ``scripts/eval.py`` measures them) and the TwoNN intrinsic dimension.
Run it for two VAEs to compare them.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from eqvae_composer.checkpoints import image_loader, load_autoencoder
from eqvae_composer.cli import run_cli
from eqvae_composer.diffusion.proxies import (
    channel_statistics,
    high_frequency_share,
    plot_report,
    radial_power_spectrum,
)
from eqvae_composer.evaluation.intrinsic_dim import twonn_dimension
from eqvae_composer.evaluation.metrics import equivariance_errors, eval_transforms
from eqvae_composer.introspection import adapter_for, vae_downsample_factor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--vae', required=True, help='anything load_autoencoder accepts (folder, file, hub id)')
    parser.add_argument('--subfolder', help='subfolder of --vae, e.g. vae')
    parser.add_argument('--data', required=True, help='MDS dataset folder (index.json) or a folder of images')
    parser.add_argument('--num-images', type=int, default=1000, help='images to measure (default: 1000)')
    parser.add_argument('--resolution', type=int, default=256, help='image side after the eval transform')
    parser.add_argument('--batch-size', type=int, default=16)
    parser.add_argument('--out', required=True, help='folder for report.json and report.png')
    return parser.parse_args(argv)


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    vae = load_autoencoder(args.vae, subfolder=args.subfolder).eval()
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    vae.to(device)
    adapter, factor = adapter_for(vae), vae_downsample_factor(vae)
    scale = float(vae.config.get('scaling_factor') or 1.0)
    shift = float(vae.config.get('shift_factor') or 0.0)
    images, latents, errors = [], [], {kind: [] for kind in eval_transforms()}
    seen = 0
    for batch in image_loader(args.data, args.resolution, args.batch_size):
        x = batch['image'][: args.num_images - seen].to(device)
        z = adapter.encode(vae, x)
        for kind, taus in eval_transforms().items():
            errors[kind].append(equivariance_errors(lambda im: adapter.encode(vae, im), x, taus, factor, z).cpu())
        images.append(x.cpu())
        latents.append(z.float().cpu())
        seen += len(x)
        if seen >= args.num_images:
            break
    if seen < 3:
        raise ValueError(f'{args.data} gave {seen} images: the report needs at least 3.')
    images_all, latents_all = torch.cat(images), (torch.cat(latents) - shift) * scale
    spectrum = {}
    for name, x in (('images', images_all), ('latents', latents_all)):
        frequency, power = radial_power_spectrum(x)
        spectrum[name] = {
            'frequency': frequency.tolist(),
            'power': power.tolist(),
            'high_frequency_share': high_frequency_share(x),
        }
    report = {
        'title': f'{os.path.basename(os.path.normpath(args.vae))}: {seen} images',
        'vae': args.vae,
        'data': args.data,
        'num_images': seen,
        'resolution': args.resolution,
        'latent_shape': list(latents_all.shape[1:]),
        'spectrum': spectrum,
        'channels': channel_statistics(latents_all),
        'equivariance': {kind: float(torch.cat(e, dim=1).mean()) for kind, e in errors.items()},
        'intrinsic_dimension': twonn_dimension(latents_all.flatten(1)),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'report.json'), 'w') as f:
        json.dump(report, f, indent=2)
    plot_report(report, os.path.join(args.out, 'report.png'))
    hf = {name: round(s['high_frequency_share'], 4) for name, s in spectrum.items()}
    print(f'high-frequency share {hf}; equivariance {report["equivariance"]}; ID {report["intrinsic_dimension"]:.1f}')
    print(f'Wrote {args.out}/report.json and report.png')


if __name__ == '__main__':
    run_cli(main, extra_errors=(ValueError,))
