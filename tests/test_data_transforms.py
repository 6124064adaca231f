"""The reference crop, the eval transform, and reduced-size JPEG decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from eqvae_composer.data.transforms import decode_crop_resize, eval_box, open_image, sample_train_box, to_tensor
from tests.data_fixtures import jpeg_bytes, photo


def test_train_box_is_a_square_of_half_to_full_min_side_inside_the_image():
    rng = np.random.default_rng(0)
    sides = []
    for _ in range(2000):
        left, top, right, bottom = sample_train_box(300, 200, rng)
        assert right - left == bottom - top
        assert 0 <= left and right <= 300 and 0 <= top and bottom <= 200
        sides.append(right - left)
    sides = np.array(sides)
    assert sides.min() >= 100 and sides.max() <= 200
    assert abs(sides.mean() - 150) < 3  # U(0.5, 1) * 200


def test_train_box_positions_cover_the_image():
    rng = np.random.default_rng(1)
    lefts = [sample_train_box(1000, 100, rng)[0] for _ in range(500)]
    assert min(lefts) < 50 and max(lefts) > 850


def _hwc(pixels) -> np.ndarray:
    assert pixels.dtype == torch.uint8 and pixels.shape[0] == 3
    return pixels.permute(1, 2, 0).numpy().astype(np.float64)


@pytest.mark.parametrize('size', [(300, 200), (301, 200)])  # whole-pixel box (torch) and a half-pixel one (PIL)
def test_eval_box_equals_resize_shorter_side_then_center_crop(size):
    img = photo(*size)
    ours = _hwc(decode_crop_resize(img, eval_box(*size), 100))
    # Reference: resize the shorter side to 100 (-> 150 x 100), then centre crop 100 x 100.
    resized = img.resize((round(100 * size[0] / size[1]), 100), Image.Resampling.BICUBIC)
    left = (resized.width - 100) // 2
    reference = np.asarray(resized.crop((left, 0, left + 100, 100))).astype(np.float64)
    assert np.abs(ours - reference).mean() < 1.0


@pytest.mark.parametrize('box', [(0, 0, 200, 200), (37, 11, 337, 311), (100, 0, 160, 60)])  # down 0.8x, 1.2x; up 4x
def test_crop_resize_matches_pil_antialiased_bicubic(box):
    # PyTorch's uint8 kernel against PIL's Image.resize on the same crop: the same filter, so pixels
    # agree to rounding (PIL's box resize would also read pixels outside the box near its edges).
    img = photo(400, 320, seed=5)
    reference = np.asarray(img.crop(box).resize((256, 256), Image.Resampling.BICUBIC)).astype(np.float64)
    difference = np.abs(_hwc(decode_crop_resize(img, box, 256)) - reference)
    assert difference.mean() < 0.1 and np.quantile(difference, 0.999) <= 1


def _area_weights(size: int, out: int) -> np.ndarray:
    """``(out, size)``: the overlap of input pixel [j, j + 1] with output pixel i's span, over the span."""
    scale = size / out
    starts, ends = np.arange(out)[:, None] * scale, (np.arange(out)[:, None] + 1) * scale
    j = np.arange(size)[None, :]
    return np.clip(np.minimum(ends, j + 1) - np.maximum(starts, j), 0, None) / scale


@pytest.mark.parametrize('box', [(0, 0, 256, 256), (8, 40, 520, 552), (37, 11, 337, 311), (100, 0, 160, 60)])
def test_area_cv2_is_the_area_filter_on_the_crop(box):  # same size, down 2x, down 1.17x, up
    img = photo(600, 560, seed=3)
    ours = _hwc(decode_crop_resize(img, box, 256, resize_filter='area_cv2'))
    crop = np.asarray(img.crop(box)).astype(np.float64)
    side = box[2] - box[0]
    if side == 256:  # the reference does not resize a crop that is already the right size
        np.testing.assert_array_equal(ours, crop)
    elif side == 512:  # an exact 2x reduction: each pixel is the rounded mean of its 2 x 2 block
        block_means = crop.reshape(256, 2, 256, 2, 3).mean(axis=(1, 3))
        assert np.abs(ours - block_means).max() <= 0.5
    elif side > 256:  # a fractional reduction: each output pixel averages the input area it covers
        weights = _area_weights(side, 256)
        reference = np.stack([weights @ crop[..., c] @ weights.T for c in range(3)], axis=-1)
        assert np.abs(ours - reference).max() <= 0.5 + 1e-6  # the exact area average, rounded to uint8
    else:  # an enlargement: OpenCV's INTER_AREA interpolates bilinearly there
        reference = np.asarray(img.crop(box).resize((256, 256), Image.Resampling.BILINEAR)).astype(np.float64)
        assert np.abs(ours - reference).mean() < 1.5
    if side != 256:  # and it is not the default filter
        assert np.abs(ours - _hwc(decode_crop_resize(img, box, 256))).mean() > 0.1


def test_area_cv2_needs_a_whole_pixel_box_and_unknown_filters_are_named():
    img = photo(301, 200)
    with pytest.raises(ValueError, match='whole-pixel'):
        decode_crop_resize(img, eval_box(301, 200), 64, resize_filter='area_cv2')
    with pytest.raises(ValueError, match='resize_filter must be one of'):
        decode_crop_resize(img, (0, 0, 200, 200), 64, resize_filter='lanczos')


def test_to_tensor_range_and_layout():
    img = Image.fromarray(np.array([[[0, 255, 127]]], np.uint8))
    for pixels in (img, torch.tensor([[[0]], [[255]], [[127]]], dtype=torch.uint8)):
        tensor = to_tensor(pixels)
        assert tensor.shape == (3, 1, 1) and tensor.dtype == torch.float32
        np.testing.assert_allclose(tensor.flatten().numpy(), [-1.0, 1.0, 127 / 127.5 - 1], atol=1e-6)
    with pytest.raises(TypeError, match='uint8'):
        to_tensor(torch.zeros(3, 1, 1))


@pytest.mark.parametrize('crop_side, expected_scale', [(1200, 4), (600, 2), (520, 2), (1500, 4)])
def test_draft_decode_matches_full_decode(crop_side, expected_scale):
    data = jpeg_bytes(photo(1800, 1600, seed=3), quality=92)
    resolution = 256
    box = (137, 50, 137 + crop_side, 50 + crop_side)
    lazy = open_image(data)
    drafted = _hwc(decode_crop_resize(lazy, box, resolution))
    # The drafted crop is the box rounded to whole decoded pixels: compare with a full decode of that box.
    snapped = tuple(round(v / expected_scale) * expected_scale for v in box)
    full = _hwc(decode_crop_resize(open_image(data), snapped, resolution, draft=False))
    # The JPEG really was decoded at reduced size, still covering the crop with >= resolution pixels.
    assert lazy.size == (1800 // expected_scale, 1600 // expected_scale)
    assert crop_side / expected_scale >= resolution
    difference = np.abs(full - drafted)
    assert difference.mean() < 1.0  # under one grey level on average
    psnr = 10 * np.log10(255**2 / np.mean(difference**2))
    assert psnr > 38


def test_no_draft_when_downsampling_less_than_2x():
    data = jpeg_bytes(photo(400, 400))
    img = open_image(data)
    decode_crop_resize(img, (0, 0, 400, 400), 256)
    assert img.size == (400, 400)


def test_draft_keeps_pixels_of_grayscale_jpeg_rgb():
    data = jpeg_bytes(photo(1200, 900).convert('L'))
    out = decode_crop_resize(open_image(data), eval_box(1200, 900), 128)
    assert out.shape == (3, 128, 128) and out.dtype == torch.uint8
