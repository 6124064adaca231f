"""What the GAN-trained ComposerModels share whatever their autoencoder: ``ComposerAutoencoderKL``, ``ComposerVQModel``.

The loss (a ``ReconstructionGANLoss``) owns the discriminator, so the model gives it the training
step (``disc_start``), the phase of the reference's alternating updates, the decoder's last layer
and its input (the adaptive weight), and builds the two optimizer parameter groups.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from composer.models import ComposerModel
from torch import nn
from torchmetrics import Metric

from eqvae_composer.data.dataset import PADDING_KEY
from eqvae_composer.evaluation.metrics import (
    LatentEquivarianceError,
    LPIPSMetric,
    ReconstructionPSNR,
    ReconstructionSSIM,
    equivariance_errors,
    eval_transforms,
)
from eqvae_composer.models.loss import GAN_PHASES, ReconstructionGANLoss
from eqvae_composer.models.lpips import lpips_distance
from eqvae_composer.padding import smallest_image_side

__all__ = ['GANAutoencoderModel', 'counted_samples', 'recorded_calls']


def counted_samples(batch: Any) -> slice | torch.Tensor | None:
    """The samples of an eval batch that its metrics count: all (``slice(None)``), a mask, or ``None`` for none.

    StreamingDataset repeats samples to give every rank as many (``PADDING_KEY`` marks the repeats):
    each sample counts once.
    """
    padding = batch.get(PADDING_KEY) if isinstance(batch, Mapping) else None
    if padding is None:
        return slice(None)
    keep = ~padding
    return keep if keep.any() else None


@contextlib.contextmanager
def recorded_calls(module: nn.Module) -> Iterator[list[tuple[tuple, Any]]]:
    """``(args, output)`` of every forward call of ``module`` inside the context, and no hook after it.

    The hook lives only for the context, so direct calls outside it record nothing and wrapping the
    same autoencoder twice leaves no hook behind.
    """
    calls: list[tuple[tuple, Any]] = []
    handle = module.register_forward_hook(lambda _, args, output: calls.append((args, output)))
    try:
        yield calls
    finally:
        handle.remove()


class GANAutoencoderModel(ComposerModel):
    """A ComposerModel around one diffusers autoencoder (``self.vae``) trained with a ``ReconstructionGANLoss``.

    Subclasses set ``self.loss_fn``, then call ``_set_eval_metrics``; they define ``vae``, ``EVAL_METRICS``
    and ``_equivariance_latent``; ``forward`` runs under ``_forward_grad()`` and ``loss`` calls ``_gan_loss``.
    The eval metrics (reconstruction, LPIPS, equivariance) are shared; a subclass adds its own through
    ``_metric_factories`` and ``update_metric``.
    """

    loss_fn: ReconstructionGANLoss
    #: Metric name -> what it measures on the eval set.
    EVAL_METRICS: Mapping[str, str] = {}

    def __init__(self) -> None:
        super().__init__()
        #: The training step, compared with the loss's ``disc_start``; kept current by ``GlobalStepCallback``.
        #: ``None`` until something sets it: with ``disc_start > 0`` training then stops with a clear error
        #: rather than treating every step as step 0.
        self.global_step: int | None = None
        self._gan_phase: str | None = None

    @property
    def vae(self) -> nn.Module:
        raise NotImplementedError

    @property
    def min_target_size(self) -> int:
        """The smallest image side the model trains on, read by ``EquivarianceAlgorithm``: its discriminator's, and
        with reflection padding, two latent cells (``padding.smallest_image_side``)."""
        discriminator = self.loss_fn.discriminator
        needed = 1 if discriminator is None else discriminator.min_input_size
        return max(needed, smallest_image_side(self.vae, self.downsample_factor))

    @property
    def draw_pass(self) -> int:
        """Which pass over the batch runs, read by ``EquivarianceAlgorithm``: 1 in the discriminator's, else 0.

        The alternating discriminator pass draws its own branch and transform, as the reference's second
        ``training_step``; an optimizer that evaluates the same pass again (SAM) gets the same draws.
        """
        return 1 if self._gan_phase == 'discriminator' else 0

    def param_groups(
        self,
        lr: float,
        betas: tuple[float, float] = (0.5, 0.9),
        disc_lr: float | None = None,
        disc_betas: tuple[float, float] | None = None,
        weight_decay: float = 0.0,
    ) -> list[dict[str, Any]]:
        """Two optimizer parameter groups: the autoencoder (and a learnable ``logvar``), the discriminator."""
        discriminator = self.loss_fn.discriminator
        disc_params = [] if discriminator is None else list(discriminator.parameters())
        disc_ids = {id(p) for p in disc_params}
        ae_params = [p for p in self.parameters() if p.requires_grad and id(p) not in disc_ids]
        groups = [{'params': ae_params, 'lr': lr, 'betas': tuple(betas), 'weight_decay': weight_decay}]
        if disc_params:
            groups.append(
                {
                    'params': disc_params,
                    'lr': lr if disc_lr is None else disc_lr,
                    'betas': tuple(betas if disc_betas is None else disc_betas),
                    'weight_decay': weight_decay,
                }
            )
        return groups

    @contextlib.contextmanager
    def gan_phase(self, phase: str) -> Iterator[None]:
        """Inside the context, ``forward`` and ``loss`` train one side only, as one of the reference's two passes.

        ``'autoencoder'``: the autoencoder's loss, no gradient for the discriminator.
        ``'discriminator'``: a fresh reconstruction made without autograd (the autoencoder gets no
        gradient, as under Lightning's optimizer toggling) and the hinge loss only. Used by
        ``AlternatingGANUpdates``; outside it, one pass trains both.

        Args:
            phase (str): one of ``GAN_PHASES``.
        """
        if phase not in GAN_PHASES:
            raise ValueError(f'phase must be one of {GAN_PHASES}, got {phase!r}.')
        previous, self._gan_phase = self._gan_phase, phase
        try:
            yield
        finally:
            self._gan_phase = previous

    def _forward_grad(self) -> contextlib.AbstractContextManager:
        # The discriminator's pass needs a fresh reconstruction, not the autoencoder's gradients. The
        # autoencoder still runs through the wrapped module's forward, so FSDP gathers its parameters as usual.
        return torch.no_grad() if self._gan_phase == 'discriminator' else contextlib.nullcontext()

    def _gan_loss(
        self,
        target: torch.Tensor,
        reconstruction: torch.Tensor,
        latent: Any,
        last_layer_input: torch.Tensor | None,
    ) -> dict[str, torch.Tensor]:
        """``self.loss_fn`` on one microbatch, with the step, the phase and the decoder's last layer."""
        if self.global_step is None and self.loss_fn.disc_start > 0 and self.training:
            raise RuntimeError(
                f'disc_start={self.loss_fn.disc_start} needs the training step: add '
                "eqvae_composer.callbacks.GlobalStepCallback() to the Trainer's callbacks (train.py does), or set "
                'model.global_step yourself in a loop of your own.',
            )
        return self.loss_fn(
            target,
            reconstruction,
            latent,
            self.vae.decoder.conv_out,
            last_layer_input,
            self.global_step or 0,
            self._gan_phase,
        )

    # -----------------------------------------------------------------------------------------------------
    # Evaluation

    def _set_eval_metrics(self, eval_metrics: Sequence[str], lpips_metric: nn.Module | None) -> None:
        unknown = sorted(set(eval_metrics) - set(self.EVAL_METRICS))
        if unknown:
            raise ValueError(f'unknown eval_metrics {unknown}; choose from {sorted(self.EVAL_METRICS)}.')
        self.eval_metric_names = tuple(eval_metrics)
        # Not a submodule: the metric's network is the loss's (or frozen), never trained or checkpointed twice.
        object.__setattr__(self, '_lpips_metric_net', lpips_metric or self.loss_fn.lpips)
        if 'LPIPS' in self.eval_metric_names and self._lpips_metric_net is None:
            raise ValueError('the LPIPS eval metric needs an LPIPS network (see load_lpips).')

    def _equivariance_latent(self, outputs: dict[str, Any]) -> torch.Tensor:
        """The latent whose equivariance the eval measures, from an encode-only output of ``self.autoencoder``."""
        raise NotImplementedError

    def eval_forward(self, batch: Any, outputs: Any | None = None) -> dict[str, Any]:
        if outputs is not None:
            return outputs
        images = batch[self.image_key]
        outputs = self.autoencoder(images, sample_posterior=self.eval_sample_posterior)
        wants = {name for name in self.eval_metric_names if name.startswith('EquivarianceError')}
        if wants:
            # Each encode is its own forward call of the wrapped module, so FSDP gathers for it.
            def encode(x: torch.Tensor) -> torch.Tensor:
                return self._equivariance_latent(self.autoencoder(x, decode=False))

            latents = self._equivariance_latent(outputs)
            outputs['equivariance'] = {
                kind: equivariance_errors(encode, images, taus, self.downsample_factor, latents)
                for kind, taus in eval_transforms().items()
                if f'EquivarianceError{kind[0].upper()}' in wants
            }
        return outputs

    def _metric_factories(self) -> dict[str, Callable[[], Metric]]:
        return {
            'PSNR': ReconstructionPSNR,
            'SSIM': ReconstructionSSIM,
            'LPIPS': LPIPSMetric,
            'EquivarianceErrorR': lambda: LatentEquivarianceError('rotation'),
            'EquivarianceErrorS': lambda: LatentEquivarianceError('scale'),
        }

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        # No train metrics: under EquivarianceAlgorithm the training outputs are D(tau(z)), which Composer
        # would compare with an untransformed copy of the batch. The eval set measures the autoencoder.
        if is_train:
            return {}
        factories = self._metric_factories()
        return {name: factories[name]() for name in self.eval_metric_names}

    def update_metric(self, batch: Any, outputs: Any, metric: Metric) -> None:
        keep = counted_samples(batch)
        if keep is None:
            return
        self._update_metric(metric, batch[self.image_key][keep], outputs, keep)

    def _update_metric(self, metric: Metric, target: torch.Tensor, outputs: Any, keep: slice | torch.Tensor) -> None:
        """Update ``metric`` with the counted samples ``keep`` of a batch (``target``: those images)."""
        reconstruction = outputs['reconstruction'][keep]
        if isinstance(metric, LatentEquivarianceError):
            metric.update(outputs['equivariance'][metric.kind][:, keep])
        elif isinstance(metric, LPIPSMetric):
            with torch.no_grad():
                metric.update(lpips_distance(self._lpips_metric_net, target, reconstruction))
        else:
            metric.update(reconstruction, target)
