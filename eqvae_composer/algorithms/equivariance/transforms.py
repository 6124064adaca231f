"""The functional core of EQ-VAE: sample a spatial transform, apply it to latents and images.

Everything here is tensor-in, tensor-out with the randomness passed in as a ``torch.Generator``,
so it can be used and tested without a Trainer. The defaults reproduce the reference
implementation (see ``EQVAE_SPEC.md`` section 2).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    'Branch',
    'DISCRETE_SCALES',
    'GRID_SCALES',
    'SCALE_MODES',
    'SpatialTransform',
    'apply_to_image',
    'apply_to_latent',
    'check_target_size',
    'downscale_image',
    'resize',
    'sample_branch',
    'sample_scales',
    'sample_transform',
    'scaled_size',
    'smallest_scale',
    'smallest_target_size',
]

#: The reference scale grid: s/32 for s = 8..31, i.e. 0.25 .. 0.96875.
GRID_SCALES: tuple[float, ...] = tuple(s / 32 for s in range(8, 32))
#: The reference's ``uniform_sample_scale=False`` set.
DISCRETE_SCALES: tuple[float, ...] = (0.25, 0.5, 0.75)
#: How a scale is drawn: from the grid, the discrete set, or the paper's continuous U(0.25, 1).
SCALE_MODES = ('grid', 'discrete', 'uniform')
_UNIFORM_LOW = 0.25


class Branch(enum.IntEnum):
    """Which objective a microbatch trains with (the values are what gets logged)."""

    FULL_RES = 0  # prior preservation at full resolution: the ordinary VAE loss
    LOW_RES = 1  # prior preservation on a downscaled input
    EQUIVARIANCE = 2  # D(tau(z)) reconstructs tau(x)


@dataclass(frozen=True)
class SpatialTransform:
    """Scale by ``(scale_h, scale_w)`` then rotate by ``quarter_turns`` x 90 degrees.

    The identity is ``SpatialTransform()``.
    """

    scale_h: float = 1.0
    scale_w: float = 1.0
    quarter_turns: int = 0

    @property
    def is_identity(self) -> bool:
        return self.scale_h == 1.0 and self.scale_w == 1.0 and self.quarter_turns % 4 == 0


def scaled_size(size: Sequence[int], scale_h: float, scale_w: float) -> tuple[int, int]:
    """Spatial size after scaling, floored like ``F.interpolate(scale_factor=...)``, at least 1.

    The small epsilon keeps exact grid products (e.g. 32 * 9/32) from flooring one short.
    """
    height, width = size
    return max(1, math.floor(height * scale_h + 1e-6)), max(1, math.floor(width * scale_w + 1e-6))


def resize(
    x: torch.Tensor,
    size: Sequence[int],
    interpolation: str = 'bilinear',
    antialias: bool = False,
) -> torch.Tensor:
    """Resize the last two dims of ``x`` to ``size`` (a no-op when the size already matches)."""
    size = (int(size[0]), int(size[1]))
    if tuple(x.shape[-2:]) == size:
        return x
    align = False if interpolation in ('bilinear', 'bicubic') else None
    return F.interpolate(x, size=size, mode=interpolation, align_corners=align, antialias=antialias)


def _rotate(x: torch.Tensor, quarter_turns: int) -> torch.Tensor:
    # The reference rotates with dims=[-1, -2]; keep its direction so latents match it. contiguous:
    # rot90 returns a strided view, which `.view()` in metrics rejects and which would give the
    # decoder odd-strided gradients.
    return torch.rot90(x, quarter_turns, dims=[-1, -2]).contiguous() if quarter_turns % 4 else x


def apply_to_latent(
    z: torch.Tensor,
    transform: SpatialTransform,
    interpolation: str = 'bilinear',
    antialias: bool = False,
) -> torch.Tensor:
    """tau(z): resize the latent by the transform's scale, then rotate it."""
    z = resize(z, scaled_size(z.shape[-2:], transform.scale_h, transform.scale_w), interpolation, antialias)
    return _rotate(z, transform.quarter_turns)


