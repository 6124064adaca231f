"""Image bytes -> what goes into an MDS shard, and PIL images -> RGB.

The converter calls :func:`prepare_image` once per file; the loader calls :func:`to_rgb` once per
sample. Both live here so the colour-mode rules exist once.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ['JPEG_FORMATS', 'PreparedImage', 'SkippedImage', 'prepare_image', 'to_rgb']

#: PIL formats whose bytes are baseline/progressive JPEG streams (MPO = camera multi-picture JPEG,
#: whose first frame is an ordinary JPEG). These are written as-is when possible.
JPEG_FORMATS = frozenset({'JPEG', 'MPO'})

# PIL decodes these JPEG modes natively to something `convert('RGB')` handles exactly.
_JPEG_KEEP_MODES = frozenset({'RGB', 'L'})
# PNGs in these modes decode to RGB without any colour decision, so their bytes are kept.
_PNG_KEEP_MODES = frozenset({'RGB', 'L'})
_EXIF_ORIENTATION = 0x0112
_JPEG_EOI = b'\xff\xd9'
_JPEG_SOS = 0xDA
# Quality for the single lossy re-encode that `--min-side` performs on JPEG sources.
_RESIZED_JPEG_QUALITY = 95


@dataclass(frozen=True)
class PreparedImage:
    """An image ready to be written.

    Attributes:
        data: Encoded bytes for the ``image`` column (original JPEG bytes, or PNG/JPEG re-encode).
        width: Width of the stored image.
        height: Height of the stored image.
        action: ``'kept'`` when the original bytes are stored, otherwise the reasons for the re-encode
            joined by ``+``: ``exif-rotated``, ``cmyk``, ``mode-<MODE>``, ``format-<FORMAT>``, ``resized``.
    """

    data: bytes
    width: int
    height: int
    action: str


@dataclass(frozen=True)
class SkippedImage:
    """An unusable file.

    Attributes:
        reason: Human-readable reason, e.g. ``'empty file'`` or ``'truncated JPEG: ...'``.
    """

    reason: str


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL image to 8-bit RGB.

    Transparent images are composited over white (dropping alpha would expose whatever colour
    the encoder left under fully transparent pixels, often black). 16- and 32-bit greyscale is
    scaled down from the 16-bit range instead of clipped, which ``convert('L')`` would do.

    Args:
        img: Any PIL image.

    Returns:
        Image.Image: An ``RGB`` image (``img`` itself when it already is one).
    """
    if img.mode == 'RGB':
        return img
    if img.mode == 'P':
        img = img.convert('RGBA' if 'transparency' in img.info else 'RGB')
    elif img.mode in ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I'):
        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), mode='L')
    elif img.mode == 'F':
        img = Image.fromarray(np.clip(np.rint(np.asarray(img)), 0, 255).astype(np.uint8), mode='L')
    if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert('RGB')
    return img.convert('RGB')


def _encode_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    # compress_level 1: PNG is lossless at every level; level 6 costs ~4x the time for ~10% less.
    img.save(buf, format='PNG', compress_level=1)
    return buf.getvalue()


def _encode_jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    # 4:4:4 chroma: the stored image is the training source, so do not halve its colour resolution.
    img.save(buf, format='JPEG', quality=_RESIZED_JPEG_QUALITY, subsampling=0, optimize=True)
    return buf.getvalue()


def _jpeg_is_complete(data: bytes) -> bool:
    """Whether an end-of-image marker follows the main image's first scan.

    Entropy-coded data cannot contain ``FF D9`` (0xFF is always stuffed), so a download cut short
    has none after its first scan. Header segments are skipped by length because an EXIF
    thumbnail carries its own end marker. Trailers after the marker (MPF, maker notes) are fine.
    """
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == _JPEG_SOS:
            return data.rfind(_JPEG_EOI) > pos
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], 'big')
    return False


def _downsize(img: Image.Image, min_side: int) -> Image.Image:
    width, height = img.size
    scale = min_side / min(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # reducing_gap: box-reduce by an integer factor first, then Lanczos the rest; visually the same
    # as a pure Lanczos resize at a fraction of the cost on 4000 px photographs.
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def prepare_image(data: bytes, *, min_side: int | None = None) -> PreparedImage | SkippedImage:
    """Decide how one file is stored, or why it cannot be.

    JPEGs in RGB or greyscale, without an EXIF rotation, are stored byte for byte: only the header
    is parsed and the end-of-image marker checked, so the common case costs no decode. Everything
    else that decodes is converted to RGB (EXIF rotation applied, CMYK converted, alpha flattened)
    and stored as lossless PNG, so the loader never has to know about any of it. (Upright is what a
    viewer shows; torchvision's ``ImageFolder``, DiT's loader, ignores the tag and sees the stored grid.)

    Args:
        data: The file's bytes.
        min_side: If set, images whose shorter side exceeds it are resized (aspect kept, Lanczos)
            so the shorter side equals it, and re-encoded once: JPEG sources as quality-95 4:4:4
            JPEG, others as PNG. Default: ``None`` (never resize).

    Returns:
        PreparedImage | SkippedImage: What to write, or why the file is skipped.
    """
    if not data:
        return SkippedImage('empty file')
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format or 'unknown'
        width, height = img.size
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
        rotated = orientation not in (None, 1)
        too_big = min_side is not None and min(width, height) > min_side
        if fmt in JPEG_FORMATS and img.mode in _JPEG_KEEP_MODES and not rotated and not too_big:
            if not _jpeg_is_complete(data):
                # No end marker near the end: decode it (at 1/8 scale, cheap) to tell a truncated
                # file from one with a long trailer.
                img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
                img.load()
            return PreparedImage(data, width, height, 'kept')
        if fmt == 'PNG' and img.mode in _PNG_KEEP_MODES and not rotated and not too_big:
            img.load()  # a PNG's zlib stream is verified only by decoding it
            return PreparedImage(data, width, height, 'kept')

        img.load()
        reasons = ['exif-rotated'] if rotated else []
        if img.mode == 'CMYK':
            reasons.append('cmyk')
        elif img.mode not in _PNG_KEEP_MODES:
            reasons.append(f'mode-{img.mode}')
        if fmt not in JPEG_FORMATS and fmt != 'PNG':
            reasons.append(f'format-{fmt}')
        rgb = to_rgb(ImageOps.exif_transpose(img) if rotated else img)
        if too_big:
            reasons.append('resized')
            rgb = _downsize(rgb, min_side)  # type: ignore[arg-type]  # too_big implies min_side is set
            encoded = _encode_jpeg(rgb) if fmt in JPEG_FORMATS else _encode_png(rgb)
        else:
            encoded = _encode_png(rgb)
        action = '+'.join(reasons)
        return PreparedImage(encoded, rgb.width, rgb.height, action)
    except UnidentifiedImageError:
        return SkippedImage('not an image (unidentified format)')
    except Image.DecompressionBombError as exc:
        return SkippedImage(f'too many pixels: {exc}')
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL reports truncated/corrupt data as OSError ('image file is truncated'), SyntaxError
        # (bad PNG chunks) or ValueError/EOFError from individual plugins.
        return SkippedImage(f'corrupt or truncated ({type(exc).__name__}: {exc})')
