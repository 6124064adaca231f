"""Write a trained autoencoder where diffusion trainers can load it."""

from __future__ import annotations

import os
from pathlib import Path

from diffusers import AutoencoderKL

__all__ = ['export_diffusers']


def export_diffusers(vae: AutoencoderKL, folder: str | os.PathLike) -> Path:
    """Save ``vae`` as a diffusers folder (``config.json`` + safetensors) that ``from_pretrained`` loads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(folder, safe_serialization=True)
    return folder
