"""The image preprocessing of DiT/ADM feature extraction, so latents match what those trainers expect.

``center_crop_arr`` is DiT's ``train.py`` function (from ADM's ``image_datasets.py``), line for line:
halve with a box filter while the shorter side is at least twice the target, resize the shorter side
to the target with bicubic, then take the centre square. Its pixels differ from the EQ-VAE eval
transform's (antialiased bicubic in one step), which is why the encoder has its own. One difference
before it: images with transparency are composited over white (``data.images.to_rgb``, as the rest of
this package does), where DiT's ``convert('RGB')`` drops the alpha channel; opaque images are identical.
And one in the input: ``convert_dataset.py`` stores EXIF-rotated photos upright, where DiT's ``ImageFolder``
loader ignores the EXIF tag (see the README's "Latents for diffusion training").
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from eqvae_composer.data.images import to_rgb
from eqvae_composer.data.transforms import to_tensor

__all__ = ['CROPS', 'center_crop_arr', 'preprocess_image']

#: Values of ``--crop``: DiT/ADM's centre crop.
CROPS = ('adm',)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM's centre crop, as DiT's ``train.py`` and ``extract_features.py`` apply it.

    Args:
        pil_image: An RGB image.
        image_size: Side of the square output.

    Returns:
        Image.Image: ``image_size`` x ``image_size`` pixels.
    """
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])


def preprocess_image(img: Image.Image, resolution: int) -> torch.Tensor:
    """Decode, convert to RGB, ADM-crop and scale to [-1, 1] (DiT's ``ToTensor`` + ``Normalize(0.5, 0.5)``).

    Args:
        img: Any PIL image (decoded here if it was opened lazily).
        resolution: Output side.

    Returns:
        torch.Tensor: ``float32 [3, resolution, resolution]``.
    """
    return to_tensor(center_crop_arr(to_rgb(img), resolution))
