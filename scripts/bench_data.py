"""Data pipeline benchmark: conversion, loading and conversion memory, side by side in one process.

    python scripts/bench_data.py                  # ~4000 JPEGs (a quarter of them > 1000 px), a few minutes on 2 cores
    python scripts/bench_data.py --smoke          # seconds; checks that the benchmark runs
    python scripts/bench_data.py --profile        # where a one-process conversion spends its time, per tool
    python scripts/bench_data.py --part-sizes 250 1000   # convert() at several part sizes
    python scripts/bench_data.py --resize         # the loader's crop resize vs PIL's

Measures, on one generated ImageNet-layout folder (train/<wnid>/*.JPEG, content cropped from the
scikit-image photographs, sensor-like noise added so file sizes are realistic):

1. conversion images/s of ``convert_dataset.py``'s library against the loop of
   ``streaming.vision.convert.imagenet`` (both with its default sha1+xxh64 shard hashes), per process at
   equal process counts (1 vs 1; N workers vs streaming's loop in N processes over the same parts,
   merged with ``merge_index``) and each tool as shipped (ours on all cores, streaming's in one process);
2. loader images/s, one process, decode + reference crop + resize to 256: ``StreamingImageDataset`` vs
   torchvision ``ImageFolder`` + PIL doing the same crop, separately for ImageNet-sized and > 1000 px images;
3. peak memory (RSS) of a conversion of N/4 vs N images, each in a fresh process.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

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
HASHES = ('sha1', 'xxh64')  # streaming.vision.convert.imagenet's default
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
    _pool_map(_make_image, jobs, default_workers(), chunksize=8)


def _pool_map(fn, jobs: list, processes: int, chunksize: int = 1) -> list:
    """``Pool.map`` whose workers exit on their own once the work is done.

    ``with Pool() as pool`` ends in ``terminate()``, which SIGTERMs the idle workers: one killed while it
    held the task queue's lock hung the parent for good (CI timed out in this file's parallel test).
    """
    pool = multiprocessing.Pool(processes)
    try:
        results = pool.map(fn, jobs, chunksize=chunksize)
    except BaseException:
        pool.terminate()
        raise
    pool.close()
    pool.join()
    return results


def _streaming_loop(filenames: list[str], classes: list[int], first: int, out: str) -> None:
    """The per-sample loop of ``streaming.vision.convert.imagenet.main`` at its defaults, over ``filenames``.

    ``first`` is the global index of ``filenames[0]`` (its ``i`` column); the order is shuffled as there.
    """
    with MDSWriter(
        out=out,
        columns={'i': 'int', 'x': 'jpeg', 'y': 'int'},
        compression='',
        hashes=['sha1', 'xxh64'],
        size_limit=1 << 26,
    ) as writer:
        for i in np.random.permutation(len(filenames)):
            Image.open(filenames[i])  # its --validate
            with open(filenames[i], 'rb') as f:
                x = f.read()
            writer.write({'i': first + int(i), 'x': x, 'y': classes[i]})


def _streaming_listing(in_root: str) -> tuple[list[str], list[int]]:
    from glob import glob

    from streaming.vision.convert.imagenet import get_classes

    filenames = sorted(glob(os.path.join(in_root, 'train', '*', '*')))
    return filenames, get_classes(filenames)[0]


def streaming_imagenet_style(in_root: str, out_root: str) -> None:
    """``streaming.vision.convert.imagenet`` as shipped: its loop in one process, one output folder."""
    filenames, classes = _streaming_listing(in_root)
    _streaming_loop(filenames, classes, 0, os.path.join(out_root, 'train'))


def _streaming_part(job: tuple[list[str], list[int], int, str]) -> str:
    filenames, classes, first, out = job
    _streaming_loop(filenames, classes, first, out)
    return os.path.join(out, 'index.json')


def streaming_parallel(in_root: str, out_root: str, processes: int, part_size: int) -> None:
    """streaming's loop in ``processes`` processes over the parts ``convert()`` uses, merged with ``merge_index``.

    What a user of streaming would write to use every core: the same ``part_size`` blocks of the sorted
    files as ours, one ``MDSWriter`` sub-folder each, handed out one at a time by a process pool.
    """
    from streaming.base.util import merge_index

    filenames, classes = _streaming_listing(in_root)
    out = os.path.join(out_root, 'train')
    jobs = [
        (
            filenames[start : start + part_size],
            classes[start : start + part_size],
            start,
            os.path.join(out, f'part_{start // part_size:05d}'),
        )
        for start in range(0, len(filenames), part_size)
    ]
    indexes = _pool_map(_streaming_part, jobs, processes)
    logging.disable(logging.WARNING)  # merge_index warns about its temporary folder and the non-empty output
    try:
        merge_index(indexes, out)
    finally:
        logging.disable(logging.NOTSET)


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


def _read_inputs(in_root: str) -> None:
    """Read every input once so all contenders find it in the page cache.

    Otherwise the first one measured pays for the disk and the ratio says more about the order than the code.
    """
    for folder, _, files in os.walk(in_root):
        for name in files:
            with open(os.path.join(folder, name), 'rb') as f:
                f.read()


def _ours(in_root: str, **options) -> Callable[[str], None]:
    return lambda out: convert(
        'imagenet', out, input=in_root, splits=['train'], options=ConvertOptions(progress=False, **options)
    )


def _ours_with_mdswriter(in_root: str, workers: int) -> Callable[[str], None]:
    def run(out: str) -> None:
        # What LeanMDSWriter gives: the same conversion with streaming's writer. The swap reaches the
        # workers only because they fork this process; a spawned worker would re-import the module.
        if multiprocessing.get_start_method() != 'fork':
            raise RuntimeError('the MDSWriter comparison needs the fork start method (Linux default).')
        convert_module.LeanMDSWriter = MDSWriter
        try:
            _ours(in_root, hashes=HASHES, workers=workers)(out)
        finally:
            convert_module.LeanMDSWriter = LeanMDSWriter

    return run


def conversion_contenders(in_root: str, workers: int, writer_share: bool = False) -> dict[str, Callable[[str], None]]:
    """Every conversion contender, by name; each takes its output folder.

    All write sha1+xxh64 shard hashes (streaming's default) except ``ours-defaults``.
    """
    part_size = ConvertOptions().part_size
    contenders = {
        'streaming-1': lambda out: streaming_imagenet_style(in_root, out),
        'streaming-N': lambda out: streaming_parallel(in_root, out, workers, part_size),
        'ours-1': _ours(in_root, hashes=HASHES, workers=1),
        'ours-N': _ours(in_root, hashes=HASHES, workers=workers),
        'ours-defaults': _ours(in_root),
    }
    if writer_share:
        contenders['ours-N-mdswriter'] = _ours_with_mdswriter(in_root, workers)
    return contenders


def alternate(contenders: dict[str, Callable[[str], None]], work: str, reps: int) -> dict[str, list[float]]:
    """Seconds per conversion for each contender, ``reps`` times, in an order that rotates every repetition."""
    names = list(contenders)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            out = os.path.join(work, name)
            shutil.rmtree(out, ignore_errors=True)
            times[name].append(timed(contenders[name], out))
            shutil.rmtree(out, ignore_errors=True)  # dirty pages of a deleted file are dropped, not written back
    return times


def _ratio(times: dict[str, list[float]], numerator: str, denominator: str) -> float:
    """Speed of ``numerator`` over ``denominator``: the median of per-repetition time ratios."""
    return float(np.median(np.array(times[denominator]) / np.array(times[numerator])))


def conversion_report(times: dict[str, list[float]], count: int, workers: int) -> list[str]:
    """The conversion table: per process at equal process counts, then each tool as shipped."""
    rate = {name: count / float(np.median(t)) for name, t in times.items()}

    def row(label: str, name: str, baseline: str | None = None) -> str:
        ratio = f'   x{_ratio(times, name, baseline):.2f} vs {baseline}' if baseline else ''
        return f'  {label:<86s}{rate[name]:7.0f}{ratio}'

    lines = [
        'conversion (images/s, median over repetitions; ratio = median of per-repetition ratios)',
        ' per process, equal process counts (both sha1+xxh64):',
        row("streaming-1   streaming's loop, 1 process", 'streaming-1'),
        row('ours-1        convert_dataset.py library, 1 worker', 'ours-1', 'streaming-1'),
        row(f"streaming-N   streaming's loop in {workers} processes over the same parts + merge_index", 'streaming-N'),
        row(f'ours-N        convert_dataset.py library, {workers} workers', 'ours-N', 'streaming-N'),
        ' each tool as shipped:',
        row('streaming-1   streaming.vision.convert.imagenet (1 process, its default sha1+xxh64)', 'streaming-1'),
        row(f'ours-N        convert_dataset.py ({workers} workers = all cores), sha1+xxh64', 'ours-N', 'streaming-1'),
        row(
            f'ours-defaults convert_dataset.py at its defaults ({workers} workers, no shard hashes)',
            'ours-defaults',
            'streaming-1',
        ),
    ]
    if 'ours-N-mdswriter' in times:
        lines.append(
            row(
                "ours-N with streaming's MDSWriter instead of LeanMDSWriter (the writer's share)",
                'ours-N-mdswriter',
                'streaming-1',
            )
        )
    return lines


_PROFILE_GROUPS = (
    # (group, predicate on (file, function name)); the first match wins. Time is cProfile's own time per function.
    (
        'writing shard files',
        lambda f, n: (
            n in ("<method 'write' of '_io.BufferedWriter' objects>", "<method 'writelines' of '_io._IOBase' objects>")
        ),
    ),
    ('sha1', lambda f, n: 'sha1' in n or n == "<method 'update' of '_hashlib.HASH' objects>"),
    ('xxh64 (streaming: inside get_hash)', lambda f, n: 'xxh64' in n or n == 'get_hash'),
    ('reading input files', lambda f, n: n == "<method 'read' of '_io.BufferedReader' objects>"),
    ('opening files', lambda f, n: n == '<built-in method io.open>'),
    (
        'copies (bytes joins and concatenations)',
        lambda f, n: n == "<method 'join' of 'bytes' objects>" or n == 'encode_joint_shard',
    ),
    ("PIL's header parse", lambda f, n: '/PIL/' in f),
)


def conversion_profile(in_root: str, work: str) -> list[str]:
    """Where a one-process conversion spends its time, per tool (cProfile, functions' own time, grouped)."""
    import cProfile
    import pstats

    lines = [
        'conversion profile, one process each, sha1+xxh64 (cProfile: share of own time; profiler overhead '
        'inflates Python-level work)'
    ]
    for name in ('streaming-1', 'ours-1'):
        run = conversion_contenders(in_root, 1)[name]
        out = os.path.join(work, f'profile-{name}')
        shutil.rmtree(out, ignore_errors=True)
        profiler = cProfile.Profile()
        profiler.runcall(run, out)
        shutil.rmtree(out, ignore_errors=True)
        stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive calls, own, cumulative, callers)
        total = sum(entry[2] for entry in stats.values())
        grouped = dict.fromkeys([group for group, _ in _PROFILE_GROUPS] + ['everything else'], 0.0)
        for (file, _, function), entry in stats.items():
            group = next((g for g, match in _PROFILE_GROUPS if match(file, function)), 'everything else')
            grouped[group] += entry[2]
        lines.append(f'  {name}: {total:.1f} s profiled')
        lines += [
            f'    {group:<42s}{seconds:6.2f} s {100 * seconds / total:5.1f}%' for group, seconds in grouped.items()
        ]
    return lines


def resize_report(in_root: str, count: int, reps: int) -> list[str]:
    """The loader's crop resize (PyTorch, uint8) vs PIL's ``Image.resize`` on ``count`` decoded crops, 1 thread."""
    from glob import glob

    from eqvae_composer.data.transforms import decode_crop_resize

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    crops = []
    for path in sorted(glob(os.path.join(in_root, 'train', '*', '*'))):
        with Image.open(path) as f:
            if max(f.size) < 1000:  # ImageNet-size images only
                img = f.convert('RGB')
                crops.append((img, sample_train_box(img.width, img.height, rng)))
        if len(crops) == count:
            break
    contenders = {
        'PIL Image.resize(bicubic, box)': lambda img, box: img.resize(
            (RESOLUTION, RESOLUTION), Image.Resampling.BICUBIC, box=box
        ),
        'ours (F.interpolate, uint8, antialias)': lambda img, box: decode_crop_resize(
            img, box, RESOLUTION, draft=False
        ),
    }
    ms: dict[str, list[float]] = {name: [] for name in contenders}
    for rep in range(reps):
        for name in list(contenders)[rep % 2 :] + list(contenders)[: rep % 2]:
            start = time.perf_counter()
            for img, box in crops:
                contenders[name](img, box)
            ms[name].append((time.perf_counter() - start) / len(crops) * 1e3)
    difference = np.concatenate(
        [
            np.abs(
                decode_crop_resize(img, box, RESOLUTION, draft=False).permute(1, 2, 0).numpy().astype(np.float64)
                - np.asarray(img.resize((RESOLUTION, RESOLUTION), Image.Resampling.BICUBIC, box=box))
            ).ravel()
            for img, box in crops
        ]
    )
    base = np.array(ms['PIL Image.resize(bicubic, box)'])
    lines = [
        f'crop resize to {RESOLUTION} px, {len(crops)} ImageNet-size crops (reference crop boxes), 1 thread, '
        f'ms per crop (median over {reps} repetitions, alternating)'
    ]
    lines += [f'  {name:<40s}{np.median(t):7.2f} ms   x{np.median(base / np.array(t)):.2f}' for name, t in ms.items()]
    lines.append(
        f'  mean |ours - PIL| {difference.mean():.4f} grey levels; 99.9% of pixels within '
        f'{np.quantile(difference, 0.999):.0f}'
    )
    return lines


def part_size_report(in_root: str, work: str, count: int, workers: int, sizes: list[int], reps: int) -> list[str]:
    """``convert()`` with ``workers`` workers (sha1+xxh64) at each part size, alternating."""
    times = alternate(
        {f'part_size={n}': _ours(in_root, hashes=HASHES, workers=workers, part_size=n) for n in sizes}, work, reps
    )
    base = f'part_size={sizes[0]}'
    lines = [f'conversion by part size, {workers} workers, sha1+xxh64 (images/s, median over {reps} repetitions)']
    lines += [
        f'  {name:<18s}{count / float(np.median(t)):7.0f}   x{_ratio(times, name, base):.2f} vs {base}'
        for name, t in times.items()
    ]
    return lines


def _load() -> str:
    return ' '.join(f'{x:.2f}' for x in os.getloadavg())


def _loader_dataset(in_root: str, work: str) -> str:
    """The MDS dataset the loader reads: the inputs converted once by ``convert()`` at its defaults."""
    out = os.path.join(work, 'loader-mds')
    shutil.rmtree(out, ignore_errors=True)
    _ours(in_root)(out)
    return os.path.join(out, 'train')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--smoke', action='store_true', help='Tiny sizes: checks the script, numbers meaningless.')
    parser.add_argument('--images', type=int, default=4000, help='Images to generate. Default: 4000.')
    parser.add_argument(
        '--loader-images',
        type=int,
        default=300,
        help='Images per size class for the loader (and crops for --resize). Default: 300.',
    )
    parser.add_argument('--workdir', help='Where to generate (kept). Default: a temporary folder (deleted).')
    parser.add_argument('--reps', type=int, default=3, help='Repetitions, contenders alternating.')
    parser.add_argument(
        '--writer-share', action='store_true', help="Also convert with streaming's MDSWriter in place of LeanMDSWriter."
    )
    parser.add_argument(
        '--profile',
        action='store_true',
        help='Only profile a one-process conversion by each tool (cProfile), then exit.',
    )
    parser.add_argument(
        '--part-sizes',
        type=int,
        nargs='+',
        metavar='N',
        help='Only time convert() at these part sizes (all cores, sha1+xxh64), then exit.',
    )
    parser.add_argument(
        '--resize',
        action='store_true',
        help="Only time the loader's crop resize against PIL's on decoded crops, then exit.",
    )
    args = parser.parse_args()
    load_start = _load()
    count, per_kind = (80, 10) if args.smoke else (args.images, args.loader_images)
    workers = default_workers()
    work = args.workdir or tempfile.mkdtemp(prefix='bench-data-')
    in_root = os.path.join(work, 'raw')
    try:
        if not os.path.isdir(in_root):
            print(f'generating {count} JPEGs in {in_root} ...', flush=True)
            generate(in_root, count, classes=20)
        sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(in_root) for f in fs]
        shutil.rmtree(os.path.join(work, 'cache'), ignore_errors=True)
        lines = [
            f'command: python {" ".join(sys.argv)}',
            f'machine: {workers} cores; {len(sizes)} JPEGs, {np.mean(sizes) / 1024:.0f} KiB mean, '
            f'{LARGE_CLASSES}/20 classes with long side 1200-2400 px, the rest 400-666 px',
            '',
        ]
        if args.resize:
            lines += resize_report(in_root, per_kind, args.reps)
        elif args.profile or args.part_sizes:
            _read_inputs(in_root)
            if args.profile:
                lines += conversion_profile(in_root, work)
            if args.part_sizes:
                lines += part_size_report(in_root, work, len(sizes), workers, args.part_sizes, args.reps)
        else:
            _read_inputs(in_root)
            times = alternate(conversion_contenders(in_root, workers, args.writer_share), work, args.reps)
            rates = loader_rates(in_root, _loader_dataset(in_root, work), per_kind, args.reps)
            memory = {n: conversion_memory(in_root, work, n) for n in (count // 4, count)}
            lines += conversion_report(times, len(sizes), workers)
            lines += [
                f'  ({args.reps} repetitions, contenders alternating, inputs in the page cache)',
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
        lines[1] += f'; load average (1, 5, 15 min) at the start {load_start}, at the end {_load()}'
        print('\n'.join(lines))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    main()
