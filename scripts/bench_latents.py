"""Latent encoding: scripts/encode_latents.py against the plain loop a user would write, side by side.

    python scripts/bench_latents.py                         # SD-VAE architecture, 128 px, 48 ImageNet-like JPEGs
    python scripts/bench_latents.py --resolution 256 --images 32
    python scripts/bench_latents.py --smoke                 # tiny VAE, a few images: checks the script runs

The plain loop is fast-DiT's ``extract_features.py`` shape: torchvision's ``ImageFolder`` with DiT's
``center_crop_arr`` + ``ToTensor`` + ``Normalize``, a ``DataLoader``, ``vae.encode(x).latent_dist``,
``np.save`` of the fp16 mean and std per batch. Both contenders read the same JPEG files (ours through
the MDS ``convert_dataset.py`` wrote, which keeps their bytes), encode with the same randomly
initialised SD-VAE architecture (weights do not change the time), batch size and torch threads,
and store the same values (checked). Rows at equal process counts come first; a setting that
changes the kernels (channels-last) or the process count (a loader worker) is its own row, applied
to both. Times are medians over repetitions in rotating order; ratios are medians of per-repetition ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_data import alternate, generate  # noqa: E402  (the ImageNet-like images of the data benchmark)
from diffusers import AutoencoderKL  # noqa: E402

from eqvae_composer.checkpoints import SD_VAE_CONFIG  # noqa: E402
from eqvae_composer.data.convert import ConvertOptions, convert  # noqa: E402
from eqvae_composer.latents import EncodeOptions, encode_latents  # noqa: E402
from eqvae_composer.latents.preprocess import center_crop_arr, preprocess_image  # noqa: E402

TINY_CONFIG = {
    **SD_VAE_CONFIG,
    'block_out_channels': [8, 8, 8, 8],
    'norm_num_groups': 4,
    'layers_per_block': 1,
}


def plain_loop(
    images: str,
    vae_dir: str,
    out: str,
    resolution: int,
    batch_size: int,
    workers: int,
    channels_last: bool,
    compute_dtype: str,
) -> None:
    """What a user writes (fast-DiT's extract_features.py, storing the posterior's mean and std)."""
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()  # the whole job, as ours: loading the VAE included
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    transform = transforms.Compose(
        [
            transforms.Lambda(lambda img: center_crop_arr(img, resolution)),
            transforms.ToTensor(),
            transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], inplace=True),
        ]
    )
    loader = torch.utils.data.DataLoader(
        ImageFolder(images, transform=transform), batch_size=batch_size, shuffle=False, num_workers=workers
    )
    os.makedirs(out, exist_ok=True)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    vae.to(memory_format=memory_format)
    with torch.no_grad():
        for step, (x, y) in enumerate(loader):
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=compute_dtype == 'bfloat16'):
                posterior = vae.encode(x.to(memory_format=memory_format)).latent_dist
            np.save(os.path.join(out, f'{step}_mean.npy'), posterior.mean.half().numpy())
            np.save(os.path.join(out, f'{step}_std.npy'), posterior.std.half().numpy())
            np.save(os.path.join(out, f'{step}_label.npy'), y.numpy())


def profile_plain(images: str, vae: AutoencoderKL, resolution: int, batch_size: int, count: int) -> dict[str, float]:
    """Seconds per image of the plain loop's stages, run one after the other (no overlap)."""
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(images) for f in fs)[:count]
    start = time.perf_counter()
    pixels = torch.stack([preprocess_image(Image.open(f), resolution) for f in files])
    decode = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(pixels), batch_size):
            vae.encode(pixels[i : i + batch_size])
    encode = time.perf_counter() - start
    return {'decode + crop': decode / len(files), 'encode': encode / len(files)}


