"""Eval-transformed images from an MDS dataset or a plain image folder, for tools that only read images."""

from __future__ import annotations

import os

from torch.utils.data import DataLoader

from eqvae_composer.evaluation.datasets import build_eval_dataset

__all__ = ['image_loader']


def image_loader(data: str | os.PathLike, resolution: int = 256, batch_size: int = 8) -> DataLoader:
    """Batches ``{'image': [B, 3, R, R]}`` of ``data`` in order, with the eval transform.

    Args:
        data: what ``build_eval_dataset`` reads: an MDS folder or URL (has ``index.json``) or an image folder.
        resolution: output side in pixels. Default: ``256``.
        batch_size: images per batch. Default: ``8``.
    """
    # batch_size reaches StreamingDataset's partitioning (MDS) and is ignored by the folder dataset.
    dataset = build_eval_dataset(data, resolution, batch_size=batch_size)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)
