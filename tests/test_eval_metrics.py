"""Each evaluation metric against an independent computation on small tensors."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from skimage.metrics import structural_similarity
from torch import nn

from eqvae_composer.algorithms.equivariance.transforms import SpatialTransform
from eqvae_composer.evaluation import (
    LatentIntrinsicDimension,
    MeanPerImage,
    ReconstructionFID,
    ReconstructionPSNR,
    ReconstructionSSIM,
    equivariance_errors,
    eval_transforms,
    quantize,
    to_uint8,
    twonn_dimension,
)


def _images(n=4, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_quantize_and_uint8_agree():
    x = _images()
    assert torch.equal(to_uint8(x).float() / 255, quantize(x))
    assert to_uint8(torch.tensor([-1.0, 0.0, 1.0, 2.0])).tolist() == [0, 128, 255, 255]


def test_psnr_by_hand():
    x, y = _images(seed=1), _images(seed=2)
    metric = ReconstructionPSNR()
    metric.update(y[:2], x[:2])
    metric.update(y[2:], x[2:])
    # Per image on 8-bit levels: 10 log10(255^2 / MSE), then the mean over images.
    xs, ys = to_uint8(x).double(), to_uint8(y).double()
    per_image = [10 * math.log10(255**2 / (xs[i] - ys[i]).pow(2).mean().item()) for i in range(4)]
    assert metric.compute().item() == pytest.approx(sum(per_image) / 4, rel=1e-5)


def _skimage_ssim(preds: torch.Tensor, target: torch.Tensor) -> float:
    """Mean per-image SSIM by scikit-image (Gaussian window, sigma 1.5, 8-bit range), torchmetrics' border rule.

    torchmetrics reflect-pads each image by the window radius and averages the SSIM map over the whole
    image; scikit-image averages only the interior. Padding the same way here and cropping scikit-image's
    full map back to the image gives the same quantity, computed independently.
    """
    radius = 5  # scikit-image's Gaussian window for sigma 1.5 (truncate 3.5): 11 x 11
    pad = ((radius, radius), (radius, radius), (0, 0))
    values = []
    for a, b in zip(to_uint8(preds), to_uint8(target)):
        _, ssim_map = structural_similarity(
            np.pad(a.permute(1, 2, 0).numpy(), pad, mode='reflect'),  # numpy's 'reflect' is PyTorch's
            np.pad(b.permute(1, 2, 0).numpy(), pad, mode='reflect'),
            channel_axis=2,
            data_range=255,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            full=True,
        )
        values.append(ssim_map[radius:-radius, radius:-radius].mean())
    return float(np.mean(values))


def test_ssim_matches_skimage():
    # Smooth images with strong noise: SSIM about 0.56, where a wrong data range (2 instead of 1 moves
    # it by ~0.02), window width (sigma 3) or window shape (uniform) shows; interior and border both count.
    generator = torch.Generator().manual_seed(3)
    smooth = torch.nn.functional.interpolate(
        torch.rand(3, 3, 12, 12, generator=generator), size=(48, 48), mode='bicubic', align_corners=False
    )
    x = (smooth * 2 - 1).clamp(-1, 1)
    y = (x + 0.4 * torch.randn(3, 3, 48, 48, generator=generator)).clamp(-1, 1)
    metric = ReconstructionSSIM()
    metric.update(y[:2], x[:2])
    metric.update(y[2:], x[2:])
    reference = _skimage_ssim(y, x)
    assert 0.4 < reference < 0.7
    assert metric.compute().item() == pytest.approx(reference, abs=1e-5)  # float32 vs float64


class PointwiseEncoder(nn.Module):
    """A 1x1 convolution: f = 1 and commutes with rotations and with resizing constant images."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


class PositionalEncoder(PointwiseEncoder):
    """Adds a fixed horizontal ramp: a function of position, so not rotation-equivariant."""

    def forward(self, x):
        ramp = torch.linspace(0, 1, x.shape[-1]).expand(x.shape[-2], -1)
        return self.conv(x) + ramp


@torch.no_grad()
def test_equivariance_error_zero_for_equivariant_encoder():
    encode = PointwiseEncoder()
    rotations = equivariance_errors(encode, _images(3, 8), eval_transforms()['rotation'], 1)
    assert rotations.shape == (3, 3)
    assert rotations.abs().max() < 1e-10
    constant = torch.full((2, 3, 16, 16), 0.3) * torch.tensor([1.0, -1.0, 0.5])[:, None, None]
    scales = equivariance_errors(encode, constant, eval_transforms()['scale'], 1)
    assert scales.abs().max() < 1e-10


