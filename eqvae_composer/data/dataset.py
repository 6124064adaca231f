"""The training/eval image dataset over MDS shards, and its dataloader.

``StreamingDataset`` does the sharding across ranks and workers, the shuffling, the download and
the mid-epoch resume (Composer checkpoints its position through ``state_dict``). This subclass only
decodes one image and applies the reference transform.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from streaming import Stream, StreamingDataLoader, StreamingDataset

from eqvae_composer.compat import EpochWorkHook, ResumeMemoryHook, epoch_partition, init_streaming_dataset
from eqvae_composer.data.transforms import (
    RESIZE_FILTERS,
    decode_crop_resize,
    eval_box,
    open_image,
    sample_train_box,
    to_tensor,
)

__all__ = [
    'PADDING_KEY',
    'EmptyDatasetError',
    'StreamingImageDataset',
    'build_image_dataloader',
    'check_local_dataset',
    'padding_mask',
    'sample_rng',
]

#: Key of the per-sample flag eval iteration adds: ``True`` for a repeat StreamingDataset inserted so that
#: every rank (and worker) gets as many samples; metrics skip those so each sample counts once.
PADDING_KEY = 'is_padding'


class EmptyDatasetError(ValueError):
    """A dataset folder's ``index.json`` lists no samples."""


def check_local_dataset(local: str | None, split: str | None = None) -> None:
    """Fail early, and helpfully, when a local-only dataset has not been converted yet or holds no samples.

    Args:
        local: The dataset's local folder.
        split: Subfolder of ``local`` StreamingDataset will read. Default: ``None``.

    Raises:
        FileNotFoundError: ``local`` (/``split``) has no ``index.json``.
        EmptyDatasetError: its ``index.json`` lists no samples.
    """
    if local is None:
        return
    path = os.path.join(local, split) if split else local
    index = os.path.join(path, 'index.json')
    if os.path.isfile(index):
        with open(index) as f:
            if not sum(shard['samples'] for shard in json.load(f)['shards']):
                raise EmptyDatasetError(
                    f'Dataset folder {path} holds no samples (its index.json lists none); '
                    'convert some images into it or point to another folder.'
                )
        return
    what = 'does not exist' if not os.path.exists(path) else 'has no index.json, so it is not an MDS dataset'
    # The demo conversion writes <dir>/train and <dir>/val, so point at the parent of a split folder.
    head, tail = os.path.split(os.path.normpath(path))
    demo_out = head if tail in ('train', 'val') and head else path
    raise FileNotFoundError(
        f'Dataset folder {path} {what}. Run `python convert_dataset.py --out {demo_out}` first to write the '
        f'demo set there, or `python convert_dataset.py --source folder --input <image folder> --out {path}` '
        f'for your own images.'
    )


StreamSpec = Stream | Mapping[str, Any]


def sample_rng(dataset: StreamingDataset, index: int) -> np.random.Generator:
    """The random generator of sample ``index`` in the epoch being iterated: ``(shuffle_seed, epoch, index)``.

    Independent of the worker count and order, and repeated exactly by a resumed run.
    """
    # next_epoch is the epoch being iterated plus one (it lives in shared memory, so every
    # worker agrees); random access outside an epoch counts as epoch 0.
    epoch = max(dataset.next_epoch - 1, 0)
    return np.random.default_rng((dataset.shuffle_seed, epoch, index))


def _as_streams(streams: Iterable[StreamSpec] | Mapping[str, StreamSpec]) -> list[Stream]:
    """``Stream`` objects from a list, or from a mapping of names to streams (llm-foundry's YAML layout)."""
    items = streams.values() if isinstance(streams, Mapping) else streams
    return [stream if isinstance(stream, Stream) else Stream(**stream) for stream in items]


