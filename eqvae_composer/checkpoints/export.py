"""Write a trained autoencoder where diffusion trainers can load it: a diffusers folder, an LDM (or taming) file."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, VQModel

from eqvae_composer.checkpoints.composer_state import is_composer_checkpoint
from eqvae_composer.checkpoints.ldm import LDM_PREFIX, diffusers_to_ldm
from eqvae_composer.checkpoints.loading import (
    _SINGLE_FILE_SUFFIXES,
    _load_single_file,
    load_autoencoder,
    load_composer_checkpoint,
    read_checkpoint_file,
)
from eqvae_composer.checkpoints.sharded import is_sharded_checkpoint
from eqvae_composer.checkpoints.taming import diffusers_to_taming

__all__ = ['export_diffusers', 'export_ldm', 'load_for_export', 'set_latent_factors']


def load_for_export(
    source: str | os.PathLike,
    config: Mapping[str, Any] | str | os.PathLike | None = None,
    subfolder: str | None = None,
    ema: bool = True,
) -> tuple[AutoencoderKL, str]:
    """Load any ``load_autoencoder`` source and say which weights it holds.

    Args:
        source: a Composer checkpoint of this project (a file, or an FSDP sharded checkpoint folder),
            or anything ``load_autoencoder`` accepts.
        config: architecture of a single file (see ``load_autoencoder``). Default: ``None``.
        subfolder: subfolder of a diffusers folder / hub repo (``source``'s, else ``config``'s).
            Default: ``None``.
        ema: for a Composer checkpoint of a run with ``EMA``, the EMA weights (``False``: the raw
            ones). Default: ``True``.

    Returns:
        ``(vae, weights)`` with ``weights`` one of ``'EMA'``, ``'raw'`` (a Composer checkpoint) or
        ``'stored'`` (any other source).
    """
    path = Path(source).expanduser()
    if is_sharded_checkpoint(path):
        return load_composer_checkpoint(path, config, subfolder, ema)
    if path.is_file():
        obj = read_checkpoint_file(path)  # read once: a Composer checkpoint may have any file name
        if is_composer_checkpoint(obj) or path.suffix in _SINGLE_FILE_SUFFIXES:
            return _load_single_file(path, config, subfolder, ema, obj)
    return load_autoencoder(source, subfolder=subfolder, config=config), 'stored'


def export_diffusers(vae: torch.nn.Module, folder: str | os.PathLike) -> Path:
    """Save ``vae`` as a diffusers folder (``config.json`` + safetensors) that ``from_pretrained`` loads.

    Any diffusers autoencoder (``AutoencoderKL``, ``VQModel``): ``save_pretrained`` writes its class name
    (``_class_name``) and every config field (``scaling_factor``, ``shift_factor``, ``force_upcast``...).

    Args:
        vae: the autoencoder.
        folder: the output folder (created).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def export_ldm(vae: AutoencoderKL | VQModel, path: str | os.PathLike, prefix: bool = False) -> Path:
    """Save ``vae`` with the kl-f8 checkpoint's LDM key names (``encoder.down.0.block.0...``).

    A ``VQModel`` gets taming-transformers' VQGAN key names (``checkpoints/taming.py``), which LDM's VQ
    first stages share. ``.safetensors`` gets the flat tensors; any other suffix (``.ckpt``) a torch
    pickle ``{'state_dict': tensors}``, which is what LDM's and taming's ``init_from_ckpt`` read.

    Args:
        vae: the autoencoder.
        path: the output file.
        prefix: prepend ``first_stage_model.``, the layout of a full LDM / Stable Diffusion
            checkpoint. Default: ``False`` (the layout of the autoencoder's own ``model.ckpt``).
    """
    if not isinstance(vae, (AutoencoderKL, VQModel)):
        raise ValueError(
            f'LDM key names exist for AutoencoderKL and VQModel only, not {type(vae).__name__}: export it as a '
            'diffusers folder (export_diffusers, scripts/export.py --out).'
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rename = diffusers_to_taming if isinstance(vae, VQModel) else diffusers_to_ldm
    state = rename(vae.state_dict(), vae.config, prefix=LDM_PREFIX if prefix else '')
    state = {k: v.detach().cpu() for k, v in state.items()}
    if path.suffix == '.safetensors':
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save({'state_dict': state}, path)
    return path


def set_latent_factors(folder: str | os.PathLike, scaling_factor: float, shift_factor: float | None) -> dict[str, Any]:
    """Write ``scaling_factor`` and ``shift_factor`` into a diffusers folder's ``config.json``.

    Args:
        folder: a diffusers ``AutoencoderKL`` folder.
        scaling_factor: the latent scale, ``1 / std``.
        shift_factor: the latent shift (the mean), or ``None`` for SD-v1-style scale-only latents.

    Returns:
        The updated config.
    """
    path = Path(folder) / 'config.json'
    if not path.is_file():
        raise FileNotFoundError(f'{path} does not exist: {folder} is not a diffusers folder.')
    config = json.loads(path.read_text())
    config['scaling_factor'] = float(scaling_factor)
    config['shift_factor'] = None if shift_factor is None else float(shift_factor)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + '\n')
    return config
