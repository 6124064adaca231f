"""One function to get a diffusers ``AutoencoderKL`` (or another supported autoencoder) from wherever it lives.

Accepted sources (see ``load_autoencoder``): a config dict (a new, randomly initialised model), a
local diffusers folder, a hub id (cache first), a single LDM/CompVis file (``.ckpt``,
``.safetensors``, ``.pt``, ``.pth``, ``.bin``; converted with diffusers' ``convert_ldm_vae_checkpoint``),
a taming-transformers VQGAN ``.ckpt`` (a diffusers ``VQModel``, its config read from the tensors;
``checkpoints/taming.py``), a bare diffusers state dict, or a Composer checkpoint of this project: a
file, or an FSDP sharded checkpoint folder. Every load is strict: keys that are missing or unexpected
are an error that lists them.

The class is the config's ``_class_name`` (diffusers folders, checkpoints recorded by this project)
when it names a supported one (``VQModel``), else ``AutoencoderKL``; LDM key names are for ``AutoencoderKL``,
taming's VQGAN key names for ``VQModel``.
A config that records a padding mode (``padding_mode``, see ``eqvae_composer.padding``) gets it back.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, VQModel
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor

from eqvae_composer.checkpoints.composer_state import composer_vae_state, is_composer_checkpoint, recorded_vae_config
from eqvae_composer.checkpoints.ldm import KeyMismatchError, format_keys, is_diffusers_state_dict, ldm_to_diffusers
from eqvae_composer.checkpoints.sharded import is_sharded_checkpoint, read_sharded_checkpoint
from eqvae_composer.checkpoints.taming import is_taming_vq_state_dict, taming_to_diffusers, taming_vq_config
from eqvae_composer.introspection import autoencoder_class
from eqvae_composer.padding import apply_recorded_padding_mode, tolerate_padding_key

__all__ = [
    'SD_VAE_CONFIG',
    'AutoencoderLoadError',
    'load_autoencoder',
    'load_composer_checkpoint',
    'load_state_dict_file',
    'read_checkpoint_file',
    'resolve_config',
]

#: The kl-f8 (Stable Diffusion v1) autoencoder's diffusers config: the default architecture of single files.
SD_VAE_CONFIG: dict[str, Any] = {
    'in_channels': 3,
    'out_channels': 3,
    'down_block_types': ['DownEncoderBlock2D'] * 4,
    'up_block_types': ['UpDecoderBlock2D'] * 4,
    'block_out_channels': [128, 256, 512, 512],
    'layers_per_block': 2,
    'act_fn': 'silu',
    'latent_channels': 4,
    'norm_num_groups': 32,
    'sample_size': 256,
    'scaling_factor': 0.18215,
}

log = logging.getLogger(__name__)

_SINGLE_FILE_SUFFIXES = ('.ckpt', '.safetensors', '.pt', '.pth', '.bin')

_NUMPY_RECONSTRUCT = np.zeros(0).__reduce__()[0]
# Non-tensor objects a Composer checkpoint pickles (timestamps, version strings, numpy RNG state).
# Allowing exactly these keeps `weights_only=True`: loading a file never runs arbitrary code.
_CHECKPOINT_SAFE_GLOBALS = [
    datetime.timedelta,
    torch.torch_version.TorchVersion,
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),
    type(np.dtype(np.float64)),
    _NUMPY_RECONSTRUCT,
    (_NUMPY_RECONSTRUCT, 'numpy.core.multiarray._reconstruct'),  # its name in files written by numpy 1
]


class AutoencoderLoadError(RuntimeError):
    """The autoencoder could not be loaded; the message says why and what to do."""


def read_checkpoint_file(path: str | os.PathLike) -> Any:
    """The object stored in a ``.safetensors`` file or a torch pickle, loaded without running pickled code.

    Args:
        path: the file.

    Raises:
        AutoencoderLoadError: the file is truncated, corrupt, or not a checkpoint.
    """
    path = Path(path)
    try:
        if path.suffix == '.safetensors':
            from safetensors.torch import load_file

            return load_file(str(path))
        with torch.serialization.safe_globals(_CHECKPOINT_SAFE_GLOBALS):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # truncated or foreign files raise many different types
        raise AutoencoderLoadError(
            f'{path} is not a readable checkpoint file: it may be truncated (an interrupted download or copy) '
            f'or not a checkpoint at all ({type(error).__name__}: {str(error).splitlines()[0][:300]}).',
        ) from error


def _read_composer_checkpoint(path: str | os.PathLike) -> Any:
    """A checkpoint file's content, or what export needs of a sharded checkpoint folder."""
    if not is_sharded_checkpoint(path):
        return read_checkpoint_file(path)
    try:
        return read_sharded_checkpoint(path)
    # A missing index or shard or a truncated file: DCP raises many types, and CheckpointException is a BaseException.
    except (Exception, CheckpointException) as error:
        raise AutoencoderLoadError(
            f'{path} is an incomplete or unreadable FSDP sharded checkpoint: a run killed while saving leaves the '
            "folder without its .metadata index or a rank's __<rank>_0.distcp file. Export the previous checkpoint "
            f'folder ({type(error).__name__}: {str(error).splitlines()[0][:300]}).',
        ) from error


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch pickle (a Lightning ``state_dict`` is unwrapped).

    Args:
        path: the file.

    Raises:
        AutoencoderLoadError: unreadable file, or one that holds no state dict.
    """
    return _state_dict_of(read_checkpoint_file(path), path)


def _state_dict_of(obj: Any, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and isinstance(obj.get('state_dict'), Mapping):
        obj = obj['state_dict']
    if not isinstance(obj, Mapping):
        raise AutoencoderLoadError(f'{path} holds a {type(obj).__name__}, not a state dict.')
    return dict(obj)


def resolve_config(
    config: Mapping[str, Any] | str | os.PathLike,
    subfolder: str | None = None,
    revision: str | None = None,
) -> dict[str, Any]:
    """A diffusers ``AutoencoderKL`` config from a dict, a ``config.json``, a diffusers folder or a hub id.

    Args:
        config: the dict itself, or where to read it.
        subfolder: subfolder of the folder or hub repo, e.g. ``'vae'``. Default: ``None``.
        revision: hub revision. Default: ``None``.
    """
    if isinstance(config, Mapping):
        return dict(config)
    kwargs = {k: v for k, v in {'subfolder': subfolder, 'revision': revision}.items() if v is not None}
    return dict(AutoencoderKL.load_config(str(config), **kwargs))


def _from_config(config: Mapping[str, Any]) -> torch.nn.Module:
    """A new autoencoder of the class and architecture ``config`` describes, with the padding mode it records."""
    with tolerate_padding_key():
        return apply_recorded_padding_mode(autoencoder_class(config).from_config(dict(config)))


def _build(state: Mapping[str, torch.Tensor], config: Mapping[str, Any], what: str) -> torch.nn.Module:
    vae = _from_config(config)
    expected = vae.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    wrong_shape = sorted(
        f'{k}: {tuple(state[k].shape)} in file, {tuple(expected[k].shape)} in model'
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong_shape:
        raise AutoencoderLoadError(
            f'{what} does not match the autoencoder architecture (block_out_channels='
            f'{config.get("block_out_channels")}): missing keys {format_keys(missing)}; unexpected keys '
            f'{format_keys(unexpected)}; wrong shapes {format_keys(wrong_shape)}. Pass the matching diffusers '
            'config alongside the file.',
        )
    vae.load_state_dict(state, strict=True)
    return vae


def _default_config(
    config: Mapping[str, Any] | str | os.PathLike | None,
    subfolder: str | None,
    recorded: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    if config is not None:
        return resolve_config(config, subfolder)
    return dict(recorded if recorded is not None else SD_VAE_CONFIG)


def load_composer_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, Any],
    config: Mapping[str, Any] | str | os.PathLike | None = None,
    subfolder: str | None = None,
    ema: bool = True,
) -> tuple[AutoencoderKL, str]:
    """The autoencoder of a Composer checkpoint of this project, and which weights it got.

    The architecture is, in order: ``config`` when given; the config the run recorded in the
    checkpoint (``AutoencoderConfigRecorder``); ``SD_VAE_CONFIG``. Whichever it is, the weights must
    match it key for key and shape for shape.

    Args:
        checkpoint: the file, an FSDP sharded checkpoint folder (``ep0-ba2000/``, or the
            ``latest-rank0.pt`` link to it), or a file's loaded contents.
        config: a diffusers config dict, or a ``config.json``, diffusers folder or hub id (e.g. the
            base VAE the run fine-tuned). Default: ``None``.
        subfolder: subfolder of ``config``'s folder or hub repo. Default: ``None``.
        ema: the EMA weights when the run used Composer's ``EMA``. Default: ``True``.

    Returns:
        ``(vae, 'EMA' | 'raw')``.

    Raises:
        AutoencoderLoadError: unreadable file or folder, not a Composer checkpoint of this project,
            weights that do not match the architecture (keys and shapes listed), or weights that an
            FSDP checkpoint holds only in part (EMA's copy, saved by Composer's own ``EMA``).
    """
    name = 'Composer checkpoint' if isinstance(checkpoint, Mapping) else str(checkpoint)
    obj = checkpoint if isinstance(checkpoint, Mapping) else _read_composer_checkpoint(checkpoint)
    if not is_composer_checkpoint(obj):
        raise AutoencoderLoadError(f'{name} is not a Composer checkpoint with an autoencoder.vae model.')
    state, which = composer_vae_state(obj, ema=ema)
    if any(isinstance(v, DTensor) for v in state.values()):
        other = 'ema=False (scripts/export.py --raw)' if ema else 'ema=True (scripts/export.py without --raw)'
        raise AutoencoderLoadError(
            f"{name}: its {which} weights are incomplete. Composer's own EMA keeps them in the algorithms' state, "
            "which an FSDP checkpoint saves from rank 0 alone, with rank 0's shard of each tensor. The model's "
            f'weights are complete: load those with {other}. Runs with algorithms.ema of this project '
            "(eqvae_composer.algorithms.EMA) save every rank's shard.",
        )
    vae = _build(state, _default_config(config, subfolder, recorded_vae_config(obj)), name)
    log.info('loaded the %s weights of %s', which, name)
    return vae, which


def _load_single_file(
    path: Path,
    config: Mapping[str, Any] | str | os.PathLike | None,
    subfolder: str | None,
    ema: bool,
    obj: Any = None,
) -> tuple[AutoencoderKL, str]:
    """``(vae, 'EMA' | 'raw')`` from a Composer checkpoint, ``(vae, 'stored')`` from any other file.

    ``obj`` is the file's content when the caller has already read it.
    """
    obj = read_checkpoint_file(path) if obj is None else obj
    if is_composer_checkpoint(obj):
        return load_composer_checkpoint(obj, config, subfolder, ema)
    state = _state_dict_of(obj, path)
    if not is_diffusers_state_dict(state) and is_taming_vq_state_dict(state):
        return _load_taming_vq(path, state, config, subfolder), 'stored'
    resolved = _default_config(config, subfolder)
    if not is_diffusers_state_dict(state):
        if autoencoder_class(resolved) is not AutoencoderKL:
            raise AutoencoderLoadError(
                f'{path} does not hold diffusers key names, and LDM key names are converted for '
                'AutoencoderKL only: save the weights with diffusers names (state_dict()).'
            )
        try:
            state = ldm_to_diffusers(state, resolved)
        except KeyMismatchError as error:
            raise AutoencoderLoadError(
                f'{path}: {error} Pass the matching diffusers config alongside the file.',
            ) from None
    return _build(state, resolved, str(path)), 'stored'


def _load_taming_vq(
    path: Path,
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any] | str | os.PathLike | None,
    subfolder: str | None,
) -> torch.nn.Module:
    """A diffusers ``VQModel`` from a taming VQGAN state dict; the config is read from its tensors unless given."""
    try:
        if config is None:
            resolved = taming_vq_config(state)
        else:  # a config without a class name is taken for the VQModel the checkpoint holds
            resolved = {'_class_name': VQModel.__name__, **resolve_config(config, subfolder)}
        if autoencoder_class(resolved) is not VQModel:
            raise KeyMismatchError(
                f'it holds a taming VQGAN, but the config given is for {autoencoder_class(resolved).__name__}.'
            )
        converted = taming_to_diffusers(state, resolved)
    except KeyMismatchError as error:
        raise AutoencoderLoadError(
            f'{path}: {error} Leave the config out to read it from the checkpoint, or pass the matching VQModel config.'
        ) from None
    return _build(converted, resolved, str(path))


def _hub_offline() -> bool:
    return os.environ.get('HF_HUB_OFFLINE', '').lower() in ('1', 'true', 'yes', 'on')


def _from_pretrained(source: str, **kwargs: Any) -> torch.nn.Module:
    """``from_pretrained`` of the class the folder's ``config.json`` names, with the padding mode it records."""
    with tolerate_padding_key():
        vae = autoencoder_class(AutoencoderKL.load_config(source, **kwargs)).from_pretrained(source, **kwargs)
    return apply_recorded_padding_mode(vae)


