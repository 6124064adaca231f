"""How each kind of input file is stored (or skipped), and that what is stored decodes to the right RGB."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from eqvae_composer.data.images import PreparedImage, SkippedImage, prepare_image, to_rgb
from eqvae_composer.data.transforms import decode_crop_resize, eval_box, open_image, to_tensor
from tests.data_fixtures import jpeg_bytes, photo


def _png(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format='PNG', **kwargs)
    return buf.getvalue()


def _stored_rgb(result: PreparedImage | SkippedImage) -> np.ndarray:
    """Decode what was stored the way the loader does, as an array."""
    assert isinstance(result, PreparedImage), result
    img = to_rgb(Image.open(io.BytesIO(result.data)))
    assert img.mode == 'RGB'
    return np.asarray(img).astype(np.int16)


def test_rgb_jpeg_bytes_kept_as_is():
    data = jpeg_bytes(photo(64, 48))
    result = prepare_image(data)
    assert isinstance(result, PreparedImage)
    assert result.data == data and result.action == 'kept' and (result.width, result.height) == (64, 48)


def test_jpeg_with_trailer_after_end_marker_kept():
    data = jpeg_bytes(photo(64, 48)) + b'camera maker trailer' * 10
    result = prepare_image(data)
    assert isinstance(result, PreparedImage) and result.action == 'kept'


@pytest.mark.parametrize('progressive', [False, True])
def test_truncated_jpeg_skipped(progressive):
    data = jpeg_bytes(photo(256, 192), progressive=progressive)
    result = prepare_image(data[: len(data) // 2])
    assert isinstance(result, SkippedImage)
    assert 'truncated' in result.reason


def test_zero_byte_and_non_image_skipped():
    assert prepare_image(b'') == SkippedImage('empty file')
    result = prepare_image(b'just some text, not a JPEG\n' * 20)
    assert isinstance(result, SkippedImage) and 'not an image' in result.reason


def test_corrupt_png_skipped():
    data = bytearray(_png(photo(64, 64)))
    data[200:260] = b'\0' * 60  # inside the first IDAT chunk: CRC and zlib stream both break
    assert isinstance(prepare_image(bytes(data)), SkippedImage)


def test_grayscale_jpeg_kept_and_decodes_to_rgb():
    gray = photo(40, 30).convert('L')
    data = jpeg_bytes(gray)
    result = prepare_image(data)
    assert isinstance(result, PreparedImage) and result.data == data
    rgb = _stored_rgb(result)
    assert rgb.shape == (30, 40, 3)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()


def test_cmyk_jpeg_reencoded_losslessly_to_rgb():
    source = photo(48, 32)
    data = jpeg_bytes(source.convert('CMYK'), quality=95)
    result = prepare_image(data)
    assert isinstance(result, PreparedImage) and result.action == 'cmyk'
    assert Image.open(io.BytesIO(result.data)).format == 'PNG'
    # The PNG holds exactly PIL's RGB decode of the CMYK JPEG; and that is close to the original colours.
    expected = np.asarray(Image.open(io.BytesIO(data)).convert('RGB')).astype(np.int16)
    np.testing.assert_array_equal(_stored_rgb(result), expected)
    assert np.abs(expected - np.asarray(source).astype(np.int16)).mean() < 6


def test_palette_png_with_transparency():
    img = Image.new('P', (8, 4))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red, 1 blue
    img.paste(1, (4, 0, 8, 4))
    data = _png(img, transparency=1)  # blue half transparent
    result = prepare_image(data)
    rgb = _stored_rgb(result)
    assert result.action == 'mode-P'
    np.testing.assert_array_equal(rgb[:, :4], np.broadcast_to([255, 0, 0], (4, 4, 3)))
    np.testing.assert_array_equal(rgb[:, 4:], np.broadcast_to([255, 255, 255], (4, 4, 3)))  # over white


def test_palette_png_opaque():
    img = photo(16, 16).quantize(8)
    rgb = _stored_rgb(prepare_image(_png(img)))
    np.testing.assert_array_equal(rgb, np.asarray(img.convert('RGB')))


def test_rgba_composited_over_white():
    array = np.zeros((4, 4, 4), np.uint8)
    array[..., 1] = 200  # green
    array[:, :2, 3] = 255  # left opaque
    array[:, 2:, 3] = 0  # right fully transparent
    rgb = _stored_rgb(prepare_image(_png(Image.fromarray(array, 'RGBA'))))
    np.testing.assert_array_equal(rgb[:, :2], np.broadcast_to([0, 200, 0], (4, 2, 3)))
    np.testing.assert_array_equal(rgb[:, 2:], np.broadcast_to([255, 255, 255], (4, 2, 3)))


def test_16bit_grayscale_png_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 65535, 257 * 7]], dtype=np.uint16)
    data = _png(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode.startswith('I')
    rgb = _stored_rgb(prepare_image(data))
    np.testing.assert_array_equal(rgb[0, :, 0], [0, 100, 255, 7])


def test_exif_rotated_jpeg_stored_upright():
    # Stored 80x40: left half red, right half blue. Orientation 6 = "rotate 90 degrees clockwise to
    # display", so the displayed image is 40 wide, 80 tall, red on top, blue at the bottom.
    array = np.zeros((40, 80, 3), np.uint8)
    array[:, :40] = (255, 0, 0)
    array[:, 40:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    result = prepare_image(jpeg_bytes(Image.fromarray(array), quality=95, exif=exif))
    assert isinstance(result, PreparedImage) and result.action == 'exif-rotated'
    stored = Image.open(io.BytesIO(result.data))
    assert stored.getexif().get(0x0112, 1) == 1  # the loader must not rotate again
    rgb = _stored_rgb(result)
    assert rgb.shape == (80, 40, 3)
    assert np.abs(rgb[5:35].mean((0, 1)) - [255, 0, 0]).max() < 8  # top: red
    assert np.abs(rgb[45:75].mean((0, 1)) - [0, 0, 255]).max() < 8  # bottom: blue


def test_other_formats_stored_as_png():
    img = photo(20, 10)
    buf = io.BytesIO()
    img.save(buf, format='BMP')
    result = prepare_image(buf.getvalue())
    assert result.action == 'format-BMP'
    np.testing.assert_array_equal(_stored_rgb(result), np.asarray(img))


def test_rgb_png_bytes_kept():
    data = _png(photo(20, 10))
    result = prepare_image(data)
    assert result.action == 'kept' and result.data == data


def test_min_side_downsizes_once():
    big = photo(400, 300)
    result = prepare_image(jpeg_bytes(big), min_side=100)
    assert isinstance(result, PreparedImage) and result.action == 'resized'
    assert (result.width, result.height) == (133, 100)
    assert Image.open(io.BytesIO(result.data)).format == 'JPEG'
    png = prepare_image(_png(big), min_side=100)
    assert Image.open(io.BytesIO(png.data)).format == 'PNG' and (png.width, png.height) == (133, 100)
    small = jpeg_bytes(photo(90, 120))
    assert prepare_image(small, min_side=100).data == small  # shorter side within the limit: untouched


def test_image_smaller_than_training_size_upsampled():
    result = prepare_image(jpeg_bytes(photo(20, 12)))
    assert isinstance(result, PreparedImage) and result.action == 'kept'
    img = open_image(result.data)
    tensor = to_tensor(decode_crop_resize(img, eval_box(*img.size), 64))
    assert tensor.shape == (3, 64, 64) and tensor.min() >= -1 and tensor.max() <= 1
