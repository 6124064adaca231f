"""The reference crop, the eval transform, and reduced-size JPEG decoding."""

from __future__ import annotations

import numpy as np
import pytest
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


def test_eval_box_equals_resize_shorter_side_then_center_crop():
    img = photo(300, 200)
    ours = np.asarray(decode_crop_resize(img, eval_box(300, 200), 100)).astype(np.int16)
    # Reference: resize the shorter side to 100 (-> 150 x 100), then centre crop 100 x 100.
    resized = img.resize((150, 100), Image.Resampling.BICUBIC)
    reference = np.asarray(resized.crop((25, 0, 125, 100))).astype(np.int16)
    assert np.abs(ours - reference).mean() < 1.0


def test_to_tensor_range_and_layout():
    img = Image.fromarray(np.array([[[0, 255, 127]]], np.uint8))
    tensor = to_tensor(img)
    assert tensor.shape == (3, 1, 1) and tensor.dtype.is_floating_point
    np.testing.assert_allclose(tensor.flatten().numpy(), [-1.0, 1.0, 127 / 127.5 - 1], atol=1e-6)


@pytest.mark.parametrize('crop_side, expected_scale', [(1200, 4), (600, 2), (520, 2), (1500, 4)])
def test_draft_decode_matches_full_decode(crop_side, expected_scale):
    data = jpeg_bytes(photo(1800, 1600, seed=3), quality=92)
    resolution = 256
    box = (137, 50, 137 + crop_side, 50 + crop_side)
    full = np.asarray(decode_crop_resize(open_image(data), box, resolution, draft=False)).astype(np.float64)
    lazy = open_image(data)
    drafted_img = decode_crop_resize(lazy, box, resolution)
    drafted = np.asarray(drafted_img).astype(np.float64)
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
    assert out.mode == 'RGB' and out.size == (128, 128)
