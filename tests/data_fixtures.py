"""Helpers and fixtures shared by the tests/test_data_*.py files: image files and MDS readers."""

from __future__ import annotations

import io
import json
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image
from streaming.base.format import reader_from_json
from streaming.base.util import clean_stale_shared_memory

__all__ = [
    'dataset_files',
    'jpeg_bytes',
    'write_many_images',
    'photo',
    'read_mds',
    'read_skipped',
    'streaming_env',
    'write_image',
]


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, photograph-like RGB image (gradients + blobs + mild noise): JPEG behaves as on photos."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy = rng.uniform(1, 4, size=2) / max(width, height)
        phase = rng.uniform(0, 2 * np.pi)
        channels.append(128 + 90 * np.sin(2 * np.pi * (fx * x + fy * y) + phase))
    array = np.stack(channels, axis=-1) + rng.normal(0, 4, size=(height, width, 3))
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), 'RGB')


def jpeg_bytes(img: Image.Image, **save_kwargs: Any) -> bytes:
    """Encode ``img`` as JPEG (quality 90 unless given)."""
    buf = io.BytesIO()
    img.save(buf, format='JPEG', **{'quality': 90, **save_kwargs})
    return buf.getvalue()


def write_image(path: str | os.PathLike, img: Image.Image, fmt: str | None = None, **save_kwargs: Any) -> str:
    """Save ``img`` to ``path`` (parents created) and return the path as a string."""
    path = str(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format=fmt, **save_kwargs)
    return path


def read_mds(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Every sample of a local MDS dataset, in index order, without StreamingDataset (no shared memory)."""
    folder = str(folder)
    with open(os.path.join(folder, 'index.json')) as f:
        index = json.load(f)
    samples = []
    for shard in index['shards']:
        reader = reader_from_json(folder, None, shard)
        samples.extend(reader.get_item(i) for i in range(shard['samples']))
    return samples


def read_skipped(path: str | os.PathLike) -> list[dict[str, str]]:
    """The records of a ``skipped.jsonl`` report."""
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def streaming_env() -> Iterator[None]:
    """Clean streaming's shared memory around a test, so datasets from earlier tests cannot collide."""
    clean_stale_shared_memory()
    yield
    clean_stale_shared_memory()


def write_many_images(root: pathlib.Path) -> pathlib.Path:
    """Write 23 photos of varied sizes in three subfolders of ``root``, and a broken file a conversion skips."""
    for i in range(23):
        write_image(root / f'{i % 3}' / f'{i:03d}.jpg', photo(48 + i, 40, i))
    (root / '1' / 'zz_broken.jpg').write_bytes(b'\xff\xd8\xff garbage')
    return root


def dataset_files(folder: str | os.PathLike) -> dict[str, bytes]:
    """Every file of a converted dataset by relative path, without the conversion state (``.convert/``)."""
    return {
        os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), 'rb').read()
        for d, _, files in os.walk(folder)
        for f in files
        if not d.endswith('.convert')
    }
