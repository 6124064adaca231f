"""What ``--data`` can be for evaluation (an MDS dataset or a plain image folder), and each rank's share of it.

Evaluation reads samples by index rather than by iterating a ``StreamingDataset``: its per-rank
partitions are padded with repeated samples to equal length, which would make a multi-rank result
differ from a single-process one. Here rank r takes samples r, r + W, r + 2W, ... of the first N.
``--protocol reference`` instead reads the folder and shares it out as the reference's eval.py does
(torchvision's ``ImageFolder`` and ``DistributedSampler``), repeats included.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, Subset
from torchvision.datasets import ImageFolder

from eqvae_composer.data.dataset import StreamingImageDataset
from eqvae_composer.data.sources import list_folder
from eqvae_composer.data.transforms import decode_crop_resize, eval_box, to_tensor
from eqvae_composer.evaluation.reference import reference_transform

__all__ = [
    'PROTOCOLS',
    'ImageFolderDataset',
    'IndexedDataset',
    'ReferenceImageFolder',
    'build_eval_dataset',
    'dataset_size',
    'load_eval_image',
    'rank_shard',
    'reference_shard',
]

#: ``build_eval_dataset``'s protocols: ours, and the reference eval.py's.
PROTOCOLS = ('default', 'reference')


def load_eval_image(path: str | os.PathLike, resolution: int = 256) -> torch.Tensor:
    """One image file with the eval transform, ``FloatTensor[3, resolution, resolution]`` in [-1, 1].

    Args:
        path (str | PathLike): the image file.
        resolution (int): output side in pixels. Default: ``256``.
    """
    with Image.open(path) as img:
        return to_tensor(decode_crop_resize(img, eval_box(*img.size), resolution))


class ImageFolderDataset(Dataset):
    """Every image under a folder (recursively, sorted by path) with the eval transform.

    The transform is the training data's eval transform (shorter side resized to ``resolution``,
    centre crop; antialiased bicubic), so folder and MDS inputs give the same pixels.

    Args:
        root (str | PathLike): the folder.
        resolution (int): output side in pixels. Default: ``256``.
        output_key (str): key of the image tensor in each sample. Default: ``'image'``.

    Raises:
        FileNotFoundError: ``root`` is not a folder or holds no images.
    """

    def __init__(self, root: str | os.PathLike, resolution: int = 256, output_key: str = 'image') -> None:
        self.files = [f.path for f in list_folder(str(root))[0].files]
        if not self.files:
            raise FileNotFoundError(f'no images found under {root}.')
        self.resolution = resolution
        self.output_key = output_key

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {self.output_key: load_eval_image(self.files[index], self.resolution)}


class ReferenceImageFolder(ImageFolder):
    """A folder read as the reference's eval.py reads it (L60-68): torchvision's ``ImageFolder`` + its transform.

    Images must sit in class subfolders (ImageNet val sorted into its synset folders); the order
    is ``ImageFolder``'s (classes sorted, then files), which decides the samples a multi-rank run
    repeats (``reference_shard``).

    Args:
        root (str | PathLike): the folder.
        resolution (int): output side in pixels. Default: ``256``.
        output_key (str): key of the image tensor in each sample. Default: ``'image'``.

    Raises:
        FileNotFoundError: ``root`` has no class subfolder holding images.
    """

    def __init__(self, root: str | os.PathLike, resolution: int = 256, output_key: str = 'image') -> None:
        try:
            super().__init__(str(root), transform=reference_transform(resolution))
        except FileNotFoundError as error:
            raise FileNotFoundError(
                f"--protocol reference reads --data as torchvision's ImageFolder, as the reference eval.py does: "
                f"images inside class subfolders of {root} (move a flat folder's images into one subfolder). {error}"
            ) from error
        self.output_key = output_key

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {self.output_key: super().__getitem__(index)[0]}


class IndexedDataset(Dataset):
    """Adds each sample's index in the full dataset (``'index'``), which seeds its posterior noise."""

    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        self.subset = Subset(dataset, indices)
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict[str, Any]:
        return {**self.subset[position], 'index': self.indices[position]}


def build_eval_dataset(
    data: str | os.PathLike, resolution: int = 256, protocol: str = 'default', **streaming_kwargs: Any
) -> Dataset:
    """The eval dataset at ``data``: an MDS folder or remote (has ``index.json``) or an image folder.

    Args:
        data (str | PathLike): a local MDS folder, a remote MDS URL (``s3://...``), or an image folder.
        resolution (int): output side in pixels. Default: ``256``.
        protocol (str): ``'default'``, or ``'reference'`` for the reference's ``ReferenceImageFolder``
            (image folders only). Default: ``'default'``.
        **streaming_kwargs: more ``StreamingImageDataset`` arguments (e.g. ``image_column``).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f'unknown protocol {protocol!r}; choose from {list(PROTOCOLS)}.')
    data = str(data)
    if protocol == 'reference':
        if '://' in data or os.path.isfile(os.path.join(data, 'index.json')):
            raise ValueError(
                f'--protocol reference reads an image folder, as the reference eval.py does; {data} is an MDS '
                f'dataset. Pass the folder of images it was converted from.'
            )
        return ReferenceImageFolder(data, resolution)
    if '://' in data:
        return StreamingImageDataset(remote=data, resolution=resolution, train=False, **streaming_kwargs)
    if os.path.isfile(os.path.join(data, 'index.json')):
        return StreamingImageDataset(local=data, resolution=resolution, train=False, **streaming_kwargs)
    if not os.path.isdir(data):
        raise FileNotFoundError(f'--data {data} is neither an MDS dataset (no index.json) nor an image folder.')
    return ImageFolderDataset(data, resolution)


def dataset_size(dataset: Dataset) -> int:
    """Samples in the whole dataset (a ``StreamingDataset``'s ``len`` is one rank's share)."""
    return int(getattr(dataset, 'num_samples', None) or len(dataset))  # type: ignore[arg-type]


def rank_shard(num_samples: int, rank: int, world_size: int) -> list[int]:
    """Indices rank ``rank`` of ``world_size`` evaluates: disjoint, together exactly ``range(num_samples)``."""
    return list(range(rank, num_samples, world_size))


def reference_shard(num_samples: int, rank: int, world_size: int) -> list[int]:
    """Indices rank ``rank`` evaluates under ``--protocol reference``: its ``DistributedSampler`` (eval.py L69).

    The sampler's defaults: a permutation seeded 0, padded with its own first indices to a multiple
    of ``world_size`` (so some images count twice when ``world_size`` does not divide
    ``num_samples``), then every ``world_size``-th index from ``rank``.
    """
    return list(DistributedSampler(range(num_samples), num_replicas=world_size, rank=rank, shuffle=True, seed=0))
