"""Save image grids of reconstructions and transformed reconstructions, and PCA views of the latents.

Each firing writes, for a fixed set of images and fixed transforms,
``reconstructions_ba<batch>.png`` (rows: images; columns: input | reconstruction | then per tau
tau(x) | D(tau(z))) and ``latent_pca_ba<batch>.png`` (input | first three principal components of
the latent as RGB), into ``folder`` on rank 0 and through ``logger.log_images`` to every logger.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from composer.core import Callback, Event, State, Time
from composer.loggers import Logger
from composer.utils import create_interval_scheduler, dist, format_name_with_dist, model_eval_mode
from torch.utils.data import default_collate
from torchvision.utils import save_image

from eqvae_composer.algorithms.equivariance.transforms import SpatialTransform, apply_to_image, apply_to_latent
from eqvae_composer.evaluation.visualize import image_rows, latent_pca_rgb, upsample_nearest
from eqvae_composer.introspection import unwrap_model

__all__ = ['DEFAULT_GRID_TRANSFORMS', 'ImageGridCallback']

#: One rotation and one scale: the two kinds of equivariance the paper measures.
DEFAULT_GRID_TRANSFORMS: tuple[SpatialTransform, ...] = (
    SpatialTransform(quarter_turns=1),
    SpatialTransform(0.5, 0.5),
)


def _first_images(dataloader: Any, count: int, image_key: str) -> torch.Tensor | None:
    """The first ``count`` images of a dataloader's dataset, by index when it allows (no iterator is consumed)."""
    dataset = getattr(dataloader, 'dataset', None)
    if dataset is not None and hasattr(dataset, '__getitem__'):
        try:
            samples = [dataset[i] for i in range(count)]
        except (IndexError, NotImplementedError):
            samples = None
        if samples:
            batch = default_collate(samples)
            return batch[image_key] if isinstance(batch, dict) else batch
    batch = next(iter(dataloader), None)
    if batch is None:
        return None
    return (batch[image_key] if isinstance(batch, dict) else batch)[:count]


class ImageGridCallback(Callback):
    """PNG grids of input | reconstruction | tau(x) | D(tau(z)) and of PCA-coloured latents, at an interval.

    The images are fixed at ``FIT_START``: ``images`` if given, else the first ``num_images`` of the
    (first) eval dataloader's dataset, else of the train dataloader's. Reconstructions use the
    posterior mode, so grids at different steps differ only by training. Every rank computes (FSDP
    needs all ranks in each forward); rank 0 writes the files.

    Args:
        interval (str | int | Time): how often, e.g. ``'1ep'`` or ``'500ba'``; also at the end of
            training. Default: ``'1ep'``.
        num_images (int): rows of the grid. Default: ``4``.
        transforms (Sequence[SpatialTransform | Mapping], optional): the taus shown; mappings (from
            YAML) are ``SpatialTransform`` keyword arguments. Default:
            ``DEFAULT_GRID_TRANSFORMS`` (90 degrees; scale 0.5).
        folder (str): where PNGs go; ``{run_name}`` and the other ``format_name_with_dist``
            fields are filled in. Default: ``'{run_name}/image_grids'``.
        images (Tensor, optional): ``(B, 3, H, W)`` in [-1, 1], instead of taking them from a dataloader.
        image_key (str): batch key of the images. Default: ``'image'``.
        interpolation (str): resize mode of tau, as in training. Default: ``'bilinear'``.
    """

    def __init__(
        self,
        interval: str | int | Time = '1ep',
        num_images: int = 4,
        transforms: Sequence[SpatialTransform | Mapping[str, Any]] | None = None,
        folder: str = '{run_name}/image_grids',
        images: torch.Tensor | None = None,
        image_key: str = 'image',
        interpolation: str = 'bilinear',
    ) -> None:
        if num_images < 1:
            raise ValueError(f'num_images must be positive, got {num_images}.')
        self.should_run = create_interval_scheduler(interval)
        self.num_images = num_images
        self.transforms = tuple(
            SpatialTransform(**tau) if isinstance(tau, Mapping) else tau
            for tau in (DEFAULT_GRID_TRANSFORMS if transforms is None else transforms)
        )
        self.folder = folder
        self.images = None if images is None else images[:num_images]
        self.image_key = image_key
        self.interpolation = interpolation
        #: Paths written so far (rank 0).
        self.saved: list[str] = []

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START:
            self._fit_start(state)
        elif self.should_run(state, event):
            self._render(state, logger)

    def _fit_start(self, state: State) -> None:
        if self.images is None:
            loaders = [evaluator.dataloader.dataloader for evaluator in state.evaluators] + [state.dataloader]
            for loader in loaders:
                if loader is not None:
                    self.images = _first_images(loader, self.num_images, self.image_key)
                    if self.images is not None:
                        break
        if self.images is None:
            raise ValueError('ImageGridCallback found no images: pass images= or give the Trainer a dataloader.')

    def _decode(self, autoencoder: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
        # Through the wrapped module's forward: FSDP gathers parameters only there.
        return autoencoder(latents=latents)['reconstruction']

    @torch.no_grad()
    def _render(self, state: State, logger: Logger) -> None:
        model = unwrap_model(state.model)
        autoencoder = model.autoencoder
        images = state.device.tensor_to_device(self.images)
        factor = model.downsample_factor
        with model_eval_mode(model):
            outputs = autoencoder(images, sample_posterior=False)
            latents = outputs['latents']
            columns = [images, outputs['reconstruction']]
            for tau in self.transforms:
                columns.append(apply_to_image(images, tau, factor, self.interpolation))
                moved = apply_to_latent(latents, tau, self.interpolation)
                columns.append(self._decode(autoencoder, moved))
        size = images.shape[-2:]
        grids = {
            'reconstructions': image_rows(columns, size),
            'latent_pca': image_rows([images, upsample_nearest(latent_pca_rgb(latents), size) * 2 - 1], size),
        }
        batch = int(state.timestamp.batch)
        folder = format_name_with_dist(self.folder, state.run_name)
        for name, grid in grids.items():
            if dist.get_global_rank() == 0:
                os.makedirs(folder, exist_ok=True)
                path = os.path.join(folder, f'{name}_ba{batch:06d}.png')
                save_image(grid, path)
                self.saved.append(path)
            logger.log_images(grid, name=f'image_grid/{name}', step=batch)