def check_same_values(plain_out: str, ours_out: str) -> float:
    """Largest difference between the two contenders' stored means (fp16): they did the same work."""
    import json

    from streaming.base.format import reader_from_json

    plain = np.concatenate(
        [
            np.load(os.path.join(plain_out, f'{s}_mean.npy'))
            for s in range(len([n for n in os.listdir(plain_out) if n.endswith('_mean.npy')]))
        ]
    )
    with open(os.path.join(ours_out, 'index.json')) as f:
        shards = json.load(f)['shards']
    ours = []
    for shard in shards:
        reader = reader_from_json(ours_out, None, shard)
        ours.extend(reader.get_item(i)['mean'] for i in range(shard['samples']))
    return float(np.abs(plain.astype(np.float32) - np.stack(ours).astype(np.float32)).max())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--images', type=int, default=48, help='ImageNet-like JPEGs (default: 48)')
    parser.add_argument('--resolution', type=int, default=128, help='crop side (default: 128)')
    parser.add_argument('--batch-size', type=int, default=16, help='images per encoder call (default: 16)')
    parser.add_argument('--reps', type=int, default=3, help='repetitions (default: 3)')
    parser.add_argument('--smoke', action='store_true', help='tiny VAE and 8 images, 1 repetition')
    args = parser.parse_args(argv)
    if args.smoke:
        args.images, args.reps, args.resolution, args.batch_size = 8, 1, 32, 4
    torch.manual_seed(0)
    config = TINY_CONFIG if args.smoke else SD_VAE_CONFIG
    work = tempfile.mkdtemp(prefix='bench-latents-')
    try:
        images = os.path.join(work, 'images')
        generate(images, args.images, classes=4)
        images = os.path.join(images, 'train')
        convert('folder', os.path.join(work, 'mds'), input=images, options=ConvertOptions(progress=False))
        vae_dir = os.path.join(work, 'vae')
        AutoencoderKL.from_config(config).save_pretrained(vae_dir)
        vae = AutoencoderKL.from_pretrained(vae_dir).eval()
        common = dict(resolution=args.resolution, batch_size=args.batch_size, progress=False, overwrite=True)

        def ours(channels_last: bool = False, compute_dtype: str = 'float32'):
            options = EncodeOptions(channels_last=channels_last, compute_dtype=compute_dtype, **common)
            return lambda out: encode_latents(vae_dir, os.path.join(work, 'mds'), out, options)

        def plain(workers: int = 0, channels_last: bool = False, compute_dtype: str = 'float32'):
            return lambda out: plain_loop(
                images, vae_dir, out, args.resolution, args.batch_size, workers, channels_last, compute_dtype
            )

        contenders = {
            'plain': plain(),
            'ours': ours(),
            'plain_nhwc': plain(channels_last=True),
            'ours_nhwc': ours(channels_last=True),
            'plain_bf16': plain(compute_dtype='bfloat16'),
            'ours_bf16': ours(compute_dtype='bfloat16'),
            'plain_worker': plain(workers=1),
        }
        contenders['ours'](os.path.join(work, 'warmup'))  # first-call allocations, page cache
        shutil.rmtree(os.path.join(work, 'warmup'))
        times = alternate(contenders, work, args.reps)
        contenders['plain'](os.path.join(work, 'check_plain'))
        contenders['ours'](os.path.join(work, 'check_ours'))
        diff = check_same_values(os.path.join(work, 'check_plain'), os.path.join(work, 'check_ours'))
        contenders['plain_bf16'](os.path.join(work, 'check_bf16'))
        bf16_error = check_same_values(os.path.join(work, 'check_bf16'), os.path.join(work, 'check_ours'))
        stages = profile_plain(images, vae, args.resolution, args.batch_size, min(args.images, 16))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rate = {name: args.images / float(np.median(t)) for name, t in times.items()}

    def ratio(a: str, b: str) -> float:
        return float(np.median(np.array(times[b]) / np.array(times[a])))

    arch = 'tiny VAE' if args.smoke else 'SD-VAE architecture'
    print(
        f'latent encoding, {arch}, {args.images} images at {args.resolution} px, batch {args.batch_size}, '
        f'{torch.get_num_threads()} torch threads, {args.reps} reps (images/s, median)'
    )
    print('  equal processes (1), equal kernels:')
    print(f'    plain loop (DataLoader workers=0 + vae.encode + np.save)  {rate["plain"]:8.2f}')
    print(
        f'    ours (scripts/encode_latents.py)                         {rate["ours"]:8.2f}   '
        f'x{ratio("ours", "plain"):.2f} vs plain'
    )
    print('  channels-last (a kernel setting, both sides):')
    print(
        f'    plain loop, channels-last                                 {rate["plain_nhwc"]:8.2f}   '
        f'x{ratio("plain_nhwc", "plain"):.2f} vs plain'
    )
    print(
        f'    ours --channels-last                                      {rate["ours_nhwc"]:8.2f}   '
        f'x{ratio("ours_nhwc", "plain_nhwc"):.2f} vs plain channels-last'
    )
    print('  bfloat16 autocast (a precision setting, both sides):')
    print(
        f'    plain loop, bf16 autocast                                 {rate["plain_bf16"]:8.2f}   '
        f'x{ratio("plain_bf16", "plain"):.2f} vs plain'
    )
    print(
        f'    ours --compute-dtype bfloat16                             {rate["ours_bf16"]:8.2f}   '
        f'x{ratio("ours_bf16", "plain_bf16"):.2f} vs plain bf16   x{ratio("ours_bf16", "plain"):.2f} vs plain'
    )
    print('  one more process (a loader worker):')
    print(
        f'    plain loop, DataLoader workers=1 (2 processes)            {rate["plain_worker"]:8.2f}   '
        f'x{ratio("ours", "plain_worker"):.2f} ours (1 process) vs this'
    )
    print('  plain loop stages, s/image: ' + ', '.join(f'{k} {v:.4f}' for k, v in stages.items()))
    print(f'  same values: max |mean_plain - mean_ours| = {diff:.2e} (fp16)')
    print(f'  bf16 autocast error: max |mean_bf16 - mean_fp32| = {bf16_error:.2e}')


if __name__ == '__main__':
    main()
