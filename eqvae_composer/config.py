"""YAML configs checked against a dataclass schema, and ``{name: kwargs}`` sections built from registries.

Shared by the training entry points (``eqvae_composer.train`` for the autoencoder,
``eqvae_composer.diffusion.train`` for the diffusion probe), which know nothing of each other.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, MissingMandatoryValue, ValidationError

__all__ = [
    'ConfigError',
    'TrainerConfig',
    'check_fsdp_version',
    'config_key',
    'instantiate',
    'load_structured',
    'per_device_batch_size',
    'trainer_kwargs',
    'validate_structured',
]

Schema = TypeVar('Schema')


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


@dataclass
class TrainerConfig:
    """The ``composer.Trainer`` settings both training entry points share; each subclass adds its model and data.

    ``device_eval_batch_size`` and ``seed`` have no default here: each entry point sets its own.
    """

    max_duration: str = MISSING
    global_train_batch_size: int = MISSING
    device_train_microbatch_size: int | None = None
    device_eval_batch_size: int = MISSING
    eval_interval: str = '1ep'
    precision: str | None = None  # None: amp_bf16 on GPU, fp32 on CPU
    seed: int = MISSING
    run_name: str | None = None
    algorithms: dict[str, dict[str, Any]] = field(default_factory=dict)
    callbacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Composer's learning-rate schedulers by name (e.g. cosine_annealing: {alpha_f: 0.1}); none: constant lr,
    # as the reference trains.
    schedulers: dict[str, dict[str, Any]] = field(default_factory=dict)
    loggers: dict[str, dict[str, Any]] = field(default_factory=dict)
    fsdp: dict[str, Any] | None = None
    save_folder: str | None = None
    save_interval: str = '1ep'
    save_num_checkpoints_to_keep: int = -1
    save_overwrite: bool = False
    autoresume: bool = False
    load_path: str | None = None
    console_log_interval: str = '1ba'
    progress_bar: bool = False
    variables: dict[str, Any] = field(default_factory=dict)  # free-form, for ${variables.x} interpolation


def validate_structured(schema: type[Schema], raw: DictConfig | dict) -> Schema:
    """``raw`` merged onto ``schema``'s defaults; an unknown key, missing value or wrong type is a ``ConfigError``."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), raw)
        cfg = OmegaConf.to_object(merged)
    except ConfigKeyError as error:
        raise ConfigError(f'unknown config key {error.full_key!r} ({error.msg.splitlines()[0]}).') from None
    except MissingMandatoryValue as error:
        raise ConfigError(f'missing required config value {error.full_key!r}.') from None
    except ValidationError as error:
        raise ConfigError(f'invalid value for config key {error.full_key!r}: {error.msg.splitlines()[0]}') from None
    assert isinstance(cfg, schema)
    return cfg


def load_structured(schema: type[Schema], path: str | os.PathLike, overrides: Sequence[str] = ()) -> Schema:
    """Load a YAML, apply ``key=value`` overrides and check it against ``schema``."""
    if not Path(path).is_file():
        raise ConfigError(f'config file {path} does not exist.')
    raw = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    return validate_structured(schema, raw)


def instantiate(registry: dict[str, type], section: str, specs: dict[str, dict[str, Any]]) -> list:
    """One object per ``{name: kwargs}`` entry of a YAML section, by name from ``registry``."""
    objects = []
    for name, kwargs in specs.items():
        if name not in registry:
            raise ConfigError(f'unknown {section} {name!r}; known: {sorted(registry)}.')
        try:
            objects.append(registry[name](**(kwargs or {})))
        except (TypeError, ValueError) as error:
            raise ConfigError(f'{config_key(f"{section}.{name}", kwargs, error)}: {error}') from None
    return objects


def config_key(prefix: str, kwargs: dict[str, Any] | None, error: Exception) -> str:
    """``prefix.<argument>`` when the error message starts with one of the given arguments' names."""
    message = str(error)
    named = [k for k in (kwargs or {}) if message.startswith(str(k))]
    return f'{prefix}.{max(named, key=len)}' if named else prefix


def per_device_batch_size(global_batch_size: int, microbatch_size: int | None, world_size: int) -> int:
    """``global_train_batch_size`` split over ``world_size`` processes, checked against the microbatch size.

    Raises:
        ConfigError: the global batch does not split evenly, or the per-device batch not into microbatches.
    """
    if global_batch_size % world_size:
        raise ConfigError(
            f'global_train_batch_size {global_batch_size} is not divisible by the {world_size} processes.',
        )
    per_device = global_batch_size // world_size
    if microbatch_size is not None and per_device % microbatch_size:
        raise ConfigError(
            f'the per-device batch {per_device} (global_train_batch_size / {world_size} processes) is not divisible '
            f'by device_train_microbatch_size {microbatch_size}.',
        )
    return per_device


def trainer_kwargs(cfg: TrainerConfig, per_device_batch: int, evaluates: bool) -> dict[str, Any]:
    """The ``composer.Trainer`` arguments read straight off ``cfg``'s shared fields.

    Args:
        cfg: the run's config.
        per_device_batch: this process's share of ``global_train_batch_size``, the microbatch when none is set.
        evaluates: whether the Trainer gets an eval dataloader (without one, ``eval_interval`` is 0).
    """
    return {
        'max_duration': cfg.max_duration,
        'eval_interval': cfg.eval_interval if evaluates else 0,
        'device_train_microbatch_size': cfg.device_train_microbatch_size or per_device_batch,
        'seed': cfg.seed,
        'run_name': cfg.run_name,
        'parallelism_config': {'fsdp': dict(cfg.fsdp)} if cfg.fsdp is not None else None,
        # The checkpoint saver callback does the saving; the Trainer reads save_folder for autoresume.
        'save_folder': cfg.save_folder,
        'autoresume': cfg.autoresume,
        'load_path': cfg.load_path,
        'console_log_interval': cfg.console_log_interval,
        'progress_bar': cfg.progress_bar,
        'log_to_console': not cfg.progress_bar,
    }


def check_fsdp_version(fsdp: dict[str, Any] | None, entry_point: str = 'train.py') -> None:
    """``fsdp`` holds FSDP2 settings; Composer 0.32 reads them as FSDP2 only with ``FSDP_VERSION=2`` (else FSDP1)."""
    version = os.environ.get('FSDP_VERSION')
    if fsdp is not None and version != '2':
        raise ConfigError(
            'the `fsdp` section holds FSDP2 settings, which Composer applies only with FSDP_VERSION=2 in the '
            f'environment (FSDP_VERSION is {"unset" if version is None else repr(version)}). Launch with: '
            f'FSDP_VERSION=2 composer -n <processes> {entry_point} <config.yaml> (or drop `fsdp` for DDP).',
        )