@torch.no_grad()
def test_equivariance_error_positive_and_by_hand_for_positional_encoder():
    encode = PositionalEncoder()
    x = _images(2, 8)
    errors = equivariance_errors(encode, x, [SpatialTransform(quarter_turns=1)], 1)
    assert (errors > 1e-3).all()
    # The paper's definition, written out for one image.
    z_of_rotated = encode(torch.rot90(x, 1, dims=[-1, -2]))
    rotated_z = torch.rot90(encode(x), 1, dims=[-1, -2])
    expected = (rotated_z - z_of_rotated).pow(2).sum((1, 2, 3)) / z_of_rotated.pow(2).sum((1, 2, 3))
    torch.testing.assert_close(errors[0], expected)


class TinyFeatures(nn.Module):
    """uint8 images -> 5 features: channel means and two spatial statistics."""

    num_features = 5

    def forward(self, x):
        x = x.float() / 255
        return torch.cat([x.mean((2, 3)), x[:, :1].std((2, 3)), x[:, :, ::2].mean((1, 2, 3))[:, None]], dim=1)


def _scipy_fid(a, b):
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def test_fid_matches_scipy():
    real, fake = _images(40, 8, seed=5), (_images(40, 8, seed=6) * 0.7 + 0.1)
    features = TinyFeatures()
    metric = ReconstructionFID(features)
    metric.update(fake[:25], real[:25])
    metric.update(fake[25:], real[25:])
    expected = _scipy_fid(features(to_uint8(real)).double().numpy(), features(to_uint8(fake)).double().numpy())
    assert metric.compute().item() == pytest.approx(expected, rel=1e-4, abs=1e-6)


def _merged(factory, shards, update):
    """The state of one metric per simulated rank, merged as torchmetrics' all-reduce does."""
    metrics = [factory() for _ in shards]
    for metric, shard in zip(metrics, shards):
        update(metric, shard)
    for other in metrics[1:]:
        metrics[0].merge_state(other)
    return metrics[0].compute()


@pytest.mark.parametrize('name', ['psnr', 'ssim', 'mean', 'fid', 'intrinsic_dim'])
def test_multi_rank_aggregation_equals_single_rank(name):
    x, y = _images(12, 16, seed=7), _images(12, 16, seed=8)
    factory, update = {
        'psnr': (ReconstructionPSNR, lambda m, i: m.update(y[i], x[i])),
        'ssim': (ReconstructionSSIM, lambda m, i: m.update(y[i], x[i])),
        'mean': (MeanPerImage, lambda m, i: m.update((x[i] - y[i]).abs().mean((1, 2, 3)))),
        'fid': (lambda: ReconstructionFID(TinyFeatures()), lambda m, i: m.update(y[i], x[i])),
        'intrinsic_dim': (LatentIntrinsicDimension, lambda m, i: m.update(x[i])),
    }[name]
    single = _merged(factory, [torch.arange(12)], update)
    # Unequal shards (5 and 7 images), as rank_shard gives when N is not divisible by the ranks.
    sharded = _merged(
        factory, [torch.arange(0, 12, 2)[:5], torch.cat([torch.arange(1, 12, 2), torch.tensor([10])])], update
    )
    torch.testing.assert_close(sharded.double(), single.double(), rtol=1e-5, atol=1e-6)


def test_mean_per_image_reports_nan_not_zero_when_it_saw_nothing_or_a_nan():
    # A metric that saw no image (or a diverged reconstruction) must not read as a perfect score.
    with pytest.warns(UserWarning, match='before the ``update``'):
        assert math.isnan(MeanPerImage().compute().item())
    metric = MeanPerImage()
    metric.update(torch.tensor([0.5, float('nan'), 0.25]))
    assert math.isnan(metric.compute().item())


def test_mean_per_image_sums_in_float64():
    # 1e8 + 1 is 1e8 in float32: a float32 running sum would lose the 1 and report 0.
    metric = MeanPerImage()
    for value in (1e8, 1.0, -1e8):
        metric.update(torch.tensor([value]))
    assert metric.compute().item() == pytest.approx(1 / 3, rel=1e-6)
    assert metric.compute().dtype == torch.float32
    assert int(metric.count) == 3


def test_twonn_plane_in_10d():
    generator = torch.Generator().manual_seed(0)
    plane = torch.rand(2000, 2, generator=generator, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(10, 2, generator=generator, dtype=torch.float64))[0]
    assert twonn_dimension(plane @ basis.T) == pytest.approx(2.0, abs=0.15)


def test_twonn_gaussian_5d_and_duplicates_ignored():
    points = torch.randn(3000, 5, generator=torch.Generator().manual_seed(1))
    with_duplicates = torch.cat([points, points[:10]])
    assert twonn_dimension(with_duplicates) == pytest.approx(5.0, rel=0.1)
    with pytest.raises(ValueError):
        twonn_dimension(torch.zeros(5, 3))
