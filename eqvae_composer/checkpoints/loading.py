"""One function to get a diffusers ``AutoencoderKL`` from wherever it lives.

Accepted: a config dict (a new, randomly initialised model), a local diffusers folder, a hub id
(cached by diffusers as usual), or a single LDM/CompVis file (``.ckpt``, ``.safetensors``, ``.pt``,
``.bin``) converted with diffusers' own ``convert_ldm_vae_checkpoint``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

__all__ = ['SD_VAE_CONFIG', 'AutoencoderLoadError', 'load_autoencoder', 'load_state_dict_file']

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

_SINGLE_FILE_SUFFIXES = ('.ckpt', '.safetensors', '.pt', '.pth', '.bin')


class AutoencoderLoadError(RuntimeError):
    """The autoencoder could not be loaded; the message says why and what to do."""


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch pickle (a Lightning ``state_dict`` is unwrapped)."""
    path = Path(path)
    try:
        if path.suffix == '.safetensors':
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # truncated or foreign files raise many different types
        raise AutoencoderLoadError(f'{path} is not a readable checkpoint file ({type(error).__name__}: {error}).')
    if isinstance(state, Mapping) and isinstance(state.get('state_dict'), Mapping):
        state = state['state_dict']
    if not isinstance(state, Mapping):
        raise AutoencoderLoadError(f'{path} holds a {type(state).__name__}, not a state dict.')
    return dict(state)


def _load_single_file(path: Path, config: Mapping[str, Any] | None) -> AutoencoderKL:
    config = dict(SD_VAE_CONFIG if config is None else config)
    state = load_state_dict_file(path)
    if any(k.startswith(('encoder.down_blocks.', 'decoder.up_blocks.')) for k in state):
        converted = state  # already diffusers-named (e.g. a bare diffusers state dict)
    else:
        converted = convert_ldm_vae_checkpoint(state, config)
    vae = AutoencoderKL.from_config(config)
    missing, unexpected = vae.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise AutoencoderLoadError(
            f'{path} does not match the autoencoder architecture '
            f'(block_out_channels={config.get("block_out_channels")}): '
            f'missing keys {sorted(missing)}; unexpected keys {sorted(unexpected)}. '
            'Pass the matching diffusers config alongside the file.',
        )
    return vae


def _load_pretrained(source: str, subfolder: str | None, revision: str | None) -> AutoencoderKL:
    kwargs = {'subfolder': subfolder, 'revision': revision}
    if Path(source).is_dir():
        return AutoencoderKL.from_pretrained(source, **{k: v for k, v in kwargs.items() if v is not None})
    try:  # the hub cache first: no network round trip when the files are already here
        return AutoencoderKL.from_pretrained(source, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    if os.environ.get('HF_HUB_OFFLINE', '').lower() in ('1', 'true', 'yes'):
        raise AutoencoderLoadError(
            f'{source!r} (subfolder={subfolder!r}) is not in the Hugging Face cache and HF_HUB_OFFLINE is set. '
            'Pass a local diffusers folder or checkpoint file instead.',
        )
    try:
        return AutoencoderKL.from_pretrained(source, **kwargs)
    except Exception as error:
        raise AutoencoderLoadError(
            f'could not load {source!r} (subfolder={subfolder!r}): it is not a local path, not in the Hugging Face '
            f'cache, and downloading failed ({type(error).__name__}). Offline, pass a local diffusers folder '
            'or an LDM .ckpt/.safetensors file.',
        ) from error


def load_autoencoder(
    source: str | os.PathLike | Mapping[str, Any],
    subfolder: str | None = None,
    revision: str | None = None,
    config: Mapping[str, Any] | None = None,
) -> AutoencoderKL:
    """Load or build an ``AutoencoderKL``.

    Args:
        source: a diffusers config dict (builds a new model), a local diffusers folder, a
            checkpoint file (LDM ``model.ckpt`` with or without ``first_stage_model.``, a
            ``.safetensors`` or a bare state dict), or a hub id such as
            ``'CompVis/stable-diffusion-v1-4'``.
        subfolder (str, optional): subfolder of a diffusers folder or hub repo, e.g. ``'vae'``.
        revision (str, optional): hub revision.
        config (Mapping, optional): diffusers config of a single checkpoint file's architecture.
            Default: ``SD_VAE_CONFIG``.

    Raises:
        AutoencoderLoadError: unreadable file, mismatched keys (listed), or a hub id that is neither
            cached nor downloadable.
        FileNotFoundError: a path that looks local but does not exist.
    """
    if isinstance(source, Mapping):
        return AutoencoderKL.from_config(dict(source))
    path = Path(source)
    if path.suffix in _SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(f'autoencoder checkpoint file {path} does not exist.')
        return _load_single_file(path, config)
    if str(source).startswith(('.', '/', '~')) and not path.expanduser().exists():
        raise FileNotFoundError(f'autoencoder folder {path} does not exist.')
    return _load_pretrained(str(path.expanduser()) if path.expanduser().exists() else str(source), subfolder, revision)
