"""Finding the images of a raw dataset on disk: folder trees, ImageNet, OpenImages.

A source yields, per split, a sorted list of files (and labels) so that the conversion writes the
same samples in the same order every time, whatever the number of workers.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    'IMAGE_EXTENSIONS',
    'SOURCES',
    'SourceFile',
    'SplitListing',
    'list_folder',
    'list_imagenet',
    'list_openimages',
    'subset',
]

#: File extensions considered candidate images (case-insensitive); other files are counted, not read.
IMAGE_EXTENSIONS = frozenset(
    {'.jpg', '.jpeg', '.jpe', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm', '.pbm', '.pnm'}
)

#: Sources backed by files on disk (``demo`` is generated, see :mod:`eqvae_composer.data.demo`).
SOURCES = ('folder', 'imagenet', 'openimages')

_IMAGENET_SPLITS = ('train', 'val')
_OPENIMAGES_SPLITS = ('train', 'validation', 'test')
_IMAGENET_VAL_CSV = 'LOC_val_solution.csv'


@dataclass(frozen=True)
class SourceFile:
    """One candidate image.

    Attributes:
        path: Path to read.
        key: Path relative to the source root, POSIX separators (the ``key`` column).
        label: Integer class, for labelled sources.
    """

    path: str
    key: str
    label: int | None = None


@dataclass
class SplitListing:
    """The candidates of one split.

    Attributes:
        name: Split name, used as the output subfolder; ``None`` writes to the output root.
        files: Candidates in output order.
        labelled: Whether the split has a ``label`` column.
        skipped: ``(path, reason)`` for files rejected before reading (e.g. no label).
        ignored: Count of files without an image extension, per extension.
    """

    name: str | None
    files: list[SourceFile]
    labelled: bool = False
    skipped: list[tuple[str, str]] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _count_ignored(ignored: dict[str, int], name: str) -> None:
    ext = os.path.splitext(name)[1].lower() or '(none)'
    ignored[ext] = ignored.get(ext, 0) + 1


def _key_prefix(folder: str, rel_to: str) -> str:
    """What goes before a file name in the key of a file in ``folder``: its path from ``rel_to``, ``/``-separated."""
    relative = os.path.relpath(folder, rel_to).replace(os.sep, '/')
    return '' if relative == '.' else relative + '/'


def _walk_images(root: str, rel_to: str, ignored: dict[str, int]) -> list[tuple[str, str]]:
    """Every image file under ``root`` as sorted ``(path, key)``; hidden entries skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
        # One relpath per folder: per file it cost a tenth of a 2-worker conversion's time.
        key_prefix = _key_prefix(dirpath, rel_to)
        for name in sorted(filenames):
            if name.startswith('.'):
                continue
            if _is_image_name(name):
                found.append((os.path.join(dirpath, name), key_prefix + name))
            else:
                _count_ignored(ignored, name)
    return found


def _flat_images(folder: str, rel_to: str, ignored: dict[str, int]) -> list[tuple[str, str]]:
    found = []
    key_prefix = _key_prefix(folder, rel_to)
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith('.') or not entry.is_file():
            continue
        if _is_image_name(entry.name):
            found.append((entry.path, key_prefix + entry.name))
        else:
            _count_ignored(ignored, entry.name)
    return found


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f'{what} not found: {path}')


def list_folder(root: str, split: str | None = None) -> list[SplitListing]:
    """Every image in a directory tree, recursively, in sorted path order.

    Args:
        root: Directory to search.
        split: Output subfolder name; ``None`` writes to the output root. Default: ``None``.

    Returns:
        list[SplitListing]: One listing.
    """
    _require_dir(root, 'Input folder')
    ignored: dict[str, int] = {}
    files = [SourceFile(path, key) for path, key in _walk_images(root, root, ignored)]
    return [SplitListing(split, files, ignored=ignored)]


def _find_val_csv(root: str, labels_csv: str | None) -> str | None:
    if labels_csv:
        if not os.path.isfile(labels_csv):
            raise FileNotFoundError(f'ImageNet validation labels not found: {labels_csv}')
        return labels_csv
    # The Kaggle download puts the CSV at its top, three levels above ILSVRC/Data/CLS-LOC.
    candidates = [os.path.join(root, 'val', _IMAGENET_VAL_CSV)]
    folder = os.path.abspath(root)
    for _ in range(4):
        candidates.append(os.path.join(folder, _IMAGENET_VAL_CSV))
        folder = os.path.dirname(folder)
    return next((c for c in candidates if os.path.isfile(c)), None)


def _read_val_csv(path: str) -> dict[str, str]:
    """``ImageId -> wnid`` from ``LOC_val_solution.csv`` (first box's synset; all boxes share it)."""
    with open(path, newline='') as f:
        return {row['ImageId']: row['PredictionString'].split()[0] for row in csv.DictReader(f)}


