"""Data pipeline benchmark: conversion, loading and conversion memory, side by side in one process.

    python scripts/bench_data.py            # ~4000 JPEGs (a quarter of them > 1000 px), a few minutes on 2 cores
    python scripts/bench_data.py --smoke    # seconds; checks that the benchmark runs

Measures, on one generated ImageNet-layout folder (train/<wnid>/*.JPEG, content cropped from the
scikit-image photographs, sensor-like noise added so file sizes are realistic):

1. conversion images/s: ``convert_dataset.py``'s library (all cores) vs the loop of
   ``streaming.vision.convert.imagenet`` (its defaults: sha1+xxh64 hashes, one process);
2. loader images/s, one process, decode + reference crop + resize to 256: ``StreamingImageDataset`` vs
   torchvision ``ImageFolder`` + PIL doing the same crop, separately for ImageNet-sized and > 1000 px images;
3. peak memory (RSS) of a conversion of N/4 vs N images, each in a fresh process.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from streaming import MDSWriter  # noqa: E402

from eqvae_composer.data.convert import ConvertOptions, convert, default_workers  # noqa: E402
from eqvae_composer.data.mds_writer import LeanMDSWriter  # noqa: E402

convert_module = importlib.import_module('eqvae_composer.data.convert')  # the package re-exports convert()
from eqvae_composer.data.demo import DEMO_EVAL_PHOTOS, DEMO_TRAIN_PHOTOS  # noqa: E402
from eqvae_composer.data.transforms import sample_train_box, to_tensor  # noqa: E402

RESOLUTION = 256
LARGE_CLASSES = 5  # the last classes hold the > 1000 px images


_photos: dict[str, Image.Image] = {}  # per worker process: decode each source photograph once


def _make_image(args: tuple[int, int, int, str]) -> None:
    index, width, height, path = args
    rng = np.random.default_rng(index)
    name = (DEMO_TRAIN_PHOTOS + DEMO_EVAL_PHOTOS)[index % 9]
    if name not in _photos:
        import skimage.data

        with Image.open(os.path.join(os.path.dirname(skimage.data.__file__), name)) as f:
            _photos[name] = f.convert('RGB')
    source = _photos[name]
    side = int(min(source.size) * rng.uniform(0.5, 1.0))  # a random region, stretched to the target size
    left, top = int(rng.integers(0, source.width - side + 1)), int(rng.integers(0, source.height - side + 1))
    base = source.crop((left, top, left + side, top + side)).resize((width, height), Image.Resampling.BICUBIC)
    noisy = np.asarray(base, np.float32) + rng.normal(0, 4, (height, width, 3))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, 'JPEG', quality=90)


def generate(root: str, count: int, classes: int) -> None:
    """ImageNet-like folder: 3/4 at ImageNet sizes (short side 300-500), 1/4 large (long side 1200-2400)."""
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(count):
        c = i % classes
        large = c >= classes - LARGE_CLASSES
        long_side = int(rng.integers(1200, 2401)) if large else int(rng.integers(400, 667))
        aspect = float(rng.choice([4 / 3, 3 / 2, 1.0, 3 / 4]))
        width, height = (
            (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
        )
        jobs.append((i, width, height, os.path.join(root, 'train', f'n{c:08d}', f'n{c:08d}_{i}.JPEG')))
    with multiprocessing.Pool(default_workers()) as pool:
        pool.map(_make_image, jobs, chunksize=8)


def streaming_imagenet_style(in_root: str, out_root: str) -> None:
    """The conversion loop of ``streaming.vision.convert.imagenet.main`` with its default arguments."""
    from glob import glob

    from streaming.vision.convert.imagenet import get_classes

    filenames = sorted(glob(os.path.join(in_root, 'train', '*', '*')))
    classes, _ = get_classes(filenames)
    indices = np.random.permutation(len(filenames))
    with MDSWriter(
        out=os.path.join(out_root, 'train'),
        columns={'i': 'int', 'x': 'jpeg', 'y': 'int'},
        compression='',
        hashes=['sha1', 'xxh64'],
        size_limit=1 << 26,
    ) as out:
        for i in indices:
            Image.open(filenames[i])  # its --validate
            with open(filenames[i], 'rb') as f:
                x = f.read()
            out.write({'i': int(i), 'x': x, 'y': classes[i]})


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


class ReferenceCrop:
    """The same reference crop for the torchvision baseline, on an already decoded PIL image."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, img: Image.Image):
        box = sample_train_box(img.width, img.height, self.rng)
        return to_tensor(img.resize((RESOLUTION, RESOLUTION), Image.Resampling.BICUBIC, box=box))