def apply_to_image(
    x: torch.Tensor,
    transform: SpatialTransform,
    downsample_factor: int,
    interpolation: str = 'bilinear',
    antialias: bool = False,
) -> torch.Tensor:
    """tau(x), sized to stay aligned with tau(z).

    The latent size is computed first and the image size derived from it (latent size x the VAE's
    downsampling factor), so ``D(tau(E(x)))`` and ``tau(x)`` always have the same shape.
    """
    latent_size = (x.shape[-2] // downsample_factor, x.shape[-1] // downsample_factor)
    target_latent = scaled_size(latent_size, transform.scale_h, transform.scale_w)
    target = (target_latent[0] * downsample_factor, target_latent[1] * downsample_factor)
    return _rotate(resize(x, target, interpolation, antialias), transform.quarter_turns)


def downscale_image(
    x: torch.Tensor,
    scale_h: float,
    scale_w: float,
    downsample_factor: int,
    interpolation: str = 'bilinear',
    antialias: bool = False,
) -> torch.Tensor:
    """The low-resolution prior-preservation input: ``x`` scaled down, aligned to the latent grid."""
    return apply_to_image(x, SpatialTransform(scale_h, scale_w), downsample_factor, interpolation, antialias)


def smallest_scale(scales: str | Sequence[float]) -> float:
    """The smallest scale ``scales`` can draw (see ``sample_scales``)."""
    if scales == 'uniform':
        return _UNIFORM_LOW
    options = {'grid': GRID_SCALES, 'discrete': DISCRETE_SCALES}.get(scales, scales)  # type: ignore[arg-type]
    return float(min(options))


def smallest_target_size(size: int, downsample_factor: int, scales: str | Sequence[float]) -> int:
    """The smallest side, in pixels, of tau(x) or of a low-resolution input, for images of side ``size``.

    Both the equivariance and the low-resolution branch scale the latent grid first, so at 256 px an
    f8 VAE with the reference grid (smallest scale 8/32) gives ``floor(32 * 0.25) * 8 = 64`` px, and
    at 64 px ``floor(8 * 0.25) * 8 = 16`` px. A discriminator or loss that needs larger inputs must
    train at a larger resolution or draw larger scales.
    """
    scale = smallest_scale(scales)
    return scaled_size((size // downsample_factor, size // downsample_factor), scale, scale)[0] * downsample_factor


def check_target_size(
    size: Sequence[int],
    downsample_factor: int,
    scales: str | Sequence[float],
    min_target_size: int,
) -> None:
    """Raise ``ValueError`` saying what to change when images of ``size`` give targets under ``min_target_size``."""
    smallest = min(smallest_target_size(int(side), downsample_factor, scales) for side in size)
    if smallest >= min_target_size:
        return
    needed = next(
        r
        for r in range(downsample_factor, 1 << 16, downsample_factor)
        if smallest_target_size(r, downsample_factor, scales) >= min_target_size
    )
    min_scale = -(-min_target_size // downsample_factor) / (min(size) // downsample_factor)
    raise ValueError(
        f'EquivarianceAlgorithm: at {size[0]}x{size[1]} px the smallest scale {smallest_scale(scales):g} gives '
        f'{smallest} px images, but the model needs at least {min_target_size} px (min_target_size, e.g. from its '
        f'discriminator or its reflection padding). Train at {needed} px or more, draw only scales of at least '
        f'{min_scale:.4g} (`scales`), '
        'or use a smaller discriminator (`disc_num_layers`).',
    )


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))


def _choice(options: Sequence, generator: torch.Generator):
    return options[int(torch.randint(len(options), (), generator=generator))]


def _sample_scale(scales: str | Sequence[float], generator: torch.Generator) -> float:
    if scales == 'uniform':
        return _UNIFORM_LOW + (1.0 - _UNIFORM_LOW) * _uniform(generator)
    options = {'grid': GRID_SCALES, 'discrete': DISCRETE_SCALES}.get(scales, scales)  # type: ignore[arg-type]
    return float(_choice(options, generator))


def sample_scales(scales: str | Sequence[float], anisotropic: bool, generator: torch.Generator) -> tuple[float, float]:
    """One scale for both axes, or (``anisotropic``) an independent one per axis."""
    scale_h = _sample_scale(scales, generator)
    scale_w = _sample_scale(scales, generator) if anisotropic else scale_h
    return scale_h, scale_w


def sample_branch(p_equivariance: float, p_lowres: float, generator: torch.Generator) -> Branch:
    """Draw the branch of one microbatch.

    With probability ``p_equivariance`` the equivariance branch; otherwise prior preservation, at
    low resolution with probability ``p_lowres`` and at full resolution otherwise. (0.5 / 0.25
    gives the reference's 50% / 12.5% / 37.5% mix.)
    """
    if _uniform(generator) < p_equivariance:
        return Branch.EQUIVARIANCE
    return Branch.LOW_RES if _uniform(generator) < p_lowres else Branch.FULL_RES


def sample_transform(
    scales: str | Sequence[float],
    rotations: Sequence[int],
    anisotropic: bool,
    generator: torch.Generator,
) -> SpatialTransform:
    """Draw tau for the equivariance branch: always a scale and a rotation, one for the whole batch."""
    scale_h, scale_w = sample_scales(scales, anisotropic, generator)
    quarter_turns = int(_choice(list(rotations), generator)) if len(rotations) else 0
    return SpatialTransform(scale_h, scale_w, quarter_turns)
