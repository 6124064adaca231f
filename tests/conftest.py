"""Shared fixtures: tiny autoencoders built from a config (no weights are ever downloaded)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL


def tiny_vae_config(blocks: int = 4, width: int = 8, latent_channels: int = 4) -> dict:
    """An SD-VAE-shaped AutoencoderKL small enough for a CPU test: f = 2 ** (blocks - 1)."""
    return {
        'in_channels': 3,
        'out_channels': 3,
        'down_block_types': ['DownEncoderBlock2D'] * blocks,
        'up_block_types': ['UpDecoderBlock2D'] * blocks,
        'block_out_channels': [width] * blocks,
        'layers_per_block': 1,
        'latent_channels': latent_channels,
        'norm_num_groups': 4,
        'sample_size': 32,
    }


def tiny_vae(seed: int = 0, **kwargs) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL.from_config(tiny_vae_config(**kwargs))


@pytest.fixture
def vae() -> AutoencoderKL:
    return tiny_vae()


