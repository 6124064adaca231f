"""The ComposerModel of the probe: wires a DiT network to the flow or DDPM objective; all maths lives elsewhere."""

from __future__ import annotations

import enum
from typing import Any

import torch
from composer.models import ComposerModel
from diffusers import DiTTransformer2DModel
from torchmetrics import MeanMetric, Metric

from eqvae_composer.diffusion.ddpm import DDPMSchedule, ddpm_loss, linear_betas, q_sample
from eqvae_composer.diffusion.flow import flow_matching_loss, linear_path, sample_times
from eqvae_composer.diffusion.guidance import drop_labels, guided, label_drop_mask
from eqvae_composer.diffusion.sampling import ddpm_scheduler, sample_ddpm, sample_ode

__all__ = ['ComposerLatentDiffusion', 'LevelLoss', 'Objective']


class Objective(str, enum.Enum):
    """``flow``: SiT's linear flow matching, velocity prediction. ``ddpm``: DiT's epsilon + learned variance."""

    flow = 'flow'
    ddpm = 'ddpm'


class ComposerLatentDiffusion(ComposerModel):
    """Class-conditional latent diffusion on a ``DiTTransformer2DModel``.

    The training draws (noise, time, which labels are dropped) come from torch's global RNG, which
    Composer seeds and checkpoints, so a resumed run draws what an uninterrupted one would.

    Evaluation reports the loss at fixed noise levels with fixed noise (``eval_seed``): the same numbers for
    the same weights and data, comparable between checkpoints and between VAEs' latents.

    Args:
        transformer: The network (``network.build_dit``); its ``out_channels`` is twice ``in_channels``
            exactly when the DDPM objective learns the variance.
        objective: ``'flow'`` or ``'ddpm'``. Default: ``'flow'``.
        num_classes: Classes; label ``num_classes`` is the null class. Default: the network's.
        label_dropout: Probability of training a sample unconditionally (CFG). Default: 0.1 (DiT, SiT).
        num_timesteps: DDPM's length. Default: 1000.
        eval_levels: Noise levels for the validation loss: times in (0, 1) (flow; 0 is pure noise) or
            fractions of ``num_timesteps`` (ddpm). Default: (0.1, 0.3, 0.5, 0.7, 0.9).
        eval_seed: Seed of the validation noise. Default: 0.
        latent_key: Batch key of the latents. Default: ``'latent'``.
        label_key: Batch key of the labels; a batch without it trains unconditionally. Default: ``'label'``.
    """

    def __init__(
        self,
        transformer: DiTTransformer2DModel,
        objective: Objective | str = Objective.flow,
        num_classes: int | None = None,
        label_dropout: float = 0.1,
        num_timesteps: int = 1000,
        eval_levels: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9),
        eval_seed: int = 0,
        latent_key: str = 'latent',
        label_key: str = 'label',
    ) -> None:
        super().__init__()
        self.transformer = transformer
        self.objective = Objective(objective)
        config = transformer.config
        self.learn_sigma = config.out_channels == 2 * config.in_channels and self.objective == Objective.ddpm
        if self.objective == Objective.flow and config.out_channels not in (None, config.in_channels):
            raise ValueError('the flow objective predicts a velocity: the network needs out_channels == in_channels.')
        self.num_classes = int(num_classes if num_classes is not None else config.num_embeds_ada_norm)
        if not 0 <= label_dropout <= 1:
            raise ValueError(f'label_dropout must be in [0, 1], got {label_dropout}.')
        self.label_dropout = label_dropout
        self.schedule = DDPMSchedule(linear_betas(num_timesteps))
        if not all(0 < level < 1 for level in eval_levels):
            raise ValueError(f'eval_levels must lie in (0, 1), got {list(eval_levels)}.')
        self.eval_levels = tuple(eval_levels)
        self.eval_seed = eval_seed
        self.latent_key, self.label_key = latent_key, label_key
        self.train_metrics: dict[str, Metric] = {}
        self.val_metrics: dict[str, Metric] = {'ValLoss': LevelLoss(None)}
        for i, level in enumerate(self.eval_levels):
            self.val_metrics[_level_name(level)] = LevelLoss(i)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def network(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The network's prediction at ``(x, t)``: ``t`` in [0, 1] (flow, as SiT) or integer steps (ddpm, as DiT)."""
        return self.transformer(x, timestep=t, class_labels=labels, return_dict=False)[0]

    def _labels(self, batch: dict[str, Any], latents: torch.Tensor) -> torch.Tensor:
        labels = batch.get(self.label_key)
        if labels is None:
            return torch.full((latents.shape[0],), self.null_label, dtype=torch.long, device=latents.device)
        return labels.long()

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """One training draw: noise, time and label dropout, then the network's prediction."""
        x1 = batch[self.latent_key]
        batch_size = x1.shape[0]
        labels = self._labels(batch, x1)
        if self.training:
            dropped = label_drop_mask(batch_size, self.label_dropout, device=x1.device)
            labels = drop_labels(labels, dropped, self.null_label)
        noise = torch.randn_like(x1)
        if self.objective == Objective.flow:
            t = sample_times(batch_size, device=x1.device)
            return self._predict_flow(x1, noise, t, labels)
        t = torch.randint(0, self.schedule.num_timesteps, (batch_size,), device=x1.device)
        return self._predict_ddpm(x1, noise, t, labels)

    def _predict_flow(self, x1, noise, t, labels):
        xt, target = linear_path(x1, noise, t)
        return {'prediction': self.network(xt, t, labels), 'target': target}

    def _predict_ddpm(self, x1, noise, t, labels):
        xt = q_sample(self.schedule, x1, t, noise)
        return {'prediction': self.network(xt, t, labels), 'x_start': x1, 'x_t': xt, 't': t, 'noise': noise}

    def _per_sample_loss(self, outputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.objective == Objective.flow:
            return {'loss': flow_matching_loss(outputs['prediction'], outputs['target'])}
        return ddpm_loss(
            self.schedule,
            outputs['prediction'],
            outputs['x_start'],
            outputs['x_t'],
            outputs['t'],
            outputs['noise'],
            learn_sigma=self.learn_sigma,
        )

    def loss(self, outputs: dict[str, torch.Tensor], batch: Any) -> dict[str, torch.Tensor]:
        """``{'total'}`` (flow) or ``{'total', 'mse', 'vb'}`` (ddpm): batch means, the same keys every step."""
        terms = {k: v.mean() for k, v in self._per_sample_loss(outputs).items()}
        return {'total': terms.pop('loss'), **terms}

    def eval_forward(self, batch: dict[str, Any], outputs: Any | None = None) -> dict[str, torch.Tensor]:
        """Per-sample losses at each of ``eval_levels``, ``(B, levels)``, with noise fixed by ``eval_seed``."""
        x1 = batch[self.latent_key]
        labels = self._labels(batch, x1)
        generator = torch.Generator(device=x1.device).manual_seed(self.eval_seed)
        noise = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        losses = []
        for level in self.eval_levels:
            if self.objective == Objective.flow:
                t = x1.new_full((x1.shape[0],), level)
                out = self._predict_flow(x1, noise, t, labels)
            else:
                step = round(level * (self.schedule.num_timesteps - 1))
                t = torch.full((x1.shape[0],), step, dtype=torch.long, device=x1.device)
                out = self._predict_ddpm(x1, noise, t, labels)
            losses.append(self._per_sample_loss(out)['loss'])
        return {'losses': torch.stack(losses, dim=1)}

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return self.train_metrics if is_train else self.val_metrics

    def update_metric(self, batch: Any, outputs: dict[str, torch.Tensor], metric: Metric) -> None:
        # Composer hands over copies of get_metrics' objects: each knows its column itself.
        assert isinstance(metric, LevelLoss)
        losses = outputs['losses']
        metric.update(losses.mean(dim=1) if metric.level_index is None else losses[:, metric.level_index])

    @torch.no_grad()
    def generate(
        self,
        labels: torch.Tensor,
        noise: torch.Tensor,
        guidance_scale: float = 1.0,
        num_steps: int = 50,
        sampler: str | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Scaled latents for ``labels`` from ``noise``.

        Args:
            labels: Classes, ``(B,)`` (``num_classes``: unconditional).
            noise: Initial noise, ``(B, C, h, w)``.
            guidance_scale: Classifier-free guidance; 1 is none. Default: 1.
            num_steps: Solver steps. Default: 50.
            sampler: ``euler`` or ``heun`` (flow); ``ddpm`` or ``ddim`` (ddpm). Default: ``heun`` / ``ddpm``.
            generator: Seeds the DDPM sampler's noise. Default: torch's global RNG.
        """
        channels = noise.shape[1]
        model = guided(self.network, guidance_scale, self.null_label, guided_channels=channels)
        if self.objective == Objective.flow:
            return sample_ode(model, noise, labels, num_steps=num_steps, solver=sampler or 'heun')
        scheduler = ddpm_scheduler(sampler or 'ddpm', self.schedule.num_timesteps, self.learn_sigma)
        return sample_ddpm(model, noise, labels, scheduler, num_steps=num_steps, generator=generator)


class LevelLoss(MeanMetric):
    """The mean validation loss at one noise level (``level_index``), or over all of them (``None``)."""

    def __init__(self, level_index: int | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.level_index = level_index


def _level_name(level: float) -> str:
    return f'ValLoss/level_{level:g}'
