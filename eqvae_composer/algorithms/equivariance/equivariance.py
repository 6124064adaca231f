"""``EquivarianceAlgorithm``: EQ-VAE's implicit equivariance regularization as a Composer algorithm.

The algorithm works with any ComposerModel that holds one diffusers autoencoder with an adapter
(``eqvae_composer.introspection``: ``AutoencoderKL``, ``VQModel``), whose forward encodes
``batch[image_key]`` and decodes the latent, and whose loss compares the reconstruction with
``batch[image_key]``. Per microbatch it draws a branch (see ``transforms.sample_branch``):

* equivariance: a forward pre-hook on the autoencoder's latent entry point (the adapter's:
  ``AutoencoderKL``'s ``post_quant_conv``, else its decoder; ``VQModel``'s quantizer) replaces z by
  tau(z) inside the model's own forward, so the decoder runs once, on the transformed latent; before
  the loss, ``batch[image_key]`` is swapped for tau(x) and restored after it. The encoder saw x, so
  the KL term still sees the untransformed posterior.
* low-resolution prior preservation: ``batch[image_key]`` is downscaled before the forward and
  restored after the loss.
* full-resolution prior preservation: nothing changes.

Beyond the paper, ``transforms`` gives the equivariance branch a menu of taus with weights (flips,
latent-grid crops and translations, or pairs of your own; see ``menu.py``); by default it draws the
paper's scale-then-rotate, bit for bit.

Training metrics see consistent pairs: Composer updates them after the backward with the training
outputs against a copy of the batch taken before ``BEFORE_FORWARD``, so for a transformed microbatch
the model's ``update_metric`` is handed that batch with ``tau(x)`` (or the low-resolution input) in
place of ``x``. Every microbatch starts from a clean state, also after a forward or loss that raised.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import batch_set

from eqvae_composer.algorithms.equivariance.menu import (
    PairedTransform,
    ScaleRotate,
    TransformMenu,
    TransformPair,
    transform_image,
    transform_latent,
)
from eqvae_composer.algorithms.equivariance.transforms import (
    SCALE_MODES,
    Branch,
    SpatialTransform,
    check_target_size,
    downscale_image,
    sample_branch,
    sample_scales,
    smallest_scale,
)
from eqvae_composer.introspection import adapter_for, find_autoencoder, unwrap_model

__all__ = ['EquivarianceAlgorithm', 'microbatch_seed']

log = logging.getLogger(__name__)

_INTERPOLATIONS = ('bilinear', 'bicubic', 'nearest', 'area')


def microbatch_seed(rank_seed: int, batch: int, microbatch: int, pass_index: int = 0) -> int:
    """The seed of the generator a microbatch draws its branch and transform from.

    Public so that code reproducing the algorithm's draws outside a Trainer (the training benchmark)
    uses the same function rather than a copy.

    Args:
        rank_seed: the rank's seed (or the rank-zero seed, for draws shared across ranks).
        batch: the training batch.
        microbatch: the microbatch within the pass.
        pass_index: which pass over the batch's microbatches: 0, or 1 for the discriminator's own
            pass when the GAN updates alternate as in the reference (the model's ``draw_pass``).
    """
    # A stateless function of (rank seed, step, pass, microbatch): identical across runs with the same
    # seed and exact after an autoresume, without having to checkpoint a generator per rank.
    entropy = [rank_seed, batch, microbatch] + ([pass_index] if pass_index else [])
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)


@dataclass
class _Microbatch:
    """What the algorithm holds between a microbatch's ``BEFORE_FORWARD`` and its metric update."""

    branch: Branch = Branch.FULL_RES
    transform: SpatialTransform | PairedTransform = SpatialTransform()
    entry: int = -1  # the transform menu's entry that drew ``transform``; -1 outside the equivariance branch
    armed: bool = False  # the latent hook transforms z only between BEFORE_FORWARD and AFTER_FORWARD
    hook_calls: int = 0
    original_image: Any = None  # the batch's x while tau(x) or the low-resolution input stands in for it
    target: Any = None  # what the outputs must be compared with: tau(x) or the low-resolution input


class EquivarianceAlgorithm(Algorithm):
    """EQ-VAE (Kouzelis et al., ICML 2025): make a VAE's latents equivariant to scaling and rotation.

    ``EquivarianceAlgorithm()`` reproduces the reference implementation's defaults.

    The model contract: the ComposerModel holds one diffusers autoencoder with an adapter
    (``AutoencoderKL``, ``VQModel``; see ``eqvae_composer.introspection``); its ``forward`` encodes
    ``batch[image_key]`` and decodes the latent through the autoencoder (``vae.decode``, or from the
    adapter's latent entry point on), once; its ``loss`` compares the reconstruction with
    ``batch[image_key]``; its ``update_metric`` compares the outputs with ``batch[image_key]`` (it is
    handed the transformed target). Images of side ``size`` give targets as small as
    ``smallest_target_size(size, factor, scales)`` (16 px at 64 px, 64 px at 256 px for SD-VAE with
    the reference grid); a model that declares ``min_target_size`` (this project's model does, from
    its discriminator) is checked against it before the first forward at each input size.

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
        lowres_isotropic (bool): draw one scale for both axes in the low-resolution branch even when
            ``anisotropic``, as the reference does. Default: ``False`` (the low-resolution branch
            follows ``anisotropic``).
        shared_draws (bool): every rank draws the same branch and transform for a microbatch (seeded
            from the rank-zero seed), as the reference, which seeds Python's ``random`` identically
            on every rank. Default: ``False`` (each rank draws its own, from its own seed).
        rotations (Sequence[int]): the quarter turns to draw from, a subset of {0, 1, 2, 3}.
            Default: ``(1, 2, 3)`` (90, 180, 270 degrees).
        interpolation (str): resize mode for latents and images. Default: ``'bilinear'``
            (``align_corners=False``), as the reference.
        antialias (bool): antialias when resizing. Default: ``False``, as the reference.
        image_key (str | int): the batch key of the image. Default: ``'image'``.
        downsample_factor (int, optional): pixels per latent cell; read from the VAE's config when
            ``None``. Default: ``None``.
        min_target_size (int, optional): the smallest image side the model's loss accepts (e.g. 24 for
            a 3-layer PatchGAN); read from the model's ``min_target_size`` attribute when ``None``.
            Default: ``None``.
        transforms (Mapping, optional): beyond the paper, the taus the equivariance branch draws, one
            per microbatch by weight: ``TRANSFORM_PAIRS`` names (``scale_rotate``, the paper's, built
            from ``scales``, ``rotations`` and ``anisotropic``; ``hflip``; ``vflip``; ``crop``;
            ``translate``) or ``TransformPair`` objects -> weights (or, for a name, ``{weight: ...,
            <options>}``); see ``menu.TransformMenu``. Default: ``None``, i.e. ``{'scale_rotate': 1.0}``,
            the paper's draws bit for bit.
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
        lowres_isotropic: bool = False,
        shared_draws: bool = False,
        min_target_size: int | None = None,
        transforms: Mapping[str | TransformPair, float | Mapping[str, Any]] | None = None,
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
        if min_target_size is not None and int(min_target_size) < 1:
            raise ValueError(f'min_target_size must be a positive integer, got {min_target_size!r}.')

        self.p_equivariance = float(p_equivariance)
        self.p_lowres = float(p_lowres)
        self.scales = scales
        self.anisotropic = bool(anisotropic)
        self.lowres_isotropic = bool(lowres_isotropic)
        self.shared_draws = bool(shared_draws)
        self.rotations = rotations
        self.interpolation = interpolation
        self.antialias = bool(antialias)
        self.image_key = image_key
        self.downsample_factor = downsample_factor
        self.min_target_size = None if min_target_size is None else int(min_target_size)
        self.transforms = transforms
        self._menu = TransformMenu(transforms, ScaleRotate(scales, rotations, self.anisotropic))

        self._min_size: int | None = None  # min_target_size, else the model's, resolved at INIT
        self._model: Any = None
        self._pass = 0  # the model's draw_pass when the current evaluation of the training closure began
        self._microbatch = 0  # microbatches begun in the current pass
        self._current = _Microbatch()
        self._checked_sizes: set[tuple[int, int]] = set()
        self._hook_handles: list[torch.utils.hooks.RemovableHandle] = []
        self._metric_model: Any = None

    def __repr__(self) -> str:
        # Every constructor argument from the attribute of its name, so eval(repr(algorithm)) rebuilds it.
        names = [name for name in inspect.signature(type(self).__init__).parameters if name != 'self']
        arguments = ', '.join(f'{name}={getattr(self, name)!r}' for name in names)
        return f'{type(self).__name__}({arguments})'

    @property
    def branch(self) -> Branch:
        """The branch of the current (or last) training microbatch."""
        return self._current.branch

    @property
    def transform(self) -> SpatialTransform | PairedTransform:
        """The transform of the current (or last) training microbatch; the identity at full resolution."""
        return self._current.transform

    @property
    def target_scales(self) -> str | Sequence[float]:
        """What ``check_target_size`` checks: ``scales``, or the smallest fraction a transform menu entry draws."""
        smallest = min(smallest_scale(self.scales), self._menu.smallest_fraction)
        return self.scales if smallest == smallest_scale(self.scales) else (smallest,)

    def match(self, event: Event, state: State) -> bool:
        return event in (
            Event.INIT,
            Event.FIT_START,
            Event.BATCH_START,
            Event.BEFORE_TRAIN_BATCH,
            Event.BEFORE_FORWARD,
            Event.AFTER_FORWARD,
            Event.BEFORE_LOSS,
            Event.AFTER_LOSS,
            Event.AFTER_TRAIN_BATCH,
            Event.EVAL_START,
        )

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self._attach(state)
        elif event == Event.FIT_START:
            resolution = getattr(getattr(state.train_dataloader, 'dataset', None), 'resolution', None)
            if isinstance(resolution, int):
                self._check_target_size((resolution, resolution))
        elif event == Event.BEFORE_TRAIN_BATCH:
            # Each evaluation of the optimizer's closure starts here. An optimizer that evaluates it again
            # in the same step (SAM's ascent, then its descent; LBFGS) must see the same objective, so the
            # draws restart; only a new pass of the model's own (the alternating discriminator pass)
            # draws anew.
            self._microbatch = 0
            self._pass = int(getattr(self._model, 'draw_pass', 0))
        elif event == Event.BEFORE_FORWARD:
            self._begin_microbatch(state, logger)
        elif event == Event.AFTER_FORWARD:
            self._check_hook_ran()
        elif event == Event.BEFORE_LOSS:
            if self._current.branch == Branch.EQUIVARIANCE:
                self._swap_image(
                    state, lambda x: transform_image(x, self._current.transform, self._factor, **self._resize_kw)
                )
        elif event == Event.AFTER_LOSS:
            if self._current.original_image is not None:
                state.batch_set_item(self.image_key, self._current.original_image)
                self._current.original_image = None
        elif event == Event.AFTER_TRAIN_BATCH:
            self._end_microbatch()
        elif event == Event.EVAL_START:
            self._end_microbatch()

    # --- event handlers -------------------------------------------------------------------

    def _attach(self, state: State) -> None:
        vae = find_autoencoder(state.model)
        adapter = adapter_for(vae)
        if getattr(vae, 'use_tiling', False):
            raise ValueError('EquivarianceAlgorithm cannot transform tiled decoding; call vae.disable_tiling().')
        self._factor = int(self.downsample_factor or adapter.downsample_factor(vae))
        self._seed = int(state.rank_zero_seed if self.shared_draws else state.seed)
        model = unwrap_model(state.model)
        self._model = model
        declared = self.min_target_size if self.min_target_size is not None else getattr(model, 'min_target_size', None)
        self._min_size = int(declared) if declared is not None else None
        self._checked_sizes.clear()
        for handle in self._hook_handles:  # the same instance reused by a second Trainer
            handle.remove()
        self._hook_handles = [
            adapter.latent_entry(vae).register_forward_pre_hook(self._transform_latent),
            # always_call: disarmed when the model's forward returns *or raises*, so no later forward
            # (an eval, a retry, a direct call) decodes a transformed latent by accident.
            model.register_forward_hook(self._disarm, always_call=True),
        ]
        self._wrap_update_metric(model)

    def _wrap_update_metric(self, model: Any) -> None:
        """Hand ``update_metric`` the transformed target for the training outputs of a transformed microbatch."""
        if self._metric_model is model:
            return
        original: Callable = model.update_metric

        def update_metric(batch: Any, outputs: Any, metric: Any) -> Any:
            target = self._current.target
            if target is not None:
                batch = batch_set(copy.copy(batch), self.image_key, target)
            return original(batch, outputs, metric)

        model.update_metric = update_metric
        self._metric_model = model

    @property
    def _resize_kw(self) -> dict[str, Any]:
        return {'interpolation': self.interpolation, 'antialias': self.antialias}

    def draw(
        self,
        rank_seed: int,
        batch: int,
        microbatch: int,
        pass_index: int = 0,
    ) -> tuple[Branch, SpatialTransform | PairedTransform]:
        """The branch and transform of one microbatch: a pure function of these seeds and the options.

        Args:
            rank_seed: the rank's seed (Composer's ``state.seed``; ``state.rank_zero_seed`` with
                ``shared_draws``).
            batch: the training batch (``state.timestamp.batch``).
            microbatch: the microbatch within the pass.
            pass_index: the pass over the batch (see ``microbatch_seed``). Default: ``0``.

        Returns:
            tuple[Branch, SpatialTransform | PairedTransform]: the identity transform for the
            full-resolution branch; in the equivariance branch, what the transform menu drew.
        """
        branch, _, transform = self._draw(rank_seed, batch, microbatch, pass_index)
        return branch, transform

    def _draw(
        self, rank_seed: int, batch: int, microbatch: int, pass_index: int
    ) -> tuple[Branch, int, SpatialTransform | PairedTransform]:
        """``draw`` with the transform menu's entry (-1 outside the equivariance branch), for the logs."""
        generator = torch.Generator().manual_seed(microbatch_seed(rank_seed, batch, microbatch, pass_index))
        branch = sample_branch(self.p_equivariance, self.p_lowres, generator)
        if branch == Branch.EQUIVARIANCE:
            return branch, *self._menu.sample(generator)
        if branch == Branch.LOW_RES:
            anisotropic = self.anisotropic and not self.lowres_isotropic
            return branch, -1, SpatialTransform(*sample_scales(self.scales, anisotropic, generator))
        return branch, -1, SpatialTransform()

    def _begin_microbatch(self, state: State, logger: Logger) -> None:
        # A fresh state whatever the last microbatch left behind: a forward or loss that raised (an OOM
        # retried by auto microbatching, a user's try/except) never reached AFTER_FORWARD/AFTER_LOSS.
        stale = self._current
        if stale.original_image is not None and state.batch_get_item(self.image_key) is stale.target:
            state.batch_set_item(self.image_key, stale.original_image)  # the same batch again: give x back
        branch, entry, transform = self._draw(self._seed, int(state.timestamp.batch), self._microbatch, self._pass)
        self._current = _Microbatch(branch, transform, entry)
        self._microbatch += 1
        image = state.batch_get_item(self.image_key)
        self._check_target_size(tuple(image.shape[-2:]))
        if branch == Branch.EQUIVARIANCE:
            self._current.armed = True
        elif branch == Branch.LOW_RES:
            self._swap_image(
                state,
                lambda x: downscale_image(x, transform.scale_h, transform.scale_w, self._factor, **self._resize_kw),
            )
        # Fixed keys on every step and rank: Composer's loggers and all-reduces expect that. A menu tau
        # without a scale or rotation logs the identity's; a menu of several entries logs which one drew.
        metrics = {
            'eqvae/branch': float(branch),
            'eqvae/scale_h': float(getattr(transform, 'scale_h', 1.0)),
            'eqvae/scale_w': float(getattr(transform, 'scale_w', 1.0)),
            'eqvae/rotation_deg': 90.0 * getattr(transform, 'quarter_turns', 0),
        }
        if len(self._menu.pairs) > 1:
            metrics['eqvae/transform'] = float(entry)
        logger.log_metrics(metrics)

    def _check_target_size(self, size: tuple[int, int]) -> None:
        """Fail before any work when the smallest draws would give the model images it cannot take."""
        if self._min_size is None or size in self._checked_sizes or self.p_equivariance + self.p_lowres == 0:
            return
        check_target_size(size, self._factor, self.target_scales, self._min_size)
        self._checked_sizes.add(size)

    def _swap_image(self, state: State, fn) -> None:
        image = state.batch_get_item(self.image_key)
        if self._current.original_image is None:
            self._current.original_image = image
        self._current.target = fn(image)
        state.batch_set_item(self.image_key, self._current.target)

    def _transform_latent(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        if not self._current.armed:
            return None
        self._current.hook_calls += 1
        return (transform_latent(args[0], self._current.transform, **self._resize_kw), *args[1:])

    def _end_microbatch(self) -> None:
        """Nothing of the last microbatch reaches what runs next; its branch and transform stay readable."""
        self._current.armed = False
        self._current.target = None
        self._current.original_image = None

    def _disarm(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self._current.armed = False

    def _check_hook_ran(self) -> None:
        if self._current.branch == Branch.EQUIVARIANCE and self._current.hook_calls == 0:
            raise RuntimeError(
                "EquivarianceAlgorithm: the model's forward did not decode a latent through the autoencoder, "
                'so the equivariance transform could not be applied. The forward must run the VAE decoder.',
            )
