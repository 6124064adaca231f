"""The transform menu (beyond the paper): which tau the equivariance branch draws, each with a weight.

The paper draws one kind of tau, a scale then a rotation (``ScaleRotate``, the default menu). Later
reproductions draw others too (HakuLatent: crops, flips, affine and perspective warps); a menu of
``TransformPair`` entries with weights lets the algorithm draw any of them per microbatch. A pair
says how tau is drawn (``sample``, from the microbatch's generator, so draws stay a pure function of
the seeds and resume exactly) and what the drawn tau does to a latent and to an image, sized on the
latent grid so that ``D(tau(z))`` and ``tau(x)`` always have the same shape.

A menu of one entry draws nothing to choose it: the default menu gives the paper's draws bit for bit.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from eqvae_composer.algorithms.equivariance.transforms import (
    SpatialTransform,
    apply_to_image,
    apply_to_latent,
    sample_transform,
    smallest_scale,
)

__all__ = [
    'Flip',
    'HorizontalFlip',
    'LatentCrop',
    'LatentTranslation',
    'PairedTransform',
    'RandomLatentCrop',
    'RandomLatentTranslation',
    'ScaleRotate',
    'TRANSFORM_PAIRS',
    'TransformMenu',
    'TransformPair',
    'VerticalFlip',
    'transform_image',
    'transform_latent',
]


@runtime_checkable
class PairedTransform(Protocol):
    """A drawn tau: what it does to a latent ``(B, C, h, w)`` and to its image ``(B, 3, h * f, w * f)``.

    It should be a frozen dataclass (drawn values compare equal, and ``draw`` is tested for that).
    ``SpatialTransform`` (the paper's tau) is applied by ``transform_latent``/``transform_image`` with
    the algorithm's interpolation settings instead.
    """

    def apply_to_latent(self, z: torch.Tensor) -> torch.Tensor: ...

    def apply_to_image(self, x: torch.Tensor, downsample_factor: int) -> torch.Tensor: ...


class TransformPair(abc.ABC):
    """An entry of the transform menu: draws a tau (a ``PairedTransform``) for one microbatch.

    ``smallest_fraction`` is the smallest side of tau(z) as a fraction of z's side (1 for a tau that
    keeps the size), so that the algorithm can check the smallest target against the model's
    ``min_target_size`` before training.
    """

    smallest_fraction: float = 1.0

    @abc.abstractmethod
    def sample(self, generator: torch.Generator) -> PairedTransform | SpatialTransform:
        """Draw tau from ``generator`` (all randomness from it: that keeps the draws seeded and resumable)."""


def transform_latent(
    z: torch.Tensor, transform: PairedTransform | SpatialTransform, interpolation: str, antialias: bool
) -> torch.Tensor:
    """tau(z); the interpolation settings apply to the paper's ``SpatialTransform``."""
    if isinstance(transform, SpatialTransform):
        return apply_to_latent(z, transform, interpolation, antialias)
    return transform.apply_to_latent(z)


def transform_image(
    x: torch.Tensor,
    transform: PairedTransform | SpatialTransform,
    downsample_factor: int,
    interpolation: str,
    antialias: bool,
) -> torch.Tensor:
    """tau(x), aligned with tau(z); the interpolation settings apply to the paper's ``SpatialTransform``."""
    if isinstance(transform, SpatialTransform):
        return apply_to_image(x, transform, downsample_factor, interpolation, antialias)
    return transform.apply_to_image(x, downsample_factor)


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))


class ScaleRotate(TransformPair):
    """The paper's tau: a scale from ``scales`` then a rotation from ``rotations`` (see ``sample_transform``)."""

    def __init__(self, scales: str | Sequence[float], rotations: Sequence[int], anisotropic: bool) -> None:
        self.scales, self.rotations, self.anisotropic = scales, tuple(rotations), anisotropic
        self.smallest_fraction = smallest_scale(scales)

    def sample(self, generator: torch.Generator) -> SpatialTransform:
        return sample_transform(self.scales, self.rotations, self.anisotropic, generator)


