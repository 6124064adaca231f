"""YAML -> objects -> ``composer.Trainer``: the library side of the top-level ``train.py``.

``train(cfg)`` builds and runs the Trainer and returns it, so tests can call it;
``train_from_yaml(path, overrides)`` adds OmegaConf loading and ``key=value`` CLI overrides.
The schema is a dataclass: a misspelt key is an error naming it, not a silently ignored setting.
"""

from __future__ import annotations

import enum
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from composer import Trainer
from composer.algorithms import GradientClipping
from composer.core import Algorithm
from composer.utils import dist, get_device, parse_uri, reproducibility
from omegaconf import MISSING, DictConfig

from eqvae_composer.algorithms import EMA, EquivarianceAlgorithm
from eqvae_composer.algorithms.equivariance import check_target_size, smallest_target_size
from eqvae_composer.callbacks import (
    GlobalStepCallback,
    NaNGuard,
    ResumableCheckpointSaver,
)
from eqvae_composer.callbacks.checkpointing import checkpoint_saver, restore_rng_mid_epoch
from eqvae_composer.checkpoints import (
    AutoencoderConfigRecorder,
    export_diffusers,
    load_autoencoder,
    trained_autoencoder,
)
from eqvae_composer.config import (
    ConfigError,
    TrainerConfig,
    check_fsdp_version,
    load_structured,
    per_device_batch_size,
    trainer_kwargs,
    validate_structured,
)
from eqvae_composer.config import config_key as _config_key
from eqvae_composer.config import instantiate as _instantiate
from eqvae_composer.data.dataset import EmptyDatasetError, build_image_dataloader, check_local_dataset
from eqvae_composer.ema import explain_unresumable_ema_checkpoint
from eqvae_composer.evaluation.metrics import EVAL_SCALES
from eqvae_composer.introspection import adapter_for, adapter_of_kind, vae_downsample_factor
from eqvae_composer.models import (
    AlternatingAdam,
    ComposerAutoencoderKL,
    ComposerVQModel,
    GANAutoencoderModel,
    VAEGANLoss,
    VQGANLoss,
    load_lpips,
)
from eqvae_composer.models.lpips import (
    LPIPS_BACKBONES,
    load_lpips_net,
    resolve_lpips_weights,
    resolve_lpips_weights_of,
)
from eqvae_composer.models.trainable import ALL, freeze_except, trainable_prefixes, trains_encoder
from eqvae_composer.padding import PADDING_MODES, set_padding_mode, smallest_image_side
from eqvae_composer.registry import CALLBACKS, LOGGERS, SCHEDULERS

__all__ = [
    'ConfigError',
    'GANUpdates',
    'OptimizerConfig',
    'TrainConfig',
    'build_optimizer',
    'load_config',
    'train',
    'train_from_yaml',
]

log = logging.getLogger(__name__)

# Algorithms are picked by hand, unlike callbacks and loggers (eqvae_composer.registry): most of
# Composer's are for classifiers or language models and would break an autoencoder's batch or loss.
ALGORITHMS: dict[str, type[Algorithm]] = {
    'equivariance': EquivarianceAlgorithm,
    'ema': EMA,  # Composer's, with its copy of the weights checkpointed from every rank under FSDP2
    'gradient_clipping': GradientClipping,
}
# URI schemes Composer can upload checkpoints to (RemoteUploader) and load them from (get_file).
SAVE_SCHEMES = ('s3', 'gs', 'oci', 'azure', 'libcloud', 'dbfs')
LOAD_SCHEMES = (*SAVE_SCHEMES, 'http', 'https')


class AutoencoderKind(str, enum.Enum):
    """``model.kind``: a KL autoencoder (``AutoencoderKL``, LDM's loss) or a VQGAN (``VQModel``, taming's loss)."""

    kl = 'kl'
    vq = 'vq'


class GANUpdates(str, enum.Enum):
    """``optimizer.gan_updates``: one pass for both sides, or the reference's two (``AlternatingGANUpdates``)."""

    joint = 'joint'
    alternating = 'alternating'