def _load_pretrained(source: str, subfolder: str | None, revision: str | None) -> torch.nn.Module:
    # low_cpu_mem_usage=False: diffusers' default (True) needs `accelerate` and, without it, warns on every
    # load before falling back to this. A VAE is small (SD-VAE: 84M parameters); building it on the meta
    # device would save one transient copy of its weights, not worth a dependency and a second loading path.
    kwargs = {'subfolder': subfolder, 'revision': revision, 'low_cpu_mem_usage': False}
    if Path(source).is_dir():
        return _from_pretrained(source, **{k: v for k, v in kwargs.items() if v is not None})
    try:  # the hub cache first: no network round trip when the files are already here
        return _from_pretrained(source, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    if _hub_offline():
        raise AutoencoderLoadError(
            f'{source!r} (subfolder={subfolder!r}) is not in the Hugging Face cache and HF_HUB_OFFLINE is set. '
            'Pass a local path instead: a diffusers folder or an LDM .ckpt/.safetensors file.',
        )
    try:
        return _from_pretrained(source, **kwargs)
    except Exception as error:
        raise AutoencoderLoadError(
            f'could not load {source!r} (subfolder={subfolder!r}): it is not a local path, not in the Hugging Face '
            f'cache, and downloading failed ({type(error).__name__}). Offline, pass a local path instead: a '
            'diffusers folder or an LDM .ckpt/.safetensors file.',
        ) from error


def load_autoencoder(
    source: str | os.PathLike | Mapping[str, Any],
    subfolder: str | None = None,
    revision: str | None = None,
    config: Mapping[str, Any] | str | os.PathLike | None = None,
    ema: bool = True,
) -> torch.nn.Module:
    """Load or build an ``AutoencoderKL``, or the class a config's ``_class_name`` names (``VQModel``).

    Args:
        source: a diffusers config dict (builds a new model); a local diffusers folder; a hub id
            such as ``'stabilityai/sd-vae-ft-ema'``; a single file: LDM ``model.ckpt`` (Lightning
            checkpoint, keys with or without ``first_stage_model.``; its ``loss.*`` keys are
            ignored), ``.safetensors``, a bare LDM or diffusers state dict; a taming-transformers VQGAN
            ``.ckpt`` (a ``VQModel``, whose config is read from the tensors unless given); or a Composer checkpoint
            of this project: a file, or an FSDP sharded checkpoint folder (or the ``latest-rank0.pt``
            link to one).
        subfolder: subfolder of a diffusers folder or hub repo (or of ``config`` when that is a
            folder or hub id), e.g. ``'vae'``. Default: ``None``.
        revision: hub revision. Default: ``None``.
        config: architecture of a single file: a diffusers config dict, or a ``config.json``,
            diffusers folder or hub id to read it from. Default: for a Composer checkpoint, the
            config it recorded (``AutoencoderConfigRecorder``); otherwise ``SD_VAE_CONFIG``.
        ema: for a Composer checkpoint of a run with ``EMA``, load the EMA weights (``False``: the
            raw training weights). Default: ``True``.

    Raises:
        AutoencoderLoadError: unreadable or truncated file, missing/unexpected keys (listed), or a
            hub id that is neither cached nor downloadable.
        FileNotFoundError: a path that looks local but does not exist.
    """
    if isinstance(source, Mapping):
        return _from_config(source)
    path = Path(source).expanduser()
    if is_sharded_checkpoint(path):
        return load_composer_checkpoint(path, config, subfolder, ema)[0]
    if path.suffix in _SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f'autoencoder checkpoint file {path} does not exist.')
        return _load_single_file(path, config, subfolder, ema)[0]
    if str(source).startswith(('.', '/', '~')) and not path.exists():
        raise FileNotFoundError(f'autoencoder folder {path} does not exist.')
    return _load_pretrained(str(path) if path.exists() else str(source), subfolder, revision)
