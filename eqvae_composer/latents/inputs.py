"""What ``--data`` can be for the latent encoder: an image MDS dataset (local or remote) or an image folder.

The encoder reads samples by index, one record at a time, and needs them raw (its own crop), with
their label and a stable key, and an undecodable image reported rather than raised: these sources
give that. A shard that cannot be downloaded or read raises: it is the store's problem, not the sample's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from PIL import Image, UnidentifiedImageError

from eqvae_composer.compat import init_streaming_dataset
from eqvae_composer.data.convert import is_remote
from eqvae_composer.data.dataset import check_local_dataset
from eqvae_composer.data.sources import list_folder
from eqvae_composer.data.transforms import open_image

__all__ = [
    'IMAGE_COLUMNS',
    'LABEL_COLUMNS',
    'FolderImages',
    'ImageRecord',
    'MDSImages',
    'ShardReadError',
    'open_images',
]

#: Image columns looked for, in order: ours, ``streaming.vision.convert.imagenet``'s, webdataset-style names.
IMAGE_COLUMNS = ('image', 'x', 'jpg', 'png', 'img')
#: Label columns looked for, in order.
LABEL_COLUMNS = ('label', 'y', 'cls', 'class')


class ShardReadError(RuntimeError):
    """A shard of the input could not be downloaded or read (a resumed run picks up where this one stopped)."""


@dataclass
class ImageRecord:
    """One input sample: an image (not yet decoded), its label, its key; or why it could not be read."""

    key: str
    image: Image.Image | None = None
    label: int | None = None
    error: str | None = None


#: What decoding one image can raise; anything else reading a sample is a problem of the shard or the store.
_IMAGE_ERRORS = (UnidentifiedImageError, Image.DecompressionBombError, SyntaxError)


def _unreadable(error: Exception) -> str:
    # PIL's message for an unknown format names the BytesIO object's address: not a stable reason.
    if isinstance(error, UnidentifiedImageError):
        return 'not a readable image (unknown format)'
    return f'not a readable image ({type(error).__name__}: {error})'


def _first_present(columns: list[str], wanted: tuple[str, ...], given: str | None) -> str | None:
    if given is not None:
        if given not in columns:
            raise KeyError(f'The dataset has no column {given!r} (columns: {sorted(columns)}).')
        return given
    return next((c for c in wanted if c in columns), None)


class MDSImages:
    """Samples of an MDS dataset by index, through ``StreamingDataset`` (so remote shards download on demand).

    Args:
        local: Local folder (the dataset, or the cache of ``remote``).
        remote: Remote URL. Default: ``None``.
        image_column: Column with the image. Default: the first of ``IMAGE_COLUMNS`` present.
        label_column: Column with the integer label. Default: the first of ``LABEL_COLUMNS`` present, if any.

    Raises:
        FileNotFoundError: A local-only dataset has no ``index.json``.
        KeyError: No image column (or not the one named).
    """

    def __init__(
        self,
        local: str | None,
        remote: str | None = None,
        image_column: str | None = None,
        label_column: str | None = None,
    ) -> None:
        from streaming import StreamingDataset

        if remote is None:
            check_local_dataset(local)
        dataset = StreamingDataset.__new__(StreamingDataset)
        init_streaming_dataset(dataset.__init__, local=local, remote=remote, shuffle=False, batch_size=1)
        self.dataset = dataset
        self.source = remote or local
        columns = list(dataset.shards[0].column_names) if dataset.shards else []
        self.image_column = _first_present(columns, IMAGE_COLUMNS, image_column)
        if self.image_column is None:
            raise KeyError(
                f'{self.source} has no image column (looked for {", ".join(IMAGE_COLUMNS)}; columns: '
                f'{sorted(columns)}): pass --image-column.'
            )
        self.label_column = _first_present(columns, LABEL_COLUMNS, label_column)
        self.has_key = 'key' in columns

    @property
    def labelled(self) -> bool:
        return self.label_column is not None

    def __len__(self) -> int:
        return int(self.dataset.num_samples)

    def __getitem__(self, index: int) -> ImageRecord:
        try:
            sample: dict[str, Any] = self.dataset.get_item(index)
        except _IMAGE_ERRORS as error:  # streaming decoded a 'jpeg'/'png'/'pil' column: this sample only
            return ImageRecord(str(index), error=_unreadable(error))
        except Exception as error:
            # A failed download or unreadable shard is not this sample's fault, and streaming leaves
            # the shard half-prepared (the next read of it would wait forever): stop here instead.
            raise ShardReadError(
                f'cannot read sample {index} of {self.source} ({type(error).__name__}: {error}); '
                'the same command resumes once the shard is readable.'
            ) from error
        key = str(sample['key']) if self.has_key else str(index)
        label = int(sample[self.label_column]) if self.label_column else None
        try:
            image = open_image(sample[self.image_column])
        except Exception as error:
            return ImageRecord(key, label=label, error=_unreadable(error))
        return ImageRecord(key, image, label)


class FolderImages:
    """Every image under a folder (recursively, sorted by path), unlabelled; keys are relative paths.

    Raises:
        FileNotFoundError: ``root`` is not a folder or holds no image.
    """

    labelled = False

    def __init__(self, root: str) -> None:
        self.files = list_folder(root)[0].files
        if not self.files:
            raise FileNotFoundError(f'no images found under {root}.')
        self.source = root

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> ImageRecord:
        file = self.files[index]
        try:
            return ImageRecord(file.key, Image.open(file.path))
        except Exception as error:
            return ImageRecord(file.key, error=_unreadable(error))


def open_images(
    data: str, local: str | None = None, image_column: str | None = None, label_column: str | None = None
) -> MDSImages | FolderImages:
    """The records at ``data``: an MDS folder or URL (has ``index.json``) or an image folder.

    Args:
        data: Local MDS folder, remote MDS URL (``s3://...``), or image folder.
        local: Cache folder for a remote ``data``. Default: a temporary folder streaming picks.
        image_column: See :class:`MDSImages`.
        label_column: See :class:`MDSImages`.

    Raises:
        FileNotFoundError: ``data`` is neither.
    """
    if is_remote(data):
        return MDSImages(local, data, image_column, label_column)
    if os.path.isfile(os.path.join(data, 'index.json')):
        return MDSImages(data, None, image_column, label_column)
    if not os.path.isdir(data):
        raise FileNotFoundError(
            f'--data {data} is neither an MDS dataset (no index.json) nor an image folder. Convert images with '
            f'`python convert_dataset.py --source folder --input <images> --out {data}` or point to a folder of images.'
        )
    return FolderImages(data)
