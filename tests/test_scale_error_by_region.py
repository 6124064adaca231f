"""The border/interior split of the equivariance error (scripts/scale_error_by_region.py)."""

import pytest
import torch

from scripts.scale_error_by_region import border_mask, region_errors


def test_border_mask_marks_the_outer_ring():
    mask = border_mask(4, 5, ring=1)
    assert mask.sum() == 4 * 5 - 2 * 3  # all cells but the 2x3 interior
    assert not mask[1:3, 1:4].any() and mask[0].all() and mask[:, -1].all()
    assert border_mask(4, 4, ring=2).all()  # no interior left


def test_errors_split_by_region_with_each_region_normalised_by_its_own_target():
    target = torch.ones(1, 2, 4, 4)  # 2 channels: ||target||^2 is 2 per cell
    transformed = target.clone()
    transformed[0, :, 0, 0] += 1.0  # one border cell off by 1 in both channels: squared error 2
    transformed[0, 0, 1, 1] += 2.0  # one interior cell off by 2 in one channel: squared error 4
    errors = region_errors(transformed, target, ring=1)
    assert errors['all'].item() == pytest.approx((2 + 4) / (16 * 2))
    assert errors['border'].item() == pytest.approx(2 / (12 * 2))
    assert errors['interior'].item() == pytest.approx(4 / (4 * 2))
    assert errors['border_share'].item() == pytest.approx(2 / 6)


def test_a_latent_with_no_interior_reports_nan_for_it():
    errors = region_errors(torch.zeros(3, 4, 2, 2), torch.ones(3, 4, 2, 2), ring=1)
    assert torch.isnan(errors['interior']).all() and errors['border_share'].eq(1).all()
