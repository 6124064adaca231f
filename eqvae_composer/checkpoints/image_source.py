"""Eval-transformed images from an MDS dataset or a plain image folder, for tools that only read images.

MDS goes through the project's ``build_image_dataloader``. A plain folder is read with the same
listing (``list_folder``) and the same eval transform (shorter side resized, centre crop) as the
conversion and the dataset, so both give the pixels training would see.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from eqvae_composer.data.dataset import build_image_dataloader
from eqvae_composer.data.sources import list_folder
from eqvae_composer.data.transforms import decode_crop_resize, eval_box, open_image, to_tensor

__all__ = ['ImageFolder', 'image_loader']


class ImageFolder(Dataset):
    """Every image under ``root`` (sorted, recursive), eval-transformed to ``{'image': [3, R, R]}`` in [-1, 1].

    Args:
        root: the folder.
        resolution: output side in pixels. Default: ``256``.
    """

    def __init__(self, root: str | os.PathLike, resolution: int = 256) -> None:
        self.files = [f.path for listing in list_folder(str(root)) for f in listing.files]
        if not self.files:
            raise FileNotFoundError(f'no images found under {root}.')
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        img = open_image(Path(self.files[index]).read_bytes())
        return {'image': to_tensor(decode_crop_resize(img, eval_box(*img.size), self.resolution))}


def image_loader(data: str | os.PathLike, resolution: int = 256, batch_size: int = 8) -> DataLoader:
    """Batches ``{'image': [B, 3, R, R]}`` of ``data``: an MDS folder (has ``index.json``) or an image folder.

    Args:
        data: the dataset folder.
        resolution: output side in pixels. Default: ``256``.
        batch_size: images per batch. Default: ``8``.
    """
    if (Path(data) / 'index.json').is_file():
        return build_image_dataloader(
            batch_size=batch_size, drop_last=False, local=str(data), train=False, resolution=resolution,
        )
    return DataLoader(ImageFolder(data, resolution), batch_size=batch_size, shuffle=False)