def padding_mask(partition: NDArray[np.int64], node: int, rank: int, worker: int) -> NDArray[np.bool_]:
    """Which of one worker's samples repeat a sample that appears earlier in the epoch's partition.

    ``StreamingDataset`` pads every rank's share to the same length with repeats of other samples
    (so that all ranks run as many batches) and pads with ``-1`` to whole batches (never yielded).
    Counting only each sample's first occurrence in the whole partition, which every rank computes
    identically, counts each sample exactly once across ranks and workers.

    Args:
        partition: The epoch's sample ids, shape (nodes, ranks per node, workers per rank, batches, batch size),
            ``-1`` for no sample.
        node: This worker's node.
        rank: Its rank within the node.
        worker: Its index among the rank's workers.

    Returns:
        NDArray[np.bool_]: One flag per sample the worker yields (its ids other than ``-1``, in order).
    """
    first = np.zeros(partition.size, dtype=bool)
    first[np.unique(partition.reshape(-1), return_index=True)[1]] = True
    ids = partition[node, rank, worker].reshape(-1)
    return ~first.reshape(partition.shape)[node, rank, worker].reshape(-1)[ids != -1]


class StreamingImageDataset(EpochWorkHook, ResumeMemoryHook, StreamingDataset):
    """Images from MDS shards, with the EQ-VAE reference train crop or eval transform.

    Train: a square crop of side ``min_side * U(0.5, 1)`` at a uniformly random position, resized
    (antialiased bicubic) to ``resolution``. Eval: the shorter side resized to ``resolution``, then
    a centre crop. JPEGs are decoded at 1/2, 1/4 or 1/8 size when the crop is downsampled by at
    least that much (keeping >= ``resolution`` pixels across the crop), which is most of the decode
    cost on large photographs and changes pixels by a fraction of a grey level.

    Crop randomness is a pure function of ``(shuffle_seed, epoch, sample index)``: independent of
    the worker count and order, and repeated exactly by a resumed run. Pass Composer's seed as
    ``shuffle_seed`` to tie both the order and the crops to it.

    Args:
        resolution: Output side in pixels. Default: ``256``.
        train: Random crop and shuffling (``True``) or the deterministic eval transform. Default: ``True``.
        image_column: MDS column holding the image (encoded bytes, or a PIL image for ``jpeg``/``png``/
            ``pil`` columns, e.g. ``x`` from ``streaming.vision.convert.imagenet``). Default: ``'image'``.
        output_key: Key of the image tensor in each sample. Default: ``'image'``.
        draft: Allow reduced-size JPEG decoding. Default: ``True``.
        resize_filter: How the training crop is resized: ``'bicubic_aa'`` (antialiased bicubic) or
            ``'area_cv2'`` (OpenCV's ``INTER_AREA``, the reference's; with ``draft=False`` the
            reference's pixels exactly). The eval transform keeps its own. Default: ``'bicubic_aa'``.
        **streaming_kwargs: Passed to ``StreamingDataset`` (``remote``, ``local``, ``split``,
            ``streams``, ``cache_limit``, ``batch_size``, ...). ``streams`` may be a list or a mapping of
            names to streams (as llm-foundry's YAMLs write them), each a ``Stream`` or a dict of its
            arguments. Defaults set here: ``shuffle=train``.

    Returns samples ``{output_key: FloatTensor[3, resolution, resolution]}`` with values in [-1, 1]. Iterated
    for evaluation (``train=False``), samples also hold ``PADDING_KEY``: ``True`` for a repeat that
    StreamingDataset added to even out the ranks' shares, which metrics must skip (see ``padding_mask``).
    """

    def __init__(
        self,
        *,
        resolution: int = 256,
        train: bool = True,
        image_column: str = 'image',
        output_key: str = 'image',
        draft: bool = True,
        resize_filter: str = 'bicubic_aa',
        **streaming_kwargs: Any,
    ) -> None:
        if resolution < 1:
            raise ValueError(f'resolution must be positive, got {resolution}')
        if resize_filter not in RESIZE_FILTERS:
            raise ValueError(f'resize_filter must be one of {RESIZE_FILTERS}, got {resize_filter!r}.')
        if not train and resize_filter != 'bicubic_aa':
            raise ValueError(
                'resize_filter applies to the training crop; the eval transform is fixed (set it on '
                'train_loader.dataset only).'
            )
        streams = streaming_kwargs.get('streams')
        if streams:
            streaming_kwargs['streams'] = _as_streams(streams)
            for stream in streaming_kwargs['streams']:
                if stream.remote is None:
                    check_local_dataset(stream.local, stream.split)
        elif streaming_kwargs.get('remote') is None:
            check_local_dataset(streaming_kwargs.get('local'), streaming_kwargs.get('split'))
        streaming_kwargs.setdefault('shuffle', train)
        init_streaming_dataset(super().__init__, **streaming_kwargs)
        self.resolution = resolution
        self.train = train
        self.image_column = image_column
        self.output_key = output_key
        self.draft = draft
        self.resize_filter = resize_filter

    def epoch_work(self, epoch: int, sample_in_epoch: int) -> None:
        # StreamingDataset hands each worker only its own slice of the epoch's partition; the padding
        # flags need the whole of it. Rebuilding it is deterministic and, for an eval set, cheap.
        if not self.train:
            partition, (node, rank, worker) = epoch_partition(self, epoch, sample_in_epoch)
            self._padding = padding_mask(partition, node, rank, worker)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """This rank's and worker's samples; for evaluation, with the ``PADDING_KEY`` flag."""
        for position, sample in enumerate(super().__iter__()):
            if not self.train:  # super() computed self._padding (epoch_work) before its first sample
                sample[PADDING_KEY] = bool(self._padding[position])
            yield sample

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Decode sample ``index`` and transform it.

        Args:
            index: Sample index in the (stream-concatenated) dataset.

        Returns:
            dict[str, torch.Tensor]: ``{output_key: FloatTensor[3, R, R]}`` in [-1, 1].
        """
        sample = super().__getitem__(index)
        if self.image_column not in sample:
            raise KeyError(
                f'Sample {index} has no column {self.image_column!r} (columns: {sorted(sample)}); '
                f'set image_column to the one that holds the images.'
            )
        img = open_image(sample[self.image_column])
        width, height = img.size
        box = sample_train_box(width, height, sample_rng(self, index)) if self.train else eval_box(width, height)
        pixels = decode_crop_resize(img, box, self.resolution, draft=self.draft, resize_filter=self.resize_filter)
        return {self.output_key: to_tensor(pixels)}


def build_image_dataloader(
    *,
    batch_size: int,
    num_workers: int = 0,
    drop_last: bool,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
    persistent_workers: bool = False,
    **dataset_kwargs: Any,
) -> torch.utils.data.DataLoader:
    """A dataloader over :class:`StreamingImageDataset`.

    No sampler: StreamingDataset partitions samples across ranks and workers itself. The loader is
    a ``StreamingDataLoader`` (a ``DataLoader``) so that it also has ``state_dict``/``load_state_dict``
    for mid-epoch resumption outside Composer; Composer uses the dataset's own.

    Args:
        batch_size: Per-device batch size; also given to the dataset for partitioning.
        num_workers: Dataloader worker processes. Default: ``0``.
        drop_last: Drop the last incomplete batch.
        pin_memory: Pin batches in page-locked memory. Default: ``False``.
        prefetch_factor: Batches prefetched per worker (only with ``num_workers > 0``).
            Default: ``None`` (PyTorch's default).
        persistent_workers: Keep workers between epochs (only with ``num_workers > 0``). Default: ``False``.
        **dataset_kwargs: :class:`StreamingImageDataset` arguments.

    Returns:
        torch.utils.data.DataLoader: Batches ``{output_key: FloatTensor[B, 3, R, R]}``.

    Raises:
        FileNotFoundError: A local-only dataset folder has no ``index.json``.
    """
    dataset_kwargs.setdefault('batch_size', batch_size)
    dataset = StreamingImageDataset(**dataset_kwargs)
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra = {'prefetch_factor': prefetch_factor, 'persistent_workers': persistent_workers}
    return StreamingDataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, drop_last=drop_last, pin_memory=pin_memory, **extra
    )
