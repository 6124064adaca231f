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
