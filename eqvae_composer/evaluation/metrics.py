"""Reconstruction and equivariance metrics, as torchmetrics ``Metric``s that aggregate across ranks.

The protocol follows the paper (spec section 5): images in [-1, 1] are quantized to uint8 before
PSNR/SSIM, and the latent equivariance error is ``||tau(E(x)) - E(tau(x))||^2 / ||E(tau(x))||^2``
per image, averaged over images and transforms.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torchmetrics.aggregation import MeanMetric
from torchmetrics.image import StructuralSimilarityIndexMeasure

from eqvae_composer.algorithms.equivariance.transforms import SpatialTransform, apply_to_image, apply_to_latent

__all__ = [
    'EVAL_ROTATIONS',
    'EVAL_SCALES',
    'LPIPSMetric',
    'LatentEquivarianceError',
    'MeanPerImage',
    'ReconstructionPSNR',
    'ReconstructionSSIM',
    'equivariance_errors',
    'eval_transforms',
    'quantize',
    'transformed_latent_pairs',
]

#: The paper's evaluation transforms (App. C.3): rotations by 90/180/270 degrees, scales 0.25/0.5/0.75.
EVAL_ROTATIONS: tuple[int, ...] = (1, 2, 3)
EVAL_SCALES: tuple[float, ...] = (0.25, 0.5, 0.75)


def eval_transforms() -> dict[str, list[SpatialTransform]]:
    """``{'rotation': [...], 'scale': [...]}``: the transforms the R and S errors average over."""
    return {
        'rotation': [SpatialTransform(quarter_turns=k) for k in EVAL_ROTATIONS],
        'scale': [SpatialTransform(s, s) for s in EVAL_SCALES],
    }


def quantize(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> uint8 levels -> float [0, 1], as images are saved before PSNR and FID."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round() / 255.0


class ReconstructionSSIM(StructuralSimilarityIndexMeasure):
    """SSIM (torchmetrics' defaults) on uint8-quantized [0, 1] images, averaged over images."""

    def __init__(self, **kwargs) -> None:
        super().__init__(data_range=1.0, **kwargs)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        super().update(quantize(preds), quantize(target))


class MeanPerImage(MeanMetric):
    """Mean of per-image values: torchmetrics' ``MeanMetric`` accumulating in float64, NaN kept.

    Its two states (the sum of the values, their count) are summed across ranks before dividing,
    so a multi-rank mean is the mean over all images, not a mean of rank means. A NaN value makes
    the mean NaN (``MeanMetric``'s default drops it with a warning, and the mean of a diverged model
    would look fine), and a metric that saw no image computes NaN, not 0. Reports float32.
    """

    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(nan_strategy='disable', **kwargs)
        # float64 sums, as the hand-written metric kept: the float32 mean reported then does not depend
        # on how the images were split into batches and ranks.
        self.set_dtype(torch.float64)

    @property
    def count(self) -> torch.Tensor:
        """How many values this process has taken in (``MeanMetric``'s ``weight`` state: one per value)."""
        return self.weight

    def update(self, values: torch.Tensor) -> None:  # type: ignore[override]
        super().update(values.detach().flatten())

    def compute(self) -> torch.Tensor:
        return super().compute().float()


class ReconstructionPSNR(MeanPerImage):
    """PSNR per image on uint8-quantized images, averaged over images. ``update(recon, target)`` in [-1, 1].

    The per-image values are summed into two numbers rather than kept as torchmetrics'
    ``PeakSignalNoiseRatio(dim=...)`` keeps them, in lists: a process whose share of an eval set is
    empty (fewer images than processes) cannot take part in gathering those lists.
    """

    higher_is_better = True

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        mse = (quantize(preds).double() - quantize(target).double()).pow(2).flatten(1).mean(1)
        super().update(-10 * torch.log10(mse))


class LatentEquivarianceError(MeanPerImage):
    """Latent equivariance error averaged over images and transforms; ``update`` takes per-image errors.

    Args:
        kind (str): which transforms it averages over, ``'rotation'`` or ``'scale'``.
    """

    def __init__(self, kind: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.kind = kind


class LPIPSMetric(MeanPerImage):
    """Mean LPIPS over images; ``update`` takes per-image distances."""


def transformed_latent_pairs(
    encode: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    transforms: Sequence[SpatialTransform],
    downsample_factor: int,
    latents: torch.Tensor | None = None,
    interpolation: str = 'bilinear',
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per transform, ``(tau(E(x)), E(tau(x)))`` in float32: the two latents the equivariance error compares.

    Args:
        encode (Callable): images -> latents (the posterior mean, for a deterministic measure).
        images (Tensor): ``(B, C, H, W)`` in [-1, 1].
        transforms (Sequence[SpatialTransform]): the taus.
        downsample_factor (int): pixels per latent cell, to keep tau(x) aligned with tau(z).
        latents (Tensor, optional): ``encode(images)`` when already computed.
        interpolation (str): resize mode, as in training. Default: ``'bilinear'``.
    """
    z = encode(images) if latents is None else latents
    for tau in transforms:
        transformed_latent = apply_to_latent(z, tau, interpolation).float()
        latent_of_transformed = encode(apply_to_image(images, tau, downsample_factor, interpolation)).float()
        yield transformed_latent, latent_of_transformed


def equivariance_errors(
    encode: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    transforms: Sequence[SpatialTransform],
    downsample_factor: int,
    latents: torch.Tensor | None = None,
    interpolation: str = 'bilinear',
) -> torch.Tensor:
    """Per image and transform, ``||tau(E(x)) - E(tau(x))||^2 / ||E(tau(x))||^2``; shape ``(T, B)``.

    Arguments as ``transformed_latent_pairs``.
    """
    errors = []
    for transformed_latent, latent_of_transformed in transformed_latent_pairs(
        encode, images, transforms, downsample_factor, latents, interpolation
    ):
        diff = (transformed_latent - latent_of_transformed).pow(2).flatten(1).sum(1)
        errors.append(diff / latent_of_transformed.pow(2).flatten(1).sum(1).clamp_min(1e-12))
    return torch.stack(errors)
