"""YAML -> objects -> ``composer.Trainer``: the library side of the top-level ``train.py``.

``train(cfg)`` builds and runs the Trainer and returns it, so tests can call it;
``train_from_yaml(path, overrides)`` adds OmegaConf loading and ``key=value`` CLI overrides.
The schema is a dataclass: a misspelt key is an error naming it, not a silently ignored setting.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from composer import Trainer
from composer.algorithms import EMA
from composer.callbacks import LRMonitor, MemoryMonitor, SpeedMonitor
from composer.core import Algorithm, Callback
from composer.loggers import FileLogger, LoggerDestination, TensorboardLogger, WandBLogger
from composer.utils import dist, reproducibility
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

from eqvae_composer.algorithms import EquivarianceAlgorithm
from eqvae_composer.callbacks import GlobalStepCallback, ImageGridCallback
from eqvae_composer.checkpoints import (
    AutoencoderConfigRecorder,
    export_diffusers,
    load_autoencoder,
    trained_autoencoder,
)
from eqvae_composer.data.dataset import build_image_dataloader
from eqvae_composer.models import ComposerAutoencoderKL, VAEGANLoss, load_lpips

__all__ = ['ConfigError', 'TrainConfig', 'load_config', 'train', 'train_from_yaml']

log = logging.getLogger(__name__)

ALGORITHMS: dict[str, type[Algorithm]] = {'equivariance': EquivarianceAlgorithm, 'ema': EMA}
CALLBACKS: dict[str, type[Callback]] = {
    'lr_monitor': LRMonitor,
    'speed_monitor': SpeedMonitor,
    'memory_monitor': MemoryMonitor,
    'image_grid': ImageGridCallback,
}
LOGGERS: dict[str, type[LoggerDestination]] = {
    'file': FileLogger,
    'tensorboard': TensorboardLogger,
    'wandb': WandBLogger,
}


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


@dataclass
class VAEConfig:
    """Where the base autoencoder comes from: ``pretrained`` (path, file or hub id) or a ``config`` dict."""

    pretrained: str | None = None
    subfolder: str | None = None
    revision: str | None = None
    config: dict[str, Any] | None = None


@dataclass
class LossConfig:
    """``VAEGANLoss`` arguments plus where LPIPS' VGG weights are (default: the torch hub cache)."""

    lpips_weight: float = 1.0
    lpips_vgg_weights: str | None = None
    kl_weight: float = 1e-6
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_start: int = 0
    logvar_init: float = 0.0
    learn_logvar: bool = False
    disc_num_filters: int = 64
    disc_num_layers: int = 3


@dataclass
class ModelConfig:
    vae: VAEConfig = field(default_factory=VAEConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    image_key: str = 'image'
    eval_sample_posterior: bool = True
    eval_metrics: list[str] = field(
        default_factory=lambda: ['PSNR', 'SSIM', 'EquivarianceErrorR', 'EquivarianceErrorS'],
    )


@dataclass
class LoaderConfig:
    """A ``build_image_dataloader`` call; ``dataset`` holds ``StreamingImageDataset`` kwargs."""

    dataset: dict[str, Any] = MISSING
    num_workers: int = 0
    drop_last: bool = True
    pin_memory: bool = False
    prefetch_factor: int | None = None
    persistent_workers: bool = False


@dataclass
class OptimizerConfig:
    """Adam with two parameter groups (autoencoder, discriminator), as the reference's two optimizers."""

    lr: float = 7.2e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    disc_lr: float | None = None
    disc_betas: list[float] | None = None
    weight_decay: float = 0.0


@dataclass
class TrainConfig:
    """The whole run; see ``yamls/eqvae.yaml`` for the paper's recipe with comments."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train_loader: LoaderConfig = MISSING
    eval_loader: LoaderConfig | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    max_duration: str = MISSING
    global_train_batch_size: int = MISSING
    device_train_microbatch_size: int | None = None
    device_eval_batch_size: int = 8
    eval_interval: str = '1ep'
    precision: str | None = None  # None: amp_bf16 on GPU, fp32 on CPU
    seed: int = 17
    run_name: str | None = None
    algorithms: dict[str, dict[str, Any]] = field(default_factory=dict)
    callbacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    loggers: dict[str, dict[str, Any]] = field(default_factory=dict)
    fsdp: dict[str, Any] | None = None
    save_folder: str | None = None
    save_interval: str = '1ep'
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    autoresume: bool = False
    load_path: str | None = None
    export_folder: str | None = None
    export_ema: bool = True  # with the EMA algorithm, export its weights (False: the raw ones)
    metrics_file: str | None = None
    console_log_interval: str = '1ba'
    progress_bar: bool = False
    variables: dict[str, Any] = field(default_factory=dict)  # free-form, for ${variables.x} interpolation


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a YAML, apply ``key=value`` overrides and check it against ``TrainConfig``."""
    if not Path(path).is_file():
        raise ConfigError(f'config file {path} does not exist.')
    raw = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    return _validate(raw)


def _validate(raw: DictConfig | dict) -> TrainConfig:
    try:
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), raw)
        cfg = OmegaConf.to_object(merged)
    except ConfigKeyError as error:
        raise ConfigError(f'unknown config key {error.full_key!r} ({error.msg.splitlines()[0]}).') from None
    except MissingMandatoryValue as error:
        raise ConfigError(f'missing required config value {error.full_key!r}.') from None
    except ValidationError as error:
        raise ConfigError(f'invalid value for config key {error.full_key!r}: {error.msg.splitlines()[0]}') from None
    assert isinstance(cfg, TrainConfig)
    return cfg