def _rate(get, indices: list[int]) -> float:
    start = time.perf_counter()
    for i in indices:
        get(i)
    return len(indices) / (time.perf_counter() - start)


def loader_rates(in_root: str, mds: str, per_kind: int, reps: int) -> dict[str, dict[str, list[float]]]:
    """Images/s per size kind and contender, ``reps`` times with the contenders in a rotating order.

    One process and one torch thread, as in a DataLoader worker (PyTorch sets one thread there).
    """
    from streaming.base.util import clean_stale_shared_memory
    from torchvision.datasets import ImageFolder

    from eqvae_composer.data.dataset import StreamingImageDataset

    torch.set_num_threads(1)
    folder = ImageFolder(os.path.join(in_root, 'train'), transform=ReferenceCrop())
    large_from = len(folder.classes) - LARGE_CLASSES
    kinds = {
        'imagenet-size': [i for i, (_, c) in enumerate(folder.samples) if c < large_from][:per_kind],
        'large (>1000 px)': [i for i, (_, c) in enumerate(folder.samples) if c >= large_from][:per_kind],
    }
    clean_stale_shared_memory()
    ours = StreamingImageDataset(local=mds, resolution=RESOLUTION, shuffle=False)
    no_draft = StreamingImageDataset(local=mds, resolution=RESOLUTION, shuffle=False, draft=False)
    assert ours.num_samples == len(folder.samples)  # same sorted order as ImageFolder
    contenders = {
        'torchvision ImageFolder+PIL': folder.__getitem__,
        'StreamingImageDataset': ours.__getitem__,
        'StreamingImageDataset, draft off': no_draft.__getitem__,
    }
    names = list(contenders)
    rates: dict[str, dict[str, list[float]]] = {kind: {name: [] for name in names} for kind in kinds}
    for kind, indices in kinds.items():
        for get in contenders.values():
            get(indices[0])  # warm up: first shard mapped, first file in the page cache
        for rep in range(reps):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                rates[kind][name].append(_rate(contenders[name], indices))
    return rates


