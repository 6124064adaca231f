"""The bundled demo set: crops of the colour photographs that ship inside scikit-image.

No download: the photographs are files in the installed ``skimage/data`` package folder. The eval
split uses photographs that never appear in training, so it measures reconstruction of unseen
images, as the real ImageNet-val evaluation does.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

__all__ = ['DEMO_EVAL_PHOTOS', 'DEMO_TRAIN_PHOTOS', 'demo_crops', 'write_demo_folders']

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

_CROP_SIDES = (96, 192)  # inclusive range of crop widths/heights in pixels
_MAX_ASPECT = 1.25  # "square-ish": the reference crop takes a square of the shorter side anyway
_SEED = 0


def _skimage_data_dir() -> str:
    import skimage.data  # only the demo needs scikit-image

    return os.path.dirname(skimage.data.__file__)


def demo_crops(photo: str, count: int, seed: int) -> list[Image.Image]:
    """Deterministic random crops of one scikit-image photograph.

    Args:
        photo: File name in ``skimage/data``.
        count: Number of crops.
        seed: Seed of the crop positions and sizes.

    Returns:
        list[Image.Image]: ``RGB`` crops with sides in [96, 192] and aspect at most 1.25.
    """
    with Image.open(os.path.join(_skimage_data_dir(), photo)) as f:
        img = f.convert('RGB')
    rng = np.random.default_rng(seed)
    crops = []
    for _ in range(count):
        height = int(rng.integers(_CROP_SIDES[0], _CROP_SIDES[1] + 1))
        width = int(np.clip(round(height * rng.uniform(1 / _MAX_ASPECT, _MAX_ASPECT)), *_CROP_SIDES))
        left = int(rng.integers(0, img.width - width + 1))
        top = int(rng.integers(0, img.height - height + 1))
        crops.append(img.crop((left, top, left + width, top + height)))
    return crops


def write_demo_folders(root: str, *, train_per_photo: int = 48, eval_per_photo: int = 20) -> dict[str, str]:
    """Write the demo crops as PNG files, one folder per split.

    Args:
        root: Folder to write ``train/<photo>/NNNN.png`` and ``val/<photo>/NNNN.png`` into.
        train_per_photo: Crops per training photograph. Default: ``48`` (336 images).
        eval_per_photo: Crops per held-out photograph. Default: ``20`` (40 images).

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
            for i, crop in enumerate(demo_crops(photo, count, seed=_SEED + 1000 * (split == 'val') + p)):
                crop.save(os.path.join(folder, f'{i:04d}.png'), compress_level=1)
    return folders