@dataclass
class VAEConfig:
    """Where the base autoencoder comes from: ``pretrained`` (path, file or hub id) or a ``config`` dict."""

    pretrained: str | None = None
    subfolder: str | None = None
    revision: str | None = None
    config: dict[str, Any] | None = None
    # Beyond the paper: 'reflect' pads every padded Conv2d by reflection (the MS-LC-EQ-D-VR VAEs need it);
    # recorded in the exported config.json. None: what the source records (zeros for every stock VAE).
    padding_mode: str | None = None


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
    lpips_dropout: bool = False  # the reference trains with LPIPS's dropout active
    always_train_discriminator: bool = False  # the reference trains D even at disc_weight 0
    codebook_weight: float = 1.0  # model.kind vq only: taming's codebook + commitment weight
    # Beyond the paper (the method card's "loss menu"): the reconstruction term's mix and a lighter
    # perceptual network. The defaults are the reference's loss, bit for bit.
    l1_weight: float = 1.0
    l2_weight: float = 0.0
    ssim_weight: float = 0.0
    lpips_net: str = 'vgg'  # the loss's LPIPS backbone: vgg, alex or squeeze; the LPIPS eval metric stays VGG
    lpips_net_weights: str | None = None  # torchvision's alex/squeeze file (VGG's is lpips_vgg_weights)


