"""Shared fixtures: tiny autoencoders built from a config (no weights are ever downloaded); streaming's
shared memory released after each test."""

from __future__ import annotations

import atexit

import pytest
import torch
from diffusers import AutoencoderKL, VQModel


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


#: The config fields that make a KL autoencoder SD-, SDXL-, SD3- or FLUX-shaped (their hub configs' values),
#: on top of ``tiny_vae_config``: latent channels, the latent normalisation, the quant convs, fp32 decoding.
KL_SHAPES: dict[str, dict] = {
    'sd': {'scaling_factor': 0.18215},
    'sdxl': {'scaling_factor': 0.13025, 'force_upcast': True},
    'sd3': {
        'latent_channels': 16,
        'scaling_factor': 1.5305,
        'shift_factor': 0.0609,
        'use_quant_conv': False,
        'use_post_quant_conv': False,
    },
    'flux': {
        'latent_channels': 16,
        'scaling_factor': 0.3611,
        'shift_factor': 0.1159,
        'use_quant_conv': False,
        'use_post_quant_conv': False,
    },
}


def tiny_kl_config(shape: str) -> dict:
    """``tiny_vae_config`` (f8) with the fields of ``KL_SHAPES[shape]``."""
    return {**tiny_vae_config(), **KL_SHAPES[shape]}


def tiny_vq_config(blocks: int = 4, width: int = 8, num_codes: int = 32) -> dict:
    """A VQGAN-shaped diffusers ``VQModel`` in ``tiny_vae_config``'s layout: f = 2 ** (blocks - 1)."""
    return {**tiny_vae_config(blocks, width), 'num_vq_embeddings': num_codes}


def tiny_vq(seed: int = 0, **kwargs) -> VQModel:
    torch.manual_seed(seed)
    return VQModel.from_config(tiny_vq_config(**kwargs))


@pytest.fixture(autouse=True)
def release_streaming_shared_memory(monkeypatch):
    """At the end of each test, what process exit does for the shared memory streaming opened in it.

    streaming registers an ``atexit`` cleanup for every ``SharedMemory`` it creates or attaches to. The
    library releases a dataset's blocks when the dataset is collected (``compat.init_streaming_dataset``,
    ``compat.ResumeMemoryHook``; tests/test_shared_memory.py, which turns this fixture off, checks it).
    This fixture keeps tests independent of when that happens and covers what the library does not
    build: datasets in reference cycles the garbage collector has not reached yet, plain
    ``StreamingDataset``s and blocks a test makes itself. Blocks still in use (a dataset a longer-lived
    fixture holds) cannot close and are left to exit. A released block forgets its handles, as the
    library's do, so that a later cleanup cannot unlink another dataset's block of the same name.
    """
    from streaming.base.shared import memory

    opened = []
    real_init = memory.SharedMemory.__init__

    def init_and_record(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        opened.append(self)

    monkeypatch.setattr(memory.SharedMemory, '__init__', init_and_record)
    yield
    monkeypatch.undo()
    for shm in reversed(opened):
        try:
            shm.cleanup()
        except BufferError:  # a view of it is still alive: exit will clean it up
            continue
        atexit.unregister(shm.cleanup)
        shm.created_shms, shm.opened_shms = [], []
