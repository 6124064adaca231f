"""The reference training crop and eval transform (spec section 4), with reduced-size JPEG decoding.

An image is decoded by PIL (at 1/2, 1/4 or 1/8 size by libjpeg's DCT scaling when the crop is
downsampled by that much), then cropped and resized to ``resolution`` with PyTorch's antialiased
bicubic interpolation on ``uint8`` pixels. That kernel is PIL's filter (same a = -0.5 cubic, same
support scaling) vectorised, about 5x faster than ``Image.resize`` here, and like the reference's
crop-then-resize it only sees the crop's pixels. A box that does not fall on whole pixels (an eval
centre crop of an odd margin) is resized by PIL, which takes fractional boxes (and, near the box's
edges, also reads the pixels just outside it).

``resize_filter='area_cv2'`` resizes the crop as the reference's training data does instead: OpenCV's
``INTER_AREA`` on the ``uint8`` crop (zelaki/eqvae ``ldm/data/dataset.py``: ``SmallestMaxSize(...,
interpolation=cv2.INTER_AREA)`` at line 50, applied to the square crop at line 108).
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from eqvae_composer.data.images import JPEG_FORMATS, to_rgb

__all__ = [
    'Box',
    'RESIZE_FILTERS',
    'decode_crop_resize',
    'eval_box',
    'open_image',
    'sample_train_box',
    'to_tensor',
]

#: A crop in source pixel coordinates: (left, top, right, bottom).
Box = tuple[float, float, float, float]

# libjpeg can decode at 1/8, 1/4 and 1/2 scale; the output must keep >= `resolution` pixels across
# the crop, so the crop must be downsampled by at least this much before scaling pays off.
_MIN_DRAFT_FACTOR = 2
_RESAMPLE = Image.Resampling.BICUBIC
#: How a crop is resized to ``resolution``: PyTorch's antialiased bicubic (PIL's filter, the default)
#: or OpenCV's ``INTER_AREA`` (the reference's training crop; whole-pixel boxes only).
RESIZE_FILTERS = ('bicubic_aa', 'area_cv2')


def sample_train_box(width: int, height: int, rng: np.random.Generator) -> Box:
    """Sample the reference training crop: a square of side ``min_side * U(0.5, 1)`` anywhere.

    Args:
        width: Source image width.
        height: Source image height.
        rng: Source of randomness (two uniform draws for the side and one per axis for the offset).

    Returns:
        Box: The square crop, integer-valued, inside the image.
    """
    short = min(width, height)
    side = max(1, int(short * rng.uniform(0.5, 1.0)))
    left = int(rng.integers(0, width - side + 1))
    top = int(rng.integers(0, height - side + 1))
    return (left, top, left + side, top + side)


def eval_box(width: int, height: int) -> Box:
    """The centred square of side ``min(width, height)``.

    Resizing this box to ``resolution`` equals "resize the shorter side to ``resolution``, then
    centre crop", without the intermediate rounding of the longer side.

    Args:
        width: Source image width.
        height: Source image height.

    Returns:
        Box: The centred square crop.
    """
    short = min(width, height)
    left = (width - short) / 2
    top = (height - short) / 2
    return (left, top, left + short, top + short)


def open_image(obj: bytes | Image.Image) -> Image.Image:
    """Open an image column value lazily (header only), whether bytes or an already-open image.

    MDS ``bytes`` columns give bytes; ``jpeg``/``png`` columns (e.g. ``x`` from
    ``streaming.vision.convert.imagenet``) give a lazily opened PIL image; ``pil`` gives a decoded one.

    Args:
        obj: Encoded image bytes or a PIL image.

    Returns:
        Image.Image: The image, not yet decoded when it came as bytes.
    """
    if isinstance(obj, Image.Image):
        return obj
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return Image.open(io.BytesIO(obj))
    raise TypeError(f'Expected encoded image bytes or a PIL image in the image column, got {type(obj).__name__}.')


def _draft_scale(img: Image.Image, box: Box, resolution: int) -> int:
    """Largest DCT scale (1, 2, 4, 8) that keeps at least ``resolution`` pixels across the crop."""
    if img.format not in JPEG_FORMATS or getattr(img, 'tile', None) is None or len(img.tile) != 1:
        return 1  # not a JPEG, or already decoded: draft would do nothing
    factor = min(box[2] - box[0], box[3] - box[1]) / resolution
    if factor < _MIN_DRAFT_FACTOR:
        return 1
    for scale in (8, 4, 2):
        if factor >= scale:
            return scale
    return 1


def _is_whole(box: Box) -> bool:
    return all(float(v).is_integer() for v in box)


def decode_crop_resize(
    img: Image.Image,
    box: Box,
    resolution: int,
    *,
    draft: bool = True,
    resize_filter: str = 'bicubic_aa',
) -> torch.Tensor:
    """Decode ``img``, crop ``box`` and resize it to ``resolution`` x ``resolution`` RGB pixels.

    Args:
        img: A lazily opened image (see :func:`open_image`).
        box: Crop in the image's full-size pixel coordinates.
        resolution: Output side in pixels.
        draft: Decode JPEGs at reduced size when the crop is downsampled by 2x or more, keeping at
            least ``resolution`` pixels across the crop. The box is then rounded to whole decoded
            pixels: it moves by at most half a decoded pixel, under half an output pixel. Default: ``True``.
        resize_filter: One of ``RESIZE_FILTERS``; ``'area_cv2'`` needs a whole-pixel box.
            Default: ``'bicubic_aa'``.

    Returns:
        torch.Tensor: ``uint8`` pixels ``[3, resolution, resolution]``.
    """
    if resize_filter not in RESIZE_FILTERS:
        raise ValueError(f'resize_filter must be one of {RESIZE_FILTERS}, got {resize_filter!r}.')
    if resize_filter == 'area_cv2' and not _is_whole(box):
        raise ValueError(f'resize_filter area_cv2 resizes whole-pixel crops (the training crop), got the box {box}.')
    scale = _draft_scale(img, box, resolution) if draft else 1
    if scale > 1:
        width, height = img.size
        # Request 1/scale; PIL picks the largest libjpeg scale that still covers that size and
        # returns the full image's extent in decoded pixels (img.size is that, rounded up).
        drafted = img.draft('RGB', (width // scale, height // scale))
        if drafted is not None:
            _, extent = drafted
            sx, sy = extent[2] / width, extent[3] / height
            box = (round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy))
    rgb = to_rgb(img)
    if not _is_whole(box):
        resized = rgb.resize((resolution, resolution), _RESAMPLE, box=box)
        return torch.from_numpy(np.array(resized)).permute(2, 0, 1).contiguous()
    left, top, right, bottom = (int(v) for v in box)
    if resize_filter == 'area_cv2':
        return _resize_area_cv2(np.asarray(rgb)[top:bottom, left:right], resolution)
    # A writable copy of the crop only; HWC memory is channels_last for the [1, 3, h, w] view below,
    # the layout PyTorch's vectorised uint8 kernel reads.
    crop = torch.from_numpy(np.array(np.asarray(rgb)[top:bottom, left:right]))
    resized = F.interpolate(
        crop.permute(2, 0, 1).unsqueeze(0), size=(resolution, resolution), mode='bicubic', antialias=True
    )
    return resized[0].contiguous()


def _resize_area_cv2(crop: np.ndarray, resolution: int) -> torch.Tensor:
    """The reference's ``SmallestMaxSize(resolution, cv2.INTER_AREA)`` of a square ``uint8`` HWC crop."""
    import cv2  # opencv-python-headless; imported here, as only this filter needs it

    resized = cv2.resize(np.ascontiguousarray(crop), (resolution, resolution), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(resized).permute(2, 0, 1).contiguous()


def to_tensor(pixels: torch.Tensor | Image.Image) -> torch.Tensor:
    """``uint8`` pixels ``[3, H, W]`` (or an RGB PIL image) -> float tensor ``[3, H, W]`` in ``[-1, 1]``.

    Args:
        pixels: The output of :func:`decode_crop_resize`, or an ``RGB`` image.

    Returns:
        torch.Tensor: ``float32`` pixels scaled by ``x / 127.5 - 1``.
    """
    if isinstance(pixels, Image.Image):
        pixels = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1)  # a writable copy
    if pixels.dtype != torch.uint8:
        raise TypeError(f'to_tensor expects uint8 pixels, got {pixels.dtype}.')
    return pixels.float().div_(127.5).sub_(1.0)  # .float() copies, so the in-place ops are safe
