"""Finding things inside models: the ComposerModel inside a DDP wrapper, the VAE and its latent grid.

Neutral ground for the algorithm, the model, evaluation, checkpoints and callbacks alike, so that
none of them imports another's module just for these.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

__all__ = ['find_autoencoder', 'latent_entry_point', 'unwrap_model', 'vae_downsample_factor']


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ComposerModel a Trainer was given: DDP wraps it (``.module``); FSDP1 and FSDP2 shard it in place."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def find_autoencoder(model: torch.nn.Module) -> AutoencoderKL:
    """The single diffusers ``AutoencoderKL`` inside ``model`` (which may be one itself)."""
    found = [m for m in model.modules() if isinstance(m, AutoencoderKL)]
    if len(found) != 1:
        raise ValueError(
            f'EquivarianceAlgorithm needs a model holding exactly one diffusers AutoencoderKL; '
            f'{type(model).__name__} holds {len(found)}.',
        )
    return found[0]


def latent_entry_point(vae: AutoencoderKL) -> torch.nn.Module:
    """The first module ``AutoencoderKL.decode`` applies to z."""
    post_quant_conv = getattr(vae, 'post_quant_conv', None)
    return post_quant_conv if post_quant_conv is not None else vae.decoder


def vae_downsample_factor(vae: AutoencoderKL) -> int:
    """Pixels per latent cell: 2 ** (number of encoder blocks - 1), i.e. 8 for SD-VAE."""
    return 2 ** (len(vae.config.block_out_channels) - 1)
