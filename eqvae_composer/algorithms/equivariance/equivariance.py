"""``EquivarianceAlgorithm``: EQ-VAE's implicit equivariance regularization as a Composer algorithm.

The algorithm works with any ComposerModel that holds one diffusers ``AutoencoderKL``, whose forward
encodes ``batch[image_key]`` and decodes the latent, and whose loss compares the reconstruction
with ``batch[image_key]``. Per microbatch it draws a branch (see ``transforms.sample_branch``):

* equivariance: a forward pre-hook on the VAE's latent entry point (``post_quant_conv``, else the
  decoder) replaces z by tau(z) inside the model's own forward, so the decoder runs once, on the
  transformed latent; before the loss, ``batch[image_key]`` is swapped for tau(x) and restored
  after it. The encoder saw x, so the KL term still sees the untransformed posterior.
* low-resolution prior preservation: ``batch[image_key]`` is downscaled before the forward and
  restored after the loss.
* full-resolution prior preservation: nothing changes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from diffusers import AutoencoderKL

from eqvae_composer.algorithms.equivariance.transforms import (
    SCALE_MODES,
    Branch,
    SpatialTransform,
    apply_to_image,
    apply_to_latent,
    downscale_image,
    sample_branch,
    sample_scales,
    sample_transform,
)

__all__ = [
    'EquivarianceAlgorithm',
    'find_autoencoder',
    'latent_entry_point',
    'microbatch_seed',
    'vae_downsample_factor',
]

log = logging.getLogger(__name__)

_INTERPOLATIONS = ('bilinear', 'bicubic', 'nearest', 'area')


def find_autoencoder(model: torch.nn.Module) -> AutoencoderKL:
    """The single diffusers ``AutoencoderKL`` inside ``model`` (which may be one itself)."""
    found = [m for m in model.modules() if isinstance(m, AutoencoderKL)]
    if len(found) != 1:
        raise ValueError(
            f'EquivarianceAlgorithm needs a model holding exactly one diffusers AutoencoderKL; '
            f'{type(model).__name__} holds {len(found)}.',
        )
    return found[0]


def latent_entry_point(vae: AutoencoderKL) -> torch.nn.Module:
    """The first module ``AutoencoderKL.decode`` applies to z."""
    post_quant_conv = getattr(vae, 'post_quant_conv', None)
    return post_quant_conv if post_quant_conv is not None else vae.decoder


def vae_downsample_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent cell: 2 ** (number of encoder blocks - 1), i.e. 8 for SD-VAE."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def microbatch_seed(rank_seed: int, batch: int, microbatch: int) -> int:
    """The seed of the generator a microbatch draws its branch and transform from.

    Public so that code reproducing the algorithm's draws outside a Trainer (the training benchmark)
    uses the same function rather than a copy.
    """
    # A stateless function of (rank seed, step, microbatch): identical across runs with the same
    # seed and exact after an autoresume, without having to checkpoint a generator per rank.
    return int(np.random.SeedSequence([rank_seed, batch, microbatch]).generate_state(1, dtype=np.uint64)[0] >> 1)


class EquivarianceAlgorithm(Algorithm):
    """EQ-VAE (Kouzelis et al., ICML 2025): make a VAE's latents equivariant to scaling and rotation.

    ``EquivarianceAlgorithm()`` reproduces the reference implementation's defaults.

    Args:
        p_equivariance (float): probability of the equivariance branch per microbatch. Reference
            name ``p_prior`` (whose README describes it backwards). Default: ``0.5``.
        p_lowres (float): among the remaining microbatches, probability of low-resolution prior
            preservation (the rest train at full resolution). Reference name ``p_prior_s``.
            Default: ``0.25``.
        scales (str | Sequence[float]): ``'grid'`` draws from s/32, s = 8..31 (reference
            ``uniform_sample_scale=True``); ``'discrete'`` from {0.25, 0.5, 0.75} (reference
            ``uniform_sample_scale=False``, a flag the reference stores but never reads);
            ``'uniform'`` from the paper's continuous U(0.25, 1); or an explicit list of scales in
            (0, 1]. Also used for the low-resolution branch. Default: ``'grid'``.
        anisotropic (bool): draw independent height and width scales (reference ``anisotropic``).
            Default: ``False``.
        rotations (Sequence[int]): the quarter turns to draw from, a subset of {0, 1, 2, 3}.
            Default: ``(1, 2, 3)`` (90, 180, 270 degrees).
        interpolation (str): resize mode for latents and images. Default: ``'bilinear'``
            (``align_corners=False``), as the reference.
        antialias (bool): antialias when resizing. Default: ``False``, as the reference.
        image_key (str | int): the batch key of the image. Default: ``'image'``.
        downsample_factor (int, optional): pixels per latent cell; read from the VAE's config when
            ``None``. Default: ``None``.
    """

    def __init__(
        self,
        p_equivariance: float = 0.5,
        p_lowres: float = 0.25,
        scales: str | Sequence[float] = 'grid',
        anisotropic: bool = False,
        rotations: Sequence[int] = (1, 2, 3),
        interpolation: str = 'bilinear',
        antialias: bool = False,
        image_key: str | int = 'image',
        downsample_factor: int | None = None,
    ) -> None:
        for name, value in (('p_equivariance', p_equivariance), ('p_lowres', p_lowres)):
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f'{name} must be in [0, 1], got {value!r}.')
        if isinstance(scales, str):
            if scales not in SCALE_MODES:
                raise ValueError(f'scales must be one of {SCALE_MODES} or a list of floats, got {scales!r}.')
        else:
            scales = tuple(float(s) for s in scales)
            if not scales or not all(0.0 < s <= 1.0 for s in scales):
                raise ValueError(f'scales must be a non-empty list of values in (0, 1], got {list(scales)!r}.')
        rotations = tuple(int(k) for k in rotations)
        if not set(rotations) <= {0, 1, 2, 3}:
            raise ValueError(f'rotations must be quarter turns in {{0, 1, 2, 3}}, got {list(rotations)!r}.')
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f'interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}.')
        if downsample_factor is not None and int(downsample_factor) < 1:
            raise ValueError(f'downsample_factor must be a positive integer, got {downsample_factor!r}.')

        self.p_equivariance = float(p_equivariance)
        self.p_lowres = float(p_lowres)
        self.scales = scales
        self.anisotropic = bool(anisotropic)
        self.rotations = rotations
        self.interpolation = interpolation
        self.antialias = bool(antialias)
        self.image_key = image_key
        self.downsample_factor = downsample_factor

        self._microbatch = 0
        self._branch = Branch.FULL_RES
        self._transform = SpatialTransform()
        self._armed = False  # the hook transforms z only between BEFORE_FORWARD and AFTER_FORWARD
        self._hook_calls = 0
        self._original_image: Any = None
        self._hook_handle: torch.utils.hooks.RemovableHandle | None = None

    def __repr__(self) -> str:
        return (
            f'{type(self).__name__}(p_equivariance={self.p_equivariance}, p_lowres={self.p_lowres}, '
            f'scales={self.scales!r}, anisotropic={self.anisotropic}, rotations={self.rotations}, '
            f'interpolation={self.interpolation!r}, antialias={self.antialias}, image_key={self.image_key!r})'
        )

    def match(self, event: Event, state: State) -> bool:
        return event in (
            Event.INIT,
            Event.BATCH_START,
            Event.BEFORE_FORWARD,
            Event.AFTER_FORWARD,
            Event.BEFORE_LOSS,
            Event.AFTER_LOSS,
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._attach(state)
        elif event == Event.BATCH_START:
            self._microbatch = 0
        elif event == Event.BEFORE_FORWARD:
            self._begin_microbatch(state, logger)
        elif event == Event.AFTER_FORWARD:
            self._check_hook_ran()
        elif event == Event.BEFORE_LOSS:
            if self._branch == Branch.EQUIVARIANCE:
                self._swap_image(state, lambda x: apply_to_image(x, self._transform, self._factor, **self._resize_kw))
        elif event == Event.AFTER_LOSS:
            if self._original_image is not None:
                state.batch_set_item(self.image_key, self._original_image)
                self._original_image = None

    # --- event handlers -------------------------------------------------------------------

    def _attach(self, state: State) -> None:
        vae = find_autoencoder(state.model)
        if getattr(vae, 'use_tiling', False):
            raise ValueError('EquivarianceAlgorithm cannot transform tiled decoding; call vae.disable_tiling().')
        self._factor = int(self.downsample_factor or vae_downsample_factor(vae))
        self._rank_seed = int(state.seed)
        if self._hook_handle is not None:  # the same instance reused by a second Trainer
            self._hook_handle.remove()
        self._hook_handle = latent_entry_point(vae).register_forward_pre_hook(self._transform_latent)

    @property
    def _resize_kw(self) -> dict[str, Any]:
        return {'interpolation': self.interpolation, 'antialias': self.antialias}

    def draw(self, rank_seed: int, batch: int, microbatch: int) -> tuple[Branch, SpatialTransform]:
        """The branch and transform of one microbatch: a pure function of these seeds and the options.

        Args:
            rank_seed: the rank's seed (Composer's ``state.seed``).
            batch: the training batch (``state.timestamp.batch``).
            microbatch: the microbatch within the batch.

        Returns:
            tuple[Branch, SpatialTransform]: the identity transform for the full-resolution branch.
        """
        generator = torch.Generator().manual_seed(microbatch_seed(rank_seed, batch, microbatch))
        branch = sample_branch(self.p_equivariance, self.p_lowres, generator)
        if branch == Branch.EQUIVARIANCE:
            return branch, sample_transform(self.scales, self.rotations, self.anisotropic, generator)
        if branch == Branch.LOW_RES:
            return branch, SpatialTransform(*sample_scales(self.scales, self.anisotropic, generator))
        return branch, SpatialTransform()

    def _begin_microbatch(self, state: State, logger: Logger) -> None:
        self._branch, self._transform = self.draw(self._rank_seed, int(state.timestamp.batch), self._microbatch)
        self._microbatch += 1
        if self._branch == Branch.EQUIVARIANCE:
            self._armed, self._hook_calls = True, 0
        elif self._branch == Branch.LOW_RES:
            scale_h, scale_w = self._transform.scale_h, self._transform.scale_w
            self._swap_image(state, lambda x: downscale_image(x, scale_h, scale_w, self._factor, **self._resize_kw))
        # Fixed keys on every step and rank: Composer's loggers and all-reduces expect that.
        logger.log_metrics({
            'eqvae/branch': float(self._branch),
            'eqvae/scale_h': self._transform.scale_h,
            'eqvae/scale_w': self._transform.scale_w,
            'eqvae/rotation_deg': 90.0 * self._transform.quarter_turns,
        })

    def _swap_image(self, state: State, fn) -> None:
        image = state.batch_get_item(self.image_key)
        if self._original_image is None:
            self._original_image = image
        state.batch_set_item(self.image_key, fn(image))

    def _transform_latent(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        if not self._armed:
            return None
        self._hook_calls += 1
        # contiguous: rot90 returns a strided view, which would give the decoder odd-strided gradients
        return (apply_to_latent(args[0], self._transform, **self._resize_kw).contiguous(), *args[1:])

    def _check_hook_ran(self) -> None:
        if self._armed and self._hook_calls == 0:
            raise RuntimeError(
                "EquivarianceAlgorithm: the model's forward did not decode a latent through the AutoencoderKL, "
                'so the equivariance transform could not be applied. The forward must run the VAE decoder.',
            )
        self._armed = False
