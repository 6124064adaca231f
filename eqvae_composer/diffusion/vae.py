"""The decoder of the VAE a latent dataset was encoded with, from what ``latents.json`` records."""

from __future__ import annotations

import os
from typing import Any

import diffusers
import torch

from eqvae_composer.latents.storage import METADATA_FILE, read_metadata
from eqvae_composer.padding import apply_recorded_padding_mode

__all__ = ['LatentDecoder', 'latent_metadata']


def latent_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """A latent dataset's ``latents.json``; a clear error when the folder has none."""
    return read_metadata(os.path.join(folder, METADATA_FILE))


class LatentDecoder(torch.nn.Module):
    """Scaled latents (what the diffusion model makes) -> images in [-1, 1], with the recorded VAE.

    The VAE is read from a diffusers folder (``scripts/export.py`` writes one; ``latents.json``'s
    ``vae.source`` names the one the latents came from) and must have the class, scaling and shift the
    latents were made with.

    Args:
        metadata: The dataset's ``latents.json``.
        vae: A diffusers folder (or hub id in the cache) to read instead of ``vae.source``. Default: the source.
    """

    def __init__(self, metadata: dict[str, Any], vae: str | None = None) -> None:
        super().__init__()
        record = metadata['vae']
        source = vae or record['source']
        cls = getattr(diffusers, record['class'], None)
        if cls is None:
            raise ValueError(f'latents.json names the VAE class {record["class"]!r}, which diffusers does not have.')
        try:  # a folder, or a hub id already in the cache: never a download in the middle of a run
            self.vae = cls.from_pretrained(source, local_files_only=True).eval().requires_grad_(False)
        except (OSError, ValueError) as error:
            raise FileNotFoundError(
                f'cannot read the VAE of these latents from {source} ({type(error).__name__}); pass its diffusers '
                'folder (scripts/export.py writes one) as the decoder (YAML: vae).'
            ) from None
        # A reflect-padded VAE records its mode in config.json, which plain diffusers ignores: decoded with
        # zero padding, its samples would have the wrong borders.
        apply_recorded_padding_mode(self.vae)
        self.scaling_factor = float(record['scaling_factor'])
        self.shift_factor = float(record['shift_factor'])
        config = self.vae.config
        mine = (float(config.get('scaling_factor') or 1.0), float(config.get('shift_factor') or 0.0))
        if mine != (self.scaling_factor, self.shift_factor):
            raise ValueError(
                f'{source} has scaling/shift {mine}, the latents were made with '
                f'{(self.scaling_factor, self.shift_factor)}: it is not the VAE of these latents.'
            )

    @torch.no_grad()
    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode scaled latents: ``z / scaling_factor + shift_factor`` into the VAE's decoder."""
        z = latents / self.scaling_factor + self.shift_factor
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)