def _instantiate(registry: dict[str, type], section: str, specs: dict[str, dict[str, Any]]) -> list:
    objects = []
    for name, kwargs in specs.items():
        if name not in registry:
            raise ConfigError(f'unknown {section} {name!r}; known: {sorted(registry)}.')
        try:
            objects.append(registry[name](**(kwargs or {})))
        except (TypeError, ValueError) as error:
            raise ConfigError(f'{section}.{name}: {error}') from None
    return objects


def build_model(cfg: ModelConfig) -> ComposerAutoencoderKL:
    """The ComposerModel described by ``cfg``, with LPIPS loaded (or a clear error) before any training."""
    source = cfg.vae.pretrained if cfg.vae.pretrained is not None else cfg.vae.config
    if source is None:
        raise ConfigError('model.vae needs either `pretrained` (path, file or hub id) or `config` (a dict).')
    vae = load_autoencoder(source, subfolder=cfg.vae.subfolder, revision=cfg.vae.revision,
                           config=cfg.vae.config if cfg.vae.pretrained else None)
    loss_kwargs = {k: v for k, v in vars(cfg.loss).items() if k != 'lpips_vgg_weights'}
    needs_lpips = cfg.loss.lpips_weight > 0 or 'LPIPS' in cfg.eval_metrics
    lpips = load_lpips(cfg.loss.lpips_vgg_weights) if needs_lpips else None
    return ComposerAutoencoderKL(
        vae,
        VAEGANLoss(lpips=lpips, **loss_kwargs),
        image_key=cfg.image_key,
        eval_sample_posterior=cfg.eval_sample_posterior,
        eval_metrics=cfg.eval_metrics,
    )


def _check_batch_sizes(cfg: TrainConfig, world_size: int) -> int:
    if cfg.global_train_batch_size % world_size:
        raise ConfigError(
            f'global_train_batch_size {cfg.global_train_batch_size} is not divisible by the {world_size} processes.',
        )
    per_device = cfg.global_train_batch_size // world_size
    micro = cfg.device_train_microbatch_size
    if micro is not None and per_device % micro:
        raise ConfigError(
            f'the per-device batch {per_device} (global_train_batch_size / {world_size} processes) is not divisible '
            f'by device_train_microbatch_size {micro}.',
        )
    return per_device


def _precision(cfg: TrainConfig) -> str:
    precision = cfg.precision or ('amp_bf16' if torch.cuda.is_available() else 'fp32')
    if precision == 'amp_fp16':
        raise ConfigError('precision amp_fp16 is refused: fp16 VAEs overflow to NaN. Use amp_bf16 or fp32.')
    return precision


