"""``SampleGridCallback``: a PNG grid of class-conditional samples, decoded by the latents' VAE, at each evaluation."""

from __future__ import annotations

import os
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist, model_eval_mode
from torchvision.utils import save_image

from eqvae_composer.diffusion.model import ComposerLatentDiffusion
from eqvae_composer.diffusion.vae import LatentDecoder

__all__ = ['SampleGridCallback']


class SampleGridCallback(Callback):
    """Samples fixed classes from fixed noise when each evaluation starts, and writes them as one grid.

    At ``EVAL_START`` the EMA algorithm (when the run has it) has already swapped its weights in, so
    the grid shows the weights evaluation scores. Every rank samples (FSDP gathers parameters in the
    network's forward); rank 0 decodes with the VAE that ``latents.json`` records and writes
    ``<folder>/samples_ba<batch>.png``, one row per class.

    Args:
        classes: The classes to draw. Default: the first 4.
        per_class: Samples per class (the grid's columns). Default: 4.
        guidance_scale: Classifier-free guidance. Default: 4.0 (DiT's grids).
        num_steps: Sampler steps. Default: 50.
        sampler: ``euler``/``heun`` (flow) or ``ddpm``/``ddim``; default the model's.
        seed: Seed of the noise. Default: 0.
        folder: Where the grids go. Default: ``samples``.
        vae: A diffusers folder to decode with instead of ``latents.json``'s ``vae.source``. Default: ``None``.
    """

    def __init__(
        self,
        classes: list[int] | None = None,
        per_class: int = 4,
        guidance_scale: float = 4.0,
        num_steps: int = 50,
        sampler: str | None = None,
        seed: int = 0,
        folder: str = 'samples',
        vae: str | None = None,
    ) -> None:
        if per_class < 1 or num_steps < 1:
            raise ValueError('per_class and num_steps must be at least 1.')
        self.classes = list(classes) if classes is not None else [0, 1, 2, 3]
        self.per_class = per_class
        self.guidance_scale = guidance_scale
        self.num_steps = num_steps
        self.sampler = sampler
        self.seed = seed
        self.folder = folder
        self.vae = vae
        self.decoder: LatentDecoder | None = None
        self.written: list[str] = []

    def fit_start(self, state: State, logger: Logger) -> None:
        dataset = state.train_dataloader.dataset if state.train_dataloader is not None else None
        metadata: dict[str, Any] | None = getattr(dataset, 'metadata', None)
        if metadata is None:
            raise ValueError(
                'sample_grid needs a StreamingLatentDataset train loader (its latents.json names the VAE).'
            )
        self.latent_shape = tuple(metadata['latent_shape'])
        if dist.get_global_rank() == 0:
            self.decoder = LatentDecoder(metadata, self.vae)

    def eval_start(self, state: State, logger: Logger) -> None:
        model = state.model.module if hasattr(state.model, 'module') else state.model
        assert isinstance(model, ComposerLatentDiffusion)
        device = next(model.parameters()).device
        labels = torch.tensor(self.classes, device=device).repeat_interleave(self.per_class)
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((len(labels), *self.latent_shape), generator=generator).to(device)
        with model_eval_mode(model):
            latents = model.generate(
                labels,
                noise,
                guidance_scale=self.guidance_scale,
                num_steps=self.num_steps,
                sampler=self.sampler,
                generator=torch.Generator(device=device).manual_seed(self.seed),
            )
        if self.decoder is None:
            return
        self.decoder.to(device)
        images = (self.decoder(latents.float()) + 1) / 2
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, f'samples_ba{int(state.timestamp.batch)}.png')
        save_image(images.cpu(), path, nrow=self.per_class)
        self.written.append(path)
        logger.log_images(images.cpu(), name='samples', step=int(state.timestamp.batch))