_MEMORY_PROBE = """
import json, resource, sys
from eqvae_composer.data.convert import ConvertOptions, convert
convert('imagenet', sys.argv[2], input=sys.argv[1], splits=['train'], limit=int(sys.argv[3]),
        options=ConvertOptions(progress=False))
print(json.dumps({'self': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  'worker': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def conversion_memory(in_root: str, work: str, count: int) -> dict[str, float]:
    """Peak RSS (MiB) of the main process and of the largest worker for a conversion of ``count`` images."""
    out = os.path.join(work, f'mem{count}')
    result = subprocess.run(
        [sys.executable, '-c', _MEMORY_PROBE, in_root, out, str(count)],
        check=True,
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)) or '.',
    )
    shutil.rmtree(out)
    peak = json.loads(result.stdout.strip().splitlines()[-1])
    return {k: v / 1024 for k, v in peak.items()}  # ru_maxrss is KiB on Linux


def conversion_times(in_root: str, work: str, reps: int) -> dict[str, list[float]]:
    """Seconds per conversion for each contender, ``reps`` times, in a rotating order.

    Every input is read once first so all contenders find it in the page cache; otherwise the
    first one measured pays for the disk and the ratio says more about the order than the code.
    """
    for folder, _, files in os.walk(in_root):
        for name in files:
            with open(os.path.join(folder, name), 'rb') as f:
                f.read()
    hashed = ConvertOptions(progress=False, hashes=('sha1', 'xxh64'))

    def ours_with_mdswriter(out: str) -> None:
        # What LeanMDSWriter gives: the same conversion with streaming's writer. The swap reaches the
        # workers only because they fork this process; a spawned worker would re-import the module.
        if multiprocessing.get_start_method() != 'fork':
            raise RuntimeError('the MDSWriter comparison needs the fork start method (Linux default).')
        convert_module.LeanMDSWriter = MDSWriter
        try:
            convert('imagenet', out, input=in_root, splits=['train'], options=hashed)
        finally:
            convert_module.LeanMDSWriter = LeanMDSWriter

    contenders = {
        'streaming': lambda out: streaming_imagenet_style(in_root, out),
        'ours': lambda out: convert('imagenet', out, input=in_root, splits=['train'],
                                    options=ConvertOptions(progress=False)),
        'ours-hashed': lambda out: convert('imagenet', out, input=in_root, splits=['train'], options=hashed),
        'ours-hashed-mdswriter': ours_with_mdswriter,
    }
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            out = os.path.join(work, name)
            shutil.rmtree(out, ignore_errors=True)
            times[name].append(timed(contenders[name], out))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--smoke', action='store_true', help='Tiny sizes: checks the script, numbers meaningless.')
    parser.add_argument('--images', type=int, default=4000, help='Images to generate. Default: 4000.')
    parser.add_argument('--loader-images', type=int, default=300, help='Images per size class for the loader.')
    parser.add_argument('--workdir', help='Where to generate (kept). Default: a temporary folder (deleted).')
    parser.add_argument('--reps', type=int, default=3, help='Repetitions, contenders alternating.')
    args = parser.parse_args()
    count, per_kind = (80, 10) if args.smoke else (args.images, args.loader_images)
    work = args.workdir or tempfile.mkdtemp(prefix='bench-data-')
    in_root = os.path.join(work, 'raw')
    try:
        print(f'generating {count} JPEGs in {in_root} ...', flush=True)
        if not os.path.isdir(in_root):
            generate(in_root, count, classes=20)
        sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(in_root) for f in fs]
        shutil.rmtree(os.path.join(work, 'cache'), ignore_errors=True)

        times = conversion_times(in_root, work, args.reps)
        t_streaming, t_ours, t_hashed = (float(np.median(times[n])) for n in ('streaming', 'ours', 'ours-hashed'))
        ratio = {n: float(np.median(np.array(times['streaming']) / np.array(times[n]))) for n in times}
        rates = loader_rates(in_root, os.path.join(work, 'ours', 'train'), per_kind, args.reps)
        memory = {n: conversion_memory(in_root, work, n) for n in (count // 4, count)}

        lines = [
            f'command: python scripts/bench_data.py{" --smoke" if args.smoke else ""}',
            f'machine: {default_workers()} cores; {count} JPEGs, {np.mean(sizes) / 1024:.0f} KiB mean, '
            f'{LARGE_CLASSES}/20 classes with long side 1200-2400 px, the rest 400-666 px',
            '',
            'conversion (images/s; ratio = median of per-repetition ratios)',
            f'  streaming.vision.convert.imagenet loop (1 process, sha1+xxh64): {count / t_streaming:8.0f}',
            f'  convert_dataset.py library ({default_workers()} workers, no hashes): {count / t_ours:8.0f}'
            f'   x{ratio["ours"]:.2f}',
            f'  convert_dataset.py library ({default_workers()} workers, sha1+xxh64): {count / t_hashed:8.0f}'
            f'   x{ratio["ours-hashed"]:.2f}  (like for like)',
            f'  the same with streaming\'s MDSWriter instead of LeanMDSWriter:     '
            f'{count / float(np.median(times["ours-hashed-mdswriter"])):8.0f}   x{ratio["ours-hashed-mdswriter"]:.2f}',
            f'  (medians over {args.reps} repetitions, contenders alternating, inputs in the page cache)',
            '',
            f'loader, 1 process, 1 thread, decode + reference crop + resize to {RESOLUTION} '
            f'(median images/s over {args.reps} repetitions, {per_kind} images per kind)',
        ]
        for kind, by_name in rates.items():
            base = np.array(by_name['torchvision ImageFolder+PIL'])
            lines.append(f'  {kind}:')
            lines += [
                f'    {name:34s} {np.median(rate):7.1f}   x{np.median(np.array(rate) / base):.2f}'
                for name, rate in by_name.items()
            ]
        lines += ['', 'conversion peak RSS (MiB): main process / largest worker']
        lines += [f'  {n:5d} images: {m["self"]:7.0f} / {m["worker"]:7.0f}' for n, m in memory.items()]
        print('\n'.join(lines))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