def train(cfg: TrainConfig | DictConfig | dict, fit: bool = True) -> Trainer:
    """Build the Trainer for ``cfg``, run it (``fit``), export and write metrics; return the Trainer."""
    if not isinstance(cfg, TrainConfig):
        cfg = _validate(cfg)
    reproducibility.seed_all(cfg.seed)  # the model's initialisation is part of the run
    per_device_batch = _check_batch_sizes(cfg, dist.get_world_size())
    precision = _precision(cfg)

    model = build_model(cfg.model)
    train_loader = build_image_dataloader(
        batch_size=per_device_batch, **_loader_kwargs(cfg.train_loader, train=True, seed=cfg.seed),
    )
    eval_loader = None
    if cfg.eval_loader is not None:
        eval_loader = build_image_dataloader(
            batch_size=cfg.device_eval_batch_size, **_loader_kwargs(cfg.eval_loader, train=False, seed=cfg.seed),
        )
    optimizer = torch.optim.Adam(
        model.param_groups(
            lr=cfg.optimizer.lr,
            betas=tuple(cfg.optimizer.betas),
            disc_lr=cfg.optimizer.disc_lr,
            disc_betas=None if cfg.optimizer.disc_betas is None else tuple(cfg.optimizer.disc_betas),
            weight_decay=cfg.optimizer.weight_decay,
        ),
    )
    parallelism = {'fsdp': dict(cfg.fsdp)} if cfg.fsdp is not None else None

    trainer = Trainer(
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=eval_loader,
        eval_interval=cfg.eval_interval if eval_loader is not None else 0,
        optimizers=optimizer,
        max_duration=cfg.max_duration,
        device_train_microbatch_size=cfg.device_train_microbatch_size or per_device_batch,
        precision=precision,
        seed=cfg.seed,
        run_name=cfg.run_name,
        algorithms=_instantiate(ALGORITHMS, 'algorithms', cfg.algorithms),
        callbacks=[
            GlobalStepCallback(),
            AutoencoderConfigRecorder(),  # lets export and load_autoencoder rebuild the VAE from a checkpoint alone
            *_instantiate(CALLBACKS, 'callbacks', cfg.callbacks),
        ],
        loggers=_instantiate(LOGGERS, 'loggers', cfg.loggers),
        parallelism_config=parallelism,
        save_folder=cfg.save_folder,
        save_interval=cfg.save_interval,
        save_num_checkpoints_to_keep=cfg.save_num_checkpoints_to_keep,
        save_overwrite=cfg.save_overwrite,
        autoresume=cfg.autoresume,
        load_path=cfg.load_path,
        console_log_interval=cfg.console_log_interval,
        progress_bar=cfg.progress_bar,
        log_to_console=not cfg.progress_bar,
    )
    if fit:
        trainer.fit()
        _finish(cfg, trainer)
    return trainer


def _loader_kwargs(loader: LoaderConfig, train: bool, seed: int) -> dict[str, Any]:
    kwargs = {k: v for k, v in vars(loader).items() if k != 'dataset'}
    dataset = dict(loader.dataset)
    dataset.setdefault('train', train)
    dataset.setdefault('shuffle_seed', seed)  # the order and the crops follow the run's seed
    return {**kwargs, **dataset}


def _finish(cfg: TrainConfig, trainer: Trainer) -> None:
    """Rank 0 exports the VAE and writes the final eval metrics."""
    metrics = {name: float(value) for name, value in trainer.state.eval_metric_values.items()}
    # A collective under FSDP; EMA weights when the run used EMA, unless export_ema is false.
    vae, which = trained_autoencoder(trainer.state, ema=cfg.export_ema) if cfg.export_folder else (None, '')
    if dist.get_global_rank() != 0:
        return
    if vae is not None:
        folder = export_diffusers(vae, cfg.export_folder)
        log.info('exported the %s weights of the autoencoder to %s', which, folder)
        print(f'Exported the fine-tuned VAE ({which} weights, diffusers format) to {folder}')
    if cfg.metrics_file:
        path = Path(cfg.metrics_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({'metrics': metrics, 'timestamp': trainer.state.timestamp.batch.value}, indent=2))
        print(f'Wrote eval metrics {json.dumps(metrics)} to {path}')


def train_from_yaml(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Trainer:
    """``train(load_config(path, overrides))``."""
    return train(load_config(path, overrides))
