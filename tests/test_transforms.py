"""The functional core: scale grid, sampling frequencies, alignment of latent and image sizes."""

import math

import pytest
import torch
import torch.nn.functional as F

from eqvae_composer.algorithms.equivariance import (
    DISCRETE_SCALES,
    GRID_SCALES,
    Branch,
    SpatialTransform,
    apply_to_image,
    apply_to_latent,
    downscale_image,
    sample_branch,
    sample_transform,
    scaled_size,
)


def test_grid_is_the_reference_grid():
    assert len(GRID_SCALES) == 24
    assert GRID_SCALES[0] == 0.25 and GRID_SCALES[-1] == 31 / 32
    assert all(b - a == pytest.approx(1 / 32) for a, b in zip(GRID_SCALES, GRID_SCALES[1:]))
    assert DISCRETE_SCALES == (0.25, 0.5, 0.75)


@pytest.mark.parametrize('latent', [32, 16, 8])
def test_grid_scales_give_aligned_sizes(latent):
    # 256 px / f8 -> 32x32 latents: every grid scale s/32 gives exactly s latent cells, 8*s pixels.
    for s in range(8, 32):
        h, w = scaled_size((latent, latent), s / 32, s / 32)
        assert h == w == max(1, math.floor(latent * s / 32))
    assert scaled_size((32, 32), 9 / 32, 9 / 32) == (9, 9)  # no float flooring one short


def test_image_and_latent_stay_aligned_for_every_grid_transform():
    x = torch.randn(1, 3, 256, 256)
    z = torch.randn(1, 4, 32, 32)
    for s in GRID_SCALES:
        for k in (1, 2, 3):
            tau = SpatialTransform(s, s, k)
            assert apply_to_image(x, tau, 8).shape[-2:] == tuple(8 * n for n in apply_to_latent(z, tau).shape[-2:])


def test_anisotropic_and_non_square_alignment():
    x = torch.randn(2, 3, 128, 192)  # 16 x 24 latent
    z = torch.randn(2, 4, 16, 24)
    tau = SpatialTransform(0.5, 0.75, 1)
    tz, tx = apply_to_latent(z, tau), apply_to_image(x, tau, 8)
    assert tz.shape[-2:] == (18, 8)  # (8, 18) rotated by a quarter turn
    assert tx.shape[-2:] == (144, 64)


def test_latent_transform_is_bilinear_resize_then_rot90_like_the_reference():
    z = torch.randn(2, 4, 32, 32)
    tau = SpatialTransform(0.5, 0.5, 3)
    expected = torch.rot90(F.interpolate(z, scale_factor=0.5, mode='bilinear', align_corners=False), 3, dims=[-1, -2])
    torch.testing.assert_close(apply_to_latent(z, tau), expected)


def test_rotation_direction_matches_rot90_dims_minus1_minus2():
    z = torch.arange(4.0).reshape(1, 1, 2, 2)  # [[0, 1], [2, 3]]
    rotated = apply_to_latent(z, SpatialTransform(quarter_turns=1))
    # rot90 over dims [-1, -2] turns clockwise: [[2, 0], [3, 1]]
    assert rotated.flatten().tolist() == [2.0, 0.0, 3.0, 1.0]


def test_identity_is_a_no_op():
    z = torch.randn(1, 4, 8, 8)
    assert apply_to_latent(z, SpatialTransform()) is z


def test_downscale_image_aligns_to_latent_grid():
    x = torch.randn(1, 3, 256, 256)
    assert downscale_image(x, 9 / 32, 9 / 32, 8).shape[-2:] == (72, 72)


def test_branch_frequencies_match_the_reference_mix():
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.zeros(3)
    for _ in range(n):
        counts[int(sample_branch(0.5, 0.25, g))] += 1
    freqs = counts / n
    # 37.5% full-res, 12.5% low-res, 50% equivariance; 4 sigma of a binomial at n=20000 is < 0.015
    assert freqs[Branch.FULL_RES] == pytest.approx(0.375, abs=0.015)
    assert freqs[Branch.LOW_RES] == pytest.approx(0.125, abs=0.01)
    assert freqs[Branch.EQUIVARIANCE] == pytest.approx(0.5, abs=0.015)


def test_transform_sampling_covers_grid_and_rotations_uniformly():
    g = torch.Generator().manual_seed(1)
    draws = [sample_transform('grid', (1, 2, 3), False, g) for _ in range(6000)]
    assert {d.scale_h for d in draws} == set(GRID_SCALES)
    assert all(d.scale_h == d.scale_w for d in draws)
    rotations = torch.tensor([d.quarter_turns for d in draws])
    for k in (1, 2, 3):
        assert (rotations == k).float().mean().item() == pytest.approx(1 / 3, abs=0.03)


def test_anisotropic_discrete_and_uniform_options():
    g = torch.Generator().manual_seed(2)
    aniso = [sample_transform('grid', (1,), True, g) for _ in range(200)]
    assert any(d.scale_h != d.scale_w for d in aniso)
    discrete = {sample_transform('discrete', (2,), False, g).scale_h for _ in range(200)}
    assert discrete == set(DISCRETE_SCALES)
    uniform = [sample_transform('uniform', (1,), False, g).scale_h for _ in range(500)]
    assert min(uniform) >= 0.25 and max(uniform) <= 1.0
    assert len(set(uniform)) == 500  # continuous, not a grid


def test_randomness_is_injectable():
    a = [sample_transform('grid', (1, 2, 3), False, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