@dataclass
class ModelConfig:
    kind: AutoencoderKind = AutoencoderKind.kl
    vae: VAEConfig = field(default_factory=VAEConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    image_key: str = 'image'
    eval_sample_posterior: bool = True
    eval_metrics: list[str] | None = None  # None: the model's defaults
    gradient_checkpointing: bool = False
    # Beyond the paper: which parameters train, the rest frozen (eqvae_composer.models.trainable): 'all',
    # 'decoder' (post_quant_conv + decoder: the latent space stays as it is), 'encoder', or a list of
    # parameter-name prefixes of the VAE. Any: a name or a list (OmegaConf has no str | list type).
    trainable: Any = ALL


# Settings that exist for one kind of autoencoder only: set away from their default for the other kind,
# they would be ignored, so they are an error instead.
_KIND_ONLY = {
    AutoencoderKind.kl: (
        'loss.kl_weight',
        'loss.logvar_init',
        'loss.learn_logvar',
        'eval_sample_posterior',
        'gradient_checkpointing',
    ),  # diffusers' VQModel has no gradient checkpointing
    AutoencoderKind.vq: ('loss.codebook_weight',),
}


@dataclass
class LoaderConfig:
    """A ``build_image_dataloader`` call; ``dataset`` holds ``StreamingImageDataset`` kwargs."""

    dataset: dict[str, Any] = MISSING
    num_workers: int = 0
    drop_last: bool | None = None  # None: True for training, False for eval (which must see every sample)
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
    # PyTorch's fused Adam kernel (CPU and CUDA): the same update in one kernel per parameter group
    # instead of several element-wise ops per tensor; 3.5x faster on CPU (docs/BENCHMARKS.md). False
    # leaves the choice to PyTorch (foreach on CUDA, a per-tensor loop on CPU).
    fused: bool = True
    # joint: one forward and one step per batch for both sides. alternating: the reference's two
    # passes (autoencoder, then discriminator on a fresh forward), each followed by its side's step.
    gan_updates: GANUpdates = GANUpdates.joint


@dataclass
class NaNGuardConfig:
    """``NaNGuard`` arguments: ``raise`` stops at a non-finite loss term or gradient; ``skip`` drops the step."""

    on_nonfinite: str = 'raise'
    max_skipped: int = 10
    check_gradients: bool = True


@dataclass
class TrainConfig(TrainerConfig):
    """The whole run; see ``yamls/eqvae.yaml`` for the paper's recipe with comments."""

    device_eval_batch_size: int = 8
    seed: int = 17
    model: ModelConfig = field(default_factory=ModelConfig)
    train_loader: LoaderConfig = MISSING
    eval_loader: LoaderConfig | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    nan_guard: NaNGuardConfig | None = field(default_factory=NaNGuardConfig)  # null: no checks
    export_folder: str | None = None
    export_ema: bool = True  # with the EMA algorithm, export its weights (False: the raw ones)
    metrics_file: str | None = None


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a YAML, apply ``key=value`` overrides and check it against ``TrainConfig``."""
    return load_structured(TrainConfig, path, overrides)


def _validate(raw: DictConfig | dict) -> TrainConfig:
    return validate_structured(TrainConfig, raw)


def _check_kind_settings(cfg: ModelConfig) -> None:
    defaults = ModelConfig()
    for kind, keys in _KIND_ONLY.items():
        for key in keys if kind != cfg.kind else ():
            section, _, name = key.rpartition('.')
            value, default = (getattr(getattr(c, section) if section else c, name) for c in (cfg, defaults))
            if value != default:
                raise ConfigError(
                    f'model.{key} applies to model.kind {kind.value} only, and model.kind is '
                    f'{AutoencoderKind(cfg.kind).value}: remove it.'
                )


# LossConfig fields that say where the perceptual networks come from, not VAEGANLoss/VQGANLoss arguments.
_LPIPS_SOURCE_KEYS = ('lpips_vgg_weights', 'lpips_net', 'lpips_net_weights')


def _check_loss_settings(cfg: LossConfig) -> None:
    """The loss menu's keys (weights, perceptual network) make sense: a config error naming the key."""
    for name in ('l1_weight', 'l2_weight', 'ssim_weight', 'lpips_weight'):
        if getattr(cfg, name) < 0:
            raise ConfigError(f'model.loss.{name} must be non-negative, got {getattr(cfg, name)}.')
    if cfg.l1_weight == cfg.l2_weight == cfg.ssim_weight == cfg.lpips_weight == 0:
        raise ConfigError(
            'model.loss.l1_weight, l2_weight, ssim_weight and lpips_weight are all 0: set at least one above 0.'
        )
    if cfg.lpips_net not in LPIPS_BACKBONES:
        raise ConfigError(f'model.loss.lpips_net must be one of {sorted(LPIPS_BACKBONES)}, got {cfg.lpips_net!r}.')
    if cfg.lpips_net == 'vgg' and cfg.lpips_net_weights is not None:
        raise ConfigError(
            'model.loss.lpips_net_weights is for lpips_net alex or squeeze; give VGG16 weights as '
            'model.loss.lpips_vgg_weights.'
        )


def _loss_lpips_net(cfg: ModelConfig):
    """The loss's LPIPS network (``None`` when its weight is 0) and the LPIPS eval metric's, if it needs its own."""
    loss_net = metric_net = None
    if cfg.loss.lpips_net == 'vgg':
        loss_net = load_lpips(cfg.loss.lpips_vgg_weights) if _needs_lpips(cfg) else None
    else:
        if cfg.loss.lpips_weight > 0:
            loss_net = load_lpips_net(cfg.loss.lpips_net, cfg.loss.lpips_net_weights)
        if 'LPIPS' in (cfg.eval_metrics or ()):  # the metric is the paper's LPIPS-VGG whatever the loss uses
            metric_net = load_lpips(cfg.loss.lpips_vgg_weights)
    return loss_net, metric_net


def build_model(cfg: ModelConfig) -> GANAutoencoderModel:
    """The ComposerModel described by ``cfg``, with LPIPS loaded (or a clear error) before any training."""
    _check_kind_settings(cfg)
    _check_loss_settings(cfg.loss)
    kind = AutoencoderKind(cfg.kind)
    architecture = cfg.vae.config
    if architecture is not None:  # a config dict builds (or shapes) the class of model.kind
        architecture = {'_class_name': adapter_of_kind(kind.value).autoencoder_class.__name__, **architecture}
    source = cfg.vae.pretrained if cfg.vae.pretrained is not None else architecture
    if source is None:
        raise ConfigError('model.vae needs either `pretrained` (path, file or hub id) or `config` (a dict).')
    vae = load_autoencoder(
        source,
        subfolder=cfg.vae.subfolder,
        revision=cfg.vae.revision,
        config=architecture if cfg.vae.pretrained else None,
    )
    if adapter_for(vae).kind != kind.value:
        raise ConfigError(
            f'model.vae holds a {type(vae).__name__} (kind {adapter_for(vae).kind}) but model.kind is '
            f'{kind.value}: set model.kind: {adapter_for(vae).kind}.'
        )
    if cfg.vae.padding_mode is not None:
        set_padding_mode(vae, cfg.vae.padding_mode)
    try:  # before the Trainer wraps the model: frozen parameters get no gradient, optimizer state or all-reduce
        frozen = freeze_except(vae, cfg.trainable)
    except ValueError as error:
        raise ConfigError(f'model.{error}') from None
    if frozen:
        log.info('model.trainable %s: %d of the VAE parameters are frozen', cfg.trainable, len(frozen))
    other_kinds_keys = {key for other, keys in _KIND_ONLY.items() if other != kind for key in keys}
    loss_kwargs = {
        k: v for k, v in vars(cfg.loss).items() if k not in _LPIPS_SOURCE_KEYS and f'loss.{k}' not in other_kinds_keys
    }
    lpips, lpips_metric = _loss_lpips_net(cfg)
    metrics = {} if cfg.eval_metrics is None else {'eval_metrics': cfg.eval_metrics}
    if lpips_metric is not None:
        metrics['lpips_metric'] = lpips_metric
    if kind == AutoencoderKind.vq:
        return ComposerVQModel(vae, VQGANLoss(lpips=lpips, **loss_kwargs), image_key=cfg.image_key, **metrics)
    return ComposerAutoencoderKL(
        vae,
        VAEGANLoss(lpips=lpips, **loss_kwargs),
        image_key=cfg.image_key,
        eval_sample_posterior=cfg.eval_sample_posterior,
        gradient_checkpointing=cfg.gradient_checkpointing,
        **metrics,
    )


def _needs_lpips(cfg: ModelConfig) -> bool:
    return cfg.loss.lpips_weight > 0 or 'LPIPS' in (cfg.eval_metrics or ())


def _check_weight_files(cfg: ModelConfig) -> None:
    """Every pretrained weight file the run needs is here (or downloadable): before any data or VAE is loaded.

    LPIPS' backbones are the only ones: ``EVAL_METRICS`` has no FID (Inception) metric.
    """
    if cfg.loss.lpips_net != 'vgg':
        if cfg.loss.lpips_weight > 0:
            resolve_lpips_weights_of(cfg.loss.lpips_net, cfg.loss.lpips_net_weights)
        if 'LPIPS' in (cfg.eval_metrics or ()):
            resolve_lpips_weights(cfg.loss.lpips_vgg_weights)
    elif _needs_lpips(cfg):
        resolve_lpips_weights(cfg.loss.lpips_vgg_weights)


def _check_model_options(cfg: ModelConfig) -> None:
    """``model.trainable`` and ``model.vae.padding_mode`` name known things: before the VAE is loaded."""
    try:
        trainable_prefixes(cfg.trainable)
    except ValueError as error:
        raise ConfigError(f'model.{error}') from None
    if cfg.vae.padding_mode is not None and cfg.vae.padding_mode not in PADDING_MODES:
        raise ConfigError(
            f'model.vae.padding_mode: unknown mode {cfg.vae.padding_mode!r}; choose one of {", ".join(PADDING_MODES)}.'
        )


def _check_trainable_for(algorithms: list[Algorithm], trainable: Any) -> None:
    """The equivariance regularizer shapes the latent through the encoder: it cannot run with the encoder frozen."""
    for algorithm in algorithms:
        if (
            isinstance(algorithm, EquivarianceAlgorithm)
            and algorithm.p_equivariance > 0
            and not trains_encoder(trainable)
        ):
            raise ConfigError(
                f'algorithms.equivariance needs a trainable encoder, and model.trainable {trainable!r} freezes it: '
                'train the encoder (model.trainable: all) or drop algorithms.equivariance for a decoder-only stage.'
            )
    if not trains_encoder(trainable):
        # The KL term reaches the autoencoder through the encoder's posterior only.
        log.info('model.trainable %s freezes the encoder: the KL term has no gradient (it is logged only).', trainable)


def build_optimizer(model: GANAutoencoderModel, cfg: OptimizerConfig) -> torch.optim.Adam:
    """One Adam over ``model.param_groups()``: the reference's two optimizers as two parameter groups.

    With ``gan_updates: alternating``, an ``AlternatingAdam``: two passes and two steps per batch.
    """
    groups = model.param_groups(
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        disc_lr=cfg.disc_lr,
        disc_betas=None if cfg.disc_betas is None else tuple(cfg.disc_betas),
        weight_decay=cfg.weight_decay,
    )
    fused = True if cfg.fused else None  # None, not False: False would also rule out foreach on CUDA
    if GANUpdates(cfg.gan_updates) == GANUpdates.alternating:
        return AlternatingAdam(groups, model=model, fused=fused)
    return torch.optim.Adam(groups, fused=fused)


def _check_paths(cfg: TrainConfig) -> None:
    """Data folders exist and hold samples (or are remote), checkpoints can be saved: before anything is loaded."""
    for name, loader in (('train_loader', cfg.train_loader), ('eval_loader', cfg.eval_loader)):
        if loader is None:
            continue
        dataset = loader.dataset
        streams = dataset.get('streams') or [dataset]
        for stream in streams.values() if isinstance(streams, dict) else streams:
            if stream.get('remote') is None:
                if stream.get('local') is None:
                    raise ConfigError(f'{name}.dataset needs `local` (a folder of MDS shards) or `remote` (a URI).')
                try:
                    check_local_dataset(stream['local'], stream.get('split'))
                except EmptyDatasetError as error:
                    raise ConfigError(f'{name}.dataset: {error}') from None
    if cfg.save_folder is not None:
        scheme = parse_uri(cfg.save_folder)[0]
        if scheme and scheme not in SAVE_SCHEMES:
            raise ConfigError(
                f'save_folder {cfg.save_folder!r}: Composer cannot upload to {scheme}:// '
                f'(supported: {", ".join(SAVE_SCHEMES)}, or a local folder).'
            )
        local = parse_uri(cfg.save_folder)[2] if scheme else cfg.save_folder
        if local and os.path.exists(local) and not os.path.isdir(local):
            raise ConfigError(f'save_folder {cfg.save_folder!r} is a file, not a folder.')
    if cfg.autoresume and (cfg.save_folder is None or not cfg.run_name):
        raise ConfigError(
            'autoresume needs save_folder (where it looks for the last checkpoint) and a fixed '
            'run_name (so a restarted run finds its own checkpoints).'
        )
    if cfg.save_num_checkpoints_to_keep < -1:
        raise ConfigError(
            'save_num_checkpoints_to_keep must be -1 (keep all), 0 (none locally) or a positive '
            f'count, got {cfg.save_num_checkpoints_to_keep}.'
        )
    if cfg.load_path is not None:
        scheme = parse_uri(cfg.load_path)[0]
        if scheme and scheme not in LOAD_SCHEMES:
            raise ConfigError(
                f'load_path {cfg.load_path!r}: Composer cannot download from {scheme}:// '
                f'(supported: {", ".join(LOAD_SCHEMES)}, or a local file).'
            )
        if not scheme and not os.path.exists(cfg.load_path):
            raise ConfigError(f'load_path {cfg.load_path!r} does not exist.')


def _check_target_sizes(cfg: TrainConfig, model: GANAutoencoderModel, algorithms: list) -> None:
    """The configured resolution and scales give targets the loss accepts: a config error, not a crash in step 1."""
    resolution = cfg.train_loader.dataset.get('resolution', 256)
    for algorithm in algorithms:
        if isinstance(algorithm, EquivarianceAlgorithm) and algorithm.p_equivariance + algorithm.p_lowres > 0:
            factor = algorithm.downsample_factor or vae_downsample_factor(model.vae)
            try:
                check_target_size((resolution, resolution), factor, algorithm.target_scales, model.min_target_size)
            except ValueError as error:
                keys = (
                    'train_loader.dataset.resolution, algorithms.equivariance.scales, model.loss.disc_num_layers '
                    'or model.vae.padding_mode'
                )
                raise ConfigError(f'{error} (config keys: {keys})') from None
    if cfg.eval_loader is not None and 'EquivarianceErrorS' in model.eval_metric_names:
        _check_eval_scale_size(cfg.eval_loader.dataset.get('resolution', 256), model)


def _check_eval_scale_size(resolution: int, model: GANAutoencoderModel) -> None:
    """EquivarianceErrorS encodes eval images scaled down to ``EVAL_SCALES``: a size the VAE's padding takes."""
    factor, needed = model.downsample_factor, smallest_image_side(model.vae, model.downsample_factor)
    smallest = smallest_target_size(resolution, factor, EVAL_SCALES)
    enough = int(-(-needed // min(EVAL_SCALES)))
    if smallest < needed:
        raise ConfigError(
            f'model.eval_metrics EquivarianceErrorS encodes {resolution} px eval images at scale {min(EVAL_SCALES):g}, '
            f'{smallest} px, and the reflection-padded VAE (model.vae.padding_mode) needs at least {needed} px: set '
            f'eval_loader.dataset.resolution to {enough} or more, or drop EquivarianceErrorS.'
        )


def _checkpoint_saver(cfg: TrainConfig) -> ResumableCheckpointSaver | None:
    return checkpoint_saver(
        cfg.save_folder, cfg.save_interval, cfg.save_num_checkpoints_to_keep, cfg.save_overwrite, cfg.autoresume
    )


def _precision(cfg: TrainConfig) -> str:
    precision = cfg.precision or ('amp_bf16' if torch.cuda.is_available() else 'fp32')
    if precision == 'amp_fp16':
        raise ConfigError('precision amp_fp16 is refused: fp16 VAEs overflow to NaN. Use amp_bf16 or fp32.')
    return precision


def train(cfg: TrainConfig | DictConfig | dict, fit: bool = True) -> Trainer:
    """Build the Trainer for ``cfg``, run it (``fit``), export and write metrics; return the Trainer."""
    if not isinstance(cfg, TrainConfig):
        cfg = _validate(cfg)
    # Cheap checks first: a typo must not cost an SD-VAE load (or a data download).
    per_device_batch = per_device_batch_size(
        cfg.global_train_batch_size, cfg.device_train_microbatch_size, dist.get_world_size()
    )
    precision = _precision(cfg)
    check_fsdp_version(cfg.fsdp)
    if cfg.eval_loader is not None and cfg.eval_loader.drop_last:
        raise ConfigError('eval_loader.drop_last: evaluation must see every sample; remove the setting.')
    _check_paths(cfg)
    _check_loss_settings(cfg.model.loss)
    _check_weight_files(cfg.model)
    _check_kind_settings(cfg.model)
    _check_model_options(cfg.model)
    algorithms = _instantiate(ALGORITHMS, 'algorithms', cfg.algorithms)
    _check_trainable_for(algorithms, cfg.model.trainable)
    callbacks = _instantiate(CALLBACKS, 'callbacks', cfg.callbacks)
    if cfg.nan_guard is not None:
        try:
            callbacks.append(NaNGuard(**vars(cfg.nan_guard)))
        except ValueError as error:
            raise ConfigError(f'{_config_key("nan_guard", vars(cfg.nan_guard), error)}: {error}') from None
    loggers = _instantiate(LOGGERS, 'loggers', cfg.loggers)
    schedulers = _instantiate(SCHEDULERS, 'schedulers', cfg.schedulers)
    saver = _checkpoint_saver(cfg)

    # As the Trainer will (same device, same default timeout), but before the datasets: otherwise each
    # StreamingDataset sets up and tears down a process group of its own, and a rank building the second
    # one can meet the first one's teardown (a broken pipe).
    dist.initialize_dist(get_device(None))
    train_loader = build_image_dataloader(
        batch_size=per_device_batch,
        **_loader_kwargs(cfg.train_loader, train=True, seed=cfg.seed),
    )
    eval_loader = None
    if cfg.eval_loader is not None:
        eval_loader = build_image_dataloader(
            batch_size=cfg.device_eval_batch_size,
            **_loader_kwargs(cfg.eval_loader, train=False, seed=cfg.seed),
        )
    reproducibility.seed_all(cfg.seed)  # the model's initialisation is part of the run
    model = build_model(cfg.model)
    _check_target_sizes(cfg, model, algorithms)
    optimizer = build_optimizer(model, cfg.optimizer)
    # Each alternating pass leaves one side without gradients, which DDP's bucketed all-reduce does not
    # allow; Composer's forced sync all-reduces the gradients there are after the last microbatch.
    ddp_sync_strategy = 'forced_sync' if cfg.optimizer.gan_updates == GANUpdates.alternating else None

    # A checkpoint of Composer's own EMA under FSDP cannot be resumed: one clear error instead of a crash.
    trainer = explain_unresumable_ema_checkpoint(_checkpoint_to_resume(cfg))(Trainer)(
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=eval_loader,
        optimizers=optimizer,
        schedulers=schedulers,
        precision=precision,
        algorithms=algorithms,
        callbacks=[
            GlobalStepCallback(),
            AutoencoderConfigRecorder(),  # lets export and load_autoencoder rebuild the VAE from a checkpoint alone
            *callbacks,
            *([saver] if saver is not None else []),
        ],
        loggers=loggers,
        ddp_sync_strategy=ddp_sync_strategy,
        **trainer_kwargs(cfg, per_device_batch, evaluates=eval_loader is not None),
    )
    restore_rng_mid_epoch(trainer)
    if fit:
        trainer.fit()
        _finish(cfg, trainer)
    return trainer


def _checkpoint_to_resume(cfg: TrainConfig) -> str:
    """The checkpoint the Trainer will load, for messages: autoresume's latest one when there is one, else load_path."""
    latest = os.path.join(cfg.save_folder or '', 'latest-rank0.pt')
    if cfg.autoresume and os.path.lexists(latest):
        return latest
    return cfg.load_path or latest


def _loader_kwargs(loader: LoaderConfig, train: bool, seed: int) -> dict[str, Any]:
    kwargs = {k: v for k, v in vars(loader).items() if k != 'dataset'}
    if kwargs['drop_last'] is None:  # eval keeps its last, partial batch: every sample counts
        kwargs['drop_last'] = train
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
