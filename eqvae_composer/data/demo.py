"""The bundled demo set: crops of the colour photographs that ship inside scikit-image.

No download: the photographs are files in the installed ``skimage/data`` package folder. The eval
split uses photographs that never appear in training, so it measures reconstruction of unseen
images, as the real ImageNet-val evaluation does.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

__all__ = [
    'DEMO_CROP_SIDES',
    'DEMO_EVAL_PHOTOS',
    'DEMO_TRAIN_PHOTOS',
    'demo_crops',
    'random_crops',
    'write_demo_folders',
]

#: Photographs cropped for training (file names in ``skimage/data``).
DEMO_TRAIN_PHOTOS = (
    'astronaut.png',
    'rocket.jpg',
    'hubble_deep_field.jpg',
    'motorcycle_left.png',
    'motorcycle_right.png',
    'retina.jpg',
    'ihc.png',
)
#: Held-out photographs cropped for the eval split.
DEMO_EVAL_PHOTOS = ('chelsea.png', 'coffee.png')

#: Inclusive range of crop widths/heights in pixels: the demo trains at 64 px, so its crops are downsampled.
DEMO_CROP_SIDES = (96, 192)
_MAX_ASPECT = 1.25  # "square-ish": the reference crop takes a square of the shorter side anyway
_SEED = 0


def _skimage_data_dir() -> str:
    import skimage.data  # only the demo needs scikit-image

    return os.path.dirname(skimage.data.__file__)


def random_crops(
    image: Image.Image, count: int, seed: int, crop_sides: tuple[int, int], name: str = 'the image'
) -> list[Image.Image]:
    """Deterministic random crops of one image, square-ish (aspect at most 1.25), at random positions.

    Args:
        image: The image to crop.
        count: Number of crops.
        seed: Seed of the crop positions and sizes.
        crop_sides: Inclusive range of the crops' sides in pixels; at most the image's shorter side.
        name: What the error message calls the image. Default: ``'the image'``.

    Returns:
        list[Image.Image]: Crops with sides in ``crop_sides``, in ``image``'s mode.

    Raises:
        ValueError: ``crop_sides`` is empty or does not fit inside the image.
    """
    if min(crop_sides) < 1 or max(crop_sides) > min(image.size) or crop_sides[0] > crop_sides[1]:
        raise ValueError(
            f'crop_sides {tuple(crop_sides)} must lie within [1, {min(image.size)}] for {name} {image.size}.'
        )
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(count):
        height = int(rng.integers(crop_sides[0], crop_sides[1] + 1))
        width = int(np.clip(round(height * rng.uniform(1 / _MAX_ASPECT, _MAX_ASPECT)), *crop_sides))
        left = int(rng.integers(0, image.width - width + 1))
        top = int(rng.integers(0, image.height - height + 1))
        crops.append(image.crop((left, top, left + width, top + height)))
    return crops


def demo_crops(photo: str, count: int, seed: int, crop_sides: tuple[int, int] = DEMO_CROP_SIDES) -> list[Image.Image]:
    """Deterministic random crops of one scikit-image photograph (see ``random_crops``).

    Args:
        photo: File name in ``skimage/data``.
        count: Number of crops.
        seed: Seed of the crop positions and sizes.
        crop_sides: Inclusive range of the crops' sides in pixels; at most the photograph's shorter
            side (300 px for ``chelsea.png``). Default: ``DEMO_CROP_SIDES``, [96, 192].

    Returns:
        list[Image.Image]: ``RGB`` crops with sides in ``crop_sides`` and aspect at most 1.25.
    """
    with Image.open(os.path.join(_skimage_data_dir(), photo)) as f:
        img = f.convert('RGB')
    return random_crops(img, count, seed, crop_sides, name=photo)


def write_demo_folders(
    root: str,
    *,
    train_per_photo: int = 48,
    eval_per_photo: int = 20,
    crop_sides: tuple[int, int] = DEMO_CROP_SIDES,
) -> dict[str, str]:
    """Write the demo crops as PNG files, one folder per split.

    Args:
        root: Folder to write ``train/<photo>/NNNN.png`` and ``val/<photo>/NNNN.png`` into.
        train_per_photo: Crops per training photograph. Default: ``48`` (336 images).
        eval_per_photo: Crops per held-out photograph. Default: ``20`` (40 images).
        crop_sides: Range of the crops' sides (see ``demo_crops``). Default: ``DEMO_CROP_SIDES``.

    Returns:
        dict[str, str]: Split name -> folder, ready for
        :func:`~eqvae_composer.data.sources.list_folder`.
    """
    folders = {}
    for split, photos, count in (
        ('train', DEMO_TRAIN_PHOTOS, train_per_photo),
        ('val', DEMO_EVAL_PHOTOS, eval_per_photo),
    ):
        folders[split] = os.path.join(root, split)
        for p, photo in enumerate(photos):
            folder = os.path.join(folders[split], os.path.splitext(photo)[0])
            os.makedirs(folder, exist_ok=True)
            # Seeds differ per split and photo so no two photographs share a crop pattern.
            for i, crop in enumerate(demo_crops(photo, count, _SEED + 1000 * (split == 'val') + p, crop_sides)):
                crop.save(os.path.join(folder, f'{i:04d}.png'), compress_level=1)
    return folders
