"""A tiny labelled latent dataset, made the way a user makes one: images -> MDS -> scripts/encode_latents's library."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from streaming import MDSWriter

from eqvae_composer.latents import EncodeOptions, encode_latents
from tests.conftest import tiny_kl_config
from tests.data_fixtures import photo

NUM_CLASSES = 4


def make_latents(
    root: Path, count: int = 16, resolution: int = 32, size_limit: int = 1 << 12, flip: bool = False
) -> tuple[Path, Path]:
    """``count`` photos in 4 classes, encoded by a tiny SD-shaped f8 VAE: ``(latent folder, VAE folder)``."""
    torch.manual_seed(0)
    vae_dir = root / 'vae'
    AutoencoderKL.from_config(tiny_kl_config('sd')).save_pretrained(vae_dir)
    images = root / 'images'
    with MDSWriter(out=str(images), columns={'x': 'jpeg', 'y': 'int'}, size_limit=size_limit) as writer:
        for i in range(count):
            image: Image.Image = photo(resolution + 8 * (i % 3), resolution + 4, seed=i)
            writer.write({'x': image, 'y': i % NUM_CLASSES})
    out = root / 'latents'
    encode_latents(
        str(vae_dir),
        str(images),
        str(out),
        EncodeOptions(resolution=resolution, dtype='float32', flip=flip, progress=False),
    )
    return out, vae_dir


@pytest.fixture(scope='module')
def latents(tmp_path_factory) -> tuple[Path, Path]:
    return make_latents(tmp_path_factory.mktemp('diffusion'))