def _class_dirs(folder: str) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith('.'))


def list_imagenet(root: str, splits: Sequence[str] | None = None, labels_csv: str | None = None) -> list[SplitListing]:
    """ImageNet (ILSVRC-2012 CLS-LOC) splits with integer labels.

    Labels index the sorted class folders of ``train/`` (or of the split itself when there is no
    ``train/``), the convention of torchvision's ``ImageFolder`` and of the reference code.
    ``val/`` may hold class folders, or be flat with the official ``LOC_val_solution.csv``.

    Args:
        root: Folder containing ``train/`` and/or ``val/``.
        splits: Splits to list. Default: those of ``train``, ``val`` that exist.
        labels_csv: Path of ``LOC_val_solution.csv`` for a flat ``val/``. Default: searched for in
            ``root/val``, ``root`` and up to three parents of ``root``.

    Returns:
        list[SplitListing]: One labelled listing per split.
    """
    _require_dir(root, 'ImageNet root')
    splits = list(splits or [s for s in _IMAGENET_SPLITS if os.path.isdir(os.path.join(root, s))])
    if not splits:
        raise FileNotFoundError(f'No ImageNet split folders ({", ".join(_IMAGENET_SPLITS)}) found in {root}')
    train_dir = os.path.join(root, 'train')
    classes = _class_dirs(train_dir) if os.path.isdir(train_dir) else None
    listings = []
    for split in splits:
        split_dir = os.path.join(root, split)
        _require_dir(split_dir, f'ImageNet split {split!r}')
        ignored: dict[str, int] = {}
        skipped: list[tuple[str, str]] = []
        files = []
        class_dirs = _class_dirs(split_dir)
        if class_dirs:
            split_classes = classes or class_dirs
            index = {wnid: i for i, wnid in enumerate(split_classes)}
            split_prefix = _key_prefix(split_dir, root)
            for path, key in _walk_images(split_dir, root, ignored):
                parts = key[len(split_prefix) :].split('/')
                if len(parts) == 1:
                    skipped.append((path, 'not inside a class folder'))
                elif parts[0] in index:
                    files.append(SourceFile(path, key, index[parts[0]]))
                else:
                    skipped.append((path, f'class folder {parts[0]!r} is not one of the {len(index)} train classes'))
        else:
            csv_path = _find_val_csv(root, labels_csv)
            if csv_path is None:
                raise FileNotFoundError(
                    f'{split_dir} has no class folders and no {_IMAGENET_VAL_CSV} was found; '
                    f'pass its path with --labels-csv'
                )
            wnids = _read_val_csv(csv_path)
            index = {wnid: i for i, wnid in enumerate(classes or sorted(set(wnids.values())))}
            for path, key in _flat_images(split_dir, root, ignored):
                wnid = wnids.get(os.path.splitext(os.path.basename(path))[0])
                if wnid in index:
                    files.append(SourceFile(path, key, index[wnid]))
                else:
                    skipped.append((path, f'no known label in {csv_path}'))
        listings.append(SplitListing(split, files, labelled=True, skipped=skipped, ignored=ignored))
    return listings


def list_openimages(root: str, splits: Sequence[str] | None = None) -> list[SplitListing]:
    """OpenImages: flat folders of JPEGs, one per split.

    Args:
        root: Folder containing split folders (``train/``, ``validation/``, ``test/``, or those named
            in ``splits``), or itself a flat folder of images (written to the output root).
        splits: Split folders to list. Default: the standard ones that exist.

    Returns:
        list[SplitListing]: One listing per split.
    """
    _require_dir(root, 'OpenImages root')
    if not splits:
        splits = [s for s in _OPENIMAGES_SPLITS if os.path.isdir(os.path.join(root, s))]
        if not splits:
            ignored: dict[str, int] = {}
            files = [SourceFile(p, k) for p, k in _flat_images(root, root, ignored)]
            return [SplitListing(None, files, ignored=ignored)]
    listings = []
    for split in splits:
        split_dir = os.path.join(root, split)
        _require_dir(split_dir, f'OpenImages split {split!r}')
        ignored = {}
        files = [SourceFile(p, k) for p, k in _flat_images(split_dir, root, ignored)]
        listings.append(SplitListing(split, files, ignored=ignored))
    return listings


def subset(files: list[SourceFile], limit: int | None) -> list[SourceFile]:
    """At most ``limit`` files, evenly spaced so a quick subset still spans every class.

    Args:
        files: Candidates in output order.
        limit: Maximum count; ``None`` keeps all.

    Returns:
        list[SourceFile]: The subset, in the original order.
    """
    if limit is None or limit >= len(files):
        return files
    return [files[i * len(files) // limit] for i in range(limit)]