@dataclass(frozen=True)
class Flip:
    """Mirror the latent and the image along ``dims`` (``(-1,)``: left-right, ``(-2,)``: top-bottom)."""

    dims: tuple[int, ...] = (-1,)

    def apply_to_latent(self, z: torch.Tensor) -> torch.Tensor:
        return z.flip(self.dims)

    def apply_to_image(self, x: torch.Tensor, downsample_factor: int) -> torch.Tensor:
        return x.flip(self.dims)


class HorizontalFlip(TransformPair):
    """A left-right flip (``hflip``); nothing to draw."""

    def sample(self, generator: torch.Generator) -> Flip:
        return Flip((-1,))


class VerticalFlip(TransformPair):
    """A top-bottom flip (``vflip``); nothing to draw."""

    def sample(self, generator: torch.Generator) -> Flip:
        return Flip((-2,))


def _crop_cells(side: int, size: float, offset: float) -> tuple[int, int]:
    """``(start, length)`` in latent cells of a crop ``size`` of ``side`` at relative ``offset`` in [0, 1)."""
    length = max(1, math.floor(side * size + 1e-6))  # floored as ``scaled_size``: the same smallest size
    return min(side - length, math.floor(offset * (side - length + 1))), length


@dataclass(frozen=True)
class LatentCrop:
    """A crop on the latent grid: ``size_*`` of the side at relative offsets ``top``, ``left`` in [0, 1).

    Drawn in fractions so that the draw does not depend on the image size; the cells are computed from
    the latent's size, and the image is cropped at the same cells times the downsampling factor.
    """

    size_h: float
    size_w: float
    top: float
    left: float

    def _cells(self, height: int, width: int) -> tuple[slice, slice]:
        (top, h), (left, w) = _crop_cells(height, self.size_h, self.top), _crop_cells(width, self.size_w, self.left)
        return slice(top, top + h), slice(left, left + w)

    def apply_to_latent(self, z: torch.Tensor) -> torch.Tensor:
        rows, cols = self._cells(z.shape[-2], z.shape[-1])
        return z[..., rows, cols].contiguous()  # a strided view otherwise, which metrics' .view() rejects

    def apply_to_image(self, x: torch.Tensor, downsample_factor: int) -> torch.Tensor:
        f = downsample_factor
        rows, cols = self._cells(x.shape[-2] // f, x.shape[-1] // f)
        return x[..., rows.start * f : rows.stop * f, cols.start * f : cols.stop * f].contiguous()


class RandomLatentCrop(TransformPair):
    """A latent-grid-aligned crop (``crop``): one size fraction in ``[min_fraction, 1]`` for both sides, anywhere.

    Args:
        min_fraction (float): the smallest crop side, as a fraction of the latent's side. Default: ``0.5``.
    """

    def __init__(self, min_fraction: float = 0.5) -> None:
        if not 0.0 < float(min_fraction) <= 1.0:
            raise ValueError(f'min_fraction must be in (0, 1], got {min_fraction!r}.')
        self.smallest_fraction = float(min_fraction)

    def sample(self, generator: torch.Generator) -> LatentCrop:
        size = self.smallest_fraction + (1.0 - self.smallest_fraction) * _uniform(generator)
        return LatentCrop(size, size, _uniform(generator), _uniform(generator))


@dataclass(frozen=True)
class LatentTranslation:
    """A circular shift by ``shift_*`` of the side, rounded to whole latent cells, of the latent and the image.

    Circular (``torch.roll``): what leaves one side enters the other, in the image and in the latent alike,
    so tau(x) keeps its size and every pixel.
    """

    shift_h: float
    shift_w: float

    def _cells(self, height: int, width: int) -> tuple[int, int]:
        return round(self.shift_h * height), round(self.shift_w * width)

    def apply_to_latent(self, z: torch.Tensor) -> torch.Tensor:
        return z.roll(self._cells(z.shape[-2], z.shape[-1]), dims=(-2, -1))

    def apply_to_image(self, x: torch.Tensor, downsample_factor: int) -> torch.Tensor:
        f = downsample_factor
        cells_h, cells_w = self._cells(x.shape[-2] // f, x.shape[-1] // f)
        return x.roll((cells_h * f, cells_w * f), dims=(-2, -1))


class RandomLatentTranslation(TransformPair):
    """A whole-cell circular translation (``translate``) by up to ``max_fraction`` of each side, either way.

    Args:
        max_fraction (float): the largest shift, as a fraction of the side. Default: ``0.25``.
    """

    def __init__(self, max_fraction: float = 0.25) -> None:
        if not 0.0 < float(max_fraction) <= 1.0:
            raise ValueError(f'max_fraction must be in (0, 1], got {max_fraction!r}.')
        self.max_fraction = float(max_fraction)

    def sample(self, generator: torch.Generator) -> LatentTranslation:
        shift_h, shift_w = ((2 * _uniform(generator) - 1) * self.max_fraction for _ in range(2))
        return LatentTranslation(shift_h, shift_w)


#: Menu names (YAML's ``algorithms.equivariance.transforms`` keys) -> the pair's class, called with the
#: entry's options. Add an entry to make a pair of your own available from YAML. ``scale_rotate`` is
#: built from the algorithm's own ``scales``, ``rotations`` and ``anisotropic``.
TRANSFORM_PAIRS: dict[str, Callable[..., TransformPair]] = {
    'scale_rotate': ScaleRotate,
    'hflip': HorizontalFlip,
    'vflip': VerticalFlip,
    'crop': RandomLatentCrop,
    'translate': RandomLatentTranslation,
}


class TransformMenu:
    """The weighted entries the equivariance branch draws from: one entry per microbatch, by weight.

    Args:
        transforms (Mapping, optional): entry -> weight. An entry is a ``TRANSFORM_PAIRS`` name or a
            ``TransformPair``; a weight is a number, or (for a name) a mapping with ``weight`` and the
            pair's options, e.g. ``{'crop': {'weight': 0.5, 'min_fraction': 0.75}}``. Entries of weight
            0 are left out. ``None``: ``{'scale_rotate': 1.0}``, the paper.
        scale_rotate (ScaleRotate): the ``scale_rotate`` entry, from the algorithm's options.

    Raises:
        ValueError: an unknown name, a negative weight, bad options, or no entry with a positive weight.
    """

    def __init__(
        self, transforms: Mapping[str | TransformPair, float | Mapping[str, Any]] | None, scale_rotate: ScaleRotate
    ) -> None:
        self.names: list[str] = []
        self.pairs: list[TransformPair] = []
        self.weights: list[float] = []
        for entry, spec in (transforms if transforms is not None else {'scale_rotate': 1.0}).items():
            options = dict(spec) if isinstance(spec, Mapping) else {'weight': spec}
            weight = float(options.pop('weight', 1.0))
            if weight < 0:
                raise ValueError(f'transforms: the weight of {entry!r} must be non-negative, got {weight}.')
            pair = self._pair(entry, options, scale_rotate)
            if weight > 0:
                self.names.append(entry if isinstance(entry, str) else type(entry).__name__)
                self.pairs.append(pair)
                self.weights.append(weight)
        if not self.pairs:
            raise ValueError('transforms: no entry has a positive weight; give at least one, e.g. {scale_rotate: 1.0}.')
        self.smallest_fraction = min(pair.smallest_fraction for pair in self.pairs)

    @staticmethod
    def _pair(entry: str | TransformPair, options: dict[str, Any], scale_rotate: ScaleRotate) -> TransformPair:
        if isinstance(entry, TransformPair):
            if options:
                raise ValueError(f'transforms: {entry!r} is already built; give it a weight only, not {options}.')
            return entry
        if entry not in TRANSFORM_PAIRS:
            raise ValueError(f'transforms: unknown transform {entry!r}; known: {sorted(TRANSFORM_PAIRS)}.')
        if entry == 'scale_rotate':
            if options:
                raise ValueError(
                    f"transforms: scale_rotate takes the algorithm's scales, rotations and anisotropic, not {options}."
                )
            return scale_rotate
        try:
            return TRANSFORM_PAIRS[entry](**options)
        except (TypeError, ValueError) as error:
            raise ValueError(f'transforms: {entry}: {error}') from None

    def sample(self, generator: torch.Generator) -> tuple[int, PairedTransform | SpatialTransform]:
        """``(entry index, tau)``; a menu of one entry draws nothing to pick it."""
        index = 0
        if len(self.pairs) > 1:
            index = int(torch.multinomial(torch.tensor(self.weights), 1, generator=generator))
        return index, self.pairs[index].sample(generator)
