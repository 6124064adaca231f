"""YAML -> objects -> ``composer.Trainer`` for the diffusion probe: the library side of ``train_diffusion.py``.

The same shape as ``eqvae_composer.train``: a dataclass schema (a misspelt key is an error naming it),
``train(cfg) -> Trainer`` for tests, ``train_from_yaml(path, overrides)`` for the command line.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from composer import Trainer
from composer.algorithms import GradientClipping
from composer.core import Algorithm
from composer.utils import dist, get_device, parse_uri, reproducibility
from omegaconf import MISSING, DictConfig
from streaming import StreamingDataLoader

from eqvae_composer.callbacks.checkpointing import checkpoint_saver, restore_rng_mid_epoch
from eqvae_composer.config import (
    ConfigError,
    TrainerConfig,
    check_fsdp_version,
    instantiate,
    load_structured,
    per_device_batch_size,
    trainer_kwargs,
    validate_structured,
)
from eqvae_composer.diffusion.callbacks import SampleGridCallback
from eqvae_composer.diffusion.model import ComposerLatentDiffusion, Objective
from eqvae_composer.diffusion.network import build_dit, dit_config
from eqvae_composer.ema import EMA
from eqvae_composer.latents import StreamingLatentDataset
from eqvae_composer.registry import CALLBACKS, LOGGERS, SCHEDULERS

__all__ = ['DiffusionTrainConfig', 'build_model', 'load_config', 'train', 'train_from_yaml']

log = logging.getLogger(__name__)

# The project's EMA, not Composer's: Composer 0.32's fails under FSDP2 and checkpoints rank 0's shard only.
ALGORITHMS: dict[str, type[Algorithm]] = {'ema': EMA, 'gradient_clipping': GradientClipping}
# Composer's callbacks and ours; the autoencoder's image grid has no place here.
DIFFUSION_CALLBACKS = {**{k: v for k, v in CALLBACKS.items() if k != 'image_grid'}, 'sample_grid': SampleGridCallback}


@dataclass
class NetworkConfig:
    """``name``: ``DiT-<S|B|L|XL>/<2|4|8>``; ``overrides``: other ``DiTTransformer2DModel`` arguments."""

    name: str = 'DiT-B/2'
    overrides: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing: bool = False


@dataclass
class ObjectiveConfig:
    """``kind``: ``flow`` (SiT: linear path, velocity) or ``ddpm`` (DiT: epsilon, learned variance)."""

    kind: Objective = Objective.flow
    label_dropout: float = 0.1
    learn_sigma: bool | None = None  # ddpm only: DiT's learned variance range (None: True)
    num_timesteps: int = 1000  # ddpm only
    eval_levels: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    eval_seed: int = 0


@dataclass
class LatentLoaderConfig:
    """A dataloader over ``StreamingLatentDataset``; ``dataset`` holds its kwargs (``local``, ``remote``, ...)."""

    dataset: dict[str, Any] = MISSING
    num_workers: int = 0
    pin_memory: bool = False
    prefetch_factor: int | None = None
    persistent_workers: bool = False


@dataclass
class DiffusionOptimizerConfig:
    """AdamW; DiT and SiT train with lr 1e-4, no weight decay, constant lr."""

    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    fused: bool = True


@dataclass
class DiffusionTrainConfig(TrainerConfig):
    """The whole run; see ``yamls/diffusion/sit-b2.yaml`` for the reference recipe with comments."""

    device_eval_batch_size: int = 32
    seed: int = 0
    num_classes: int = MISSING
    network: NetworkConfig = field(default_factory=NetworkConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train_loader: LatentLoaderConfig = MISSING
    eval_loader: LatentLoaderConfig | None = None
    optimizer: DiffusionOptimizerConfig = field(default_factory=DiffusionOptimizerConfig)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> DiffusionTrainConfig:
    """Load a YAML, apply ``key=value`` overrides and check it against ``DiffusionTrainConfig``."""
    return load_structured(DiffusionTrainConfig, path, overrides)


def build_model(cfg: DiffusionTrainConfig, latent_shape: Sequence[int]) -> ComposerLatentDiffusion:
    """The ComposerModel for latents of ``latent_shape`` ``(C, h, w)``."""
    channels, height, width = latent_shape
    if height != width:
        raise ConfigError(f'the latents are {height}x{width}: DiT takes square latents.')
    objective = Objective(cfg.objective.kind)
    learn_sigma = objective == Objective.ddpm and cfg.objective.learn_sigma is not False
    try:
        config = dit_config(
            cfg.network.name, channels, height, cfg.num_classes, learn_sigma=learn_sigma, **cfg.network.overrides
        )
        network = build_dit(config)
    except (TypeError, ValueError) as error:
        raise ConfigError(f'network: {error}') from None
    if cfg.network.gradient_checkpointing:
        network.enable_gradient_checkpointing()
    try:
        return ComposerLatentDiffusion(
            network,
            objective=objective,
            num_classes=cfg.num_classes,
            label_dropout=cfg.objective.label_dropout,
            num_timesteps=cfg.objective.num_timesteps,
            eval_levels=tuple(cfg.objective.eval_levels),
            eval_seed=cfg.objective.eval_seed,
        )
    except ValueError as error:
        raise ConfigError(f'objective: {error}') from None


def _loader(loader: LatentLoaderConfig, batch_size: int, train: bool, seed: int, name: str) -> StreamingDataLoader:
    kwargs = dict(loader.dataset)
    kwargs.setdefault('batch_size', batch_size)
    kwargs.setdefault('shuffle', train)
    kwargs.setdefault('shuffle_seed', seed)
    if not train:
        kwargs.setdefault('sample_posterior', False)  # the validation loss needs the same latents every time
        kwargs.setdefault('flip', 'never')
    try:
        dataset = StreamingLatentDataset(**kwargs)
    except (FileNotFoundError, ValueError, TypeError) as error:
        raise ConfigError(f'{name}.dataset: {error}') from None
    extra: dict[str, Any] = {}
    if loader.num_workers > 0:
        extra = {'prefetch_factor': loader.prefetch_factor, 'persistent_workers': loader.persistent_workers}
    return StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=loader.num_workers,
        drop_last=train,
        pin_memory=loader.pin_memory,
        **extra,
    )


def _check(cfg: DiffusionTrainConfig, world_size: int) -> int:
    """Cheap checks before any data is opened; returns the per-device batch size."""
    if cfg.num_classes < 1:
        raise ConfigError(f'num_classes must be at least 1, got {cfg.num_classes} (1 for an unlabelled dataset).')
    per_device = per_device_batch_size(cfg.global_train_batch_size, cfg.device_train_microbatch_size, world_size)
    if cfg.objective.kind == Objective.flow and cfg.objective.learn_sigma is not None:
        raise ConfigError('objective.learn_sigma applies to objective.kind ddpm only: remove it.')
    if cfg.autoresume and (cfg.save_folder is None or not cfg.run_name):
        raise ConfigError(
            'autoresume needs save_folder and a fixed run_name (so a restarted run finds its checkpoints).'
        )
    if cfg.load_path is not None and not parse_uri(cfg.load_path)[0] and not os.path.exists(cfg.load_path):
        raise ConfigError(f'load_path {cfg.load_path!r} does not exist.')
    check_fsdp_version(cfg.fsdp, 'train_diffusion.py')
    return per_device


def train(cfg: DiffusionTrainConfig | DictConfig | dict, fit: bool = True) -> Trainer:
    """Build the Trainer for ``cfg`` and run it (``fit``); return the Trainer."""
    if not isinstance(cfg, DiffusionTrainConfig):
        cfg = validate_structured(DiffusionTrainConfig, cfg)
    per_device_batch = _check(cfg, dist.get_world_size())
    precision = cfg.precision or ('amp_bf16' if torch.cuda.is_available() else 'fp32')
    algorithms = instantiate(ALGORITHMS, 'algorithms', cfg.algorithms)
    callbacks = instantiate(DIFFUSION_CALLBACKS, 'callbacks', cfg.callbacks)
    loggers = instantiate(LOGGERS, 'loggers', cfg.loggers)
    schedulers = instantiate(SCHEDULERS, 'schedulers', cfg.schedulers)
    saver = checkpoint_saver(
        cfg.save_folder, cfg.save_interval, cfg.save_num_checkpoints_to_keep, cfg.save_overwrite, cfg.autoresume
    )

    dist.initialize_dist(get_device(None))  # before the datasets, as eqvae_composer.train explains
    train_loader = _loader(cfg.train_loader, per_device_batch, True, cfg.seed, 'train_loader')
    eval_loader = None
    if cfg.eval_loader is not None:
        eval_loader = _loader(cfg.eval_loader, cfg.device_eval_batch_size, False, cfg.seed, 'eval_loader')
    reproducibility.seed_all(cfg.seed)  # the network's initialisation is part of the run
    model = build_model(cfg, train_loader.dataset.metadata['latent_shape'])
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=cfg.optimizer.lr,
        betas=tuple(cfg.optimizer.betas),
        weight_decay=cfg.optimizer.weight_decay,
        fused=True if cfg.optimizer.fused else None,
    )
    trainer = Trainer(
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=eval_loader,
        optimizers=optimizer,
        schedulers=schedulers,
        precision=precision,
        algorithms=algorithms,
        callbacks=[*callbacks, *([saver] if saver is not None else [])],
        loggers=loggers,
        **trainer_kwargs(cfg, per_device_batch, evaluates=eval_loader is not None),
    )
    restore_rng_mid_epoch(trainer)
    if fit:
        trainer.fit()
    return trainer


def train_from_yaml(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Trainer:
    """``train(load_config(path, overrides))``."""
    return train(load_config(path, overrides))
