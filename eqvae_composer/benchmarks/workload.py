"""What every contender of the training-step benchmark trains: the model, the images, the EQ-VAE draws.

The same ``seed`` gives the same initial weights, step ``s`` the same images, and ``draw(s)`` the
branch and transform ``EquivarianceAlgorithm()`` draws at step ``s``, so the contenders differ only
in how they compute a step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from eqvae_composer.algorithms.equivariance import EquivarianceAlgorithm
from eqvae_composer.algorithms.equivariance.transforms import Branch, SpatialTransform
from eqvae_composer.models import ComposerAutoencoderKL, VAEGANLoss

__all__ = [
    'P_EQUIVARIANCE',
    'P_LOWRES',
    'SEED',
    'BenchConfig',
    'build_model',
    'draw',
    'images_for_step',
    'random_lpips',
    'sample_image',
    'sd_vae_config',
]

SEED = 17
P_EQUIVARIANCE, P_LOWRES = 0.5, 0.25  # the reference's mix, EquivarianceAlgorithm()'s defaults


def sd_vae_config(width: int = 32, layers_per_block: int = 2, resolution: int = 256) -> dict[str, Any]:
    """SD-VAE's layout (kl-f8: 4 blocks, x1 x2 x4 x4 channels, mid-block attention) at base ``width``.

    ``width=128`` is SD-VAE itself; group norm keeps SD-VAE's 4 channels per group in the first block.
    """
    return {
        'in_channels': 3,
        'out_channels': 3,
        'down_block_types': ['DownEncoderBlock2D'] * 4,
        'up_block_types': ['UpDecoderBlock2D'] * 4,
        'block_out_channels': [width, 2 * width, 4 * width, 4 * width],
        'layers_per_block': layers_per_block,
        'latent_channels': 4,
        'norm_num_groups': max(1, width // 4),
        'sample_size': resolution,
    }


def random_lpips() -> torch.nn.Module:
    """LPIPS-VGG's exact network with random VGG weights (calibration layers from the lpips package)."""
    import lpips

    net = lpips.LPIPS(net='vgg', pretrained=True, pnet_rand=True, verbose=False)
    return net.eval().requires_grad_(False)


@dataclass
class BenchConfig:
    """One benchmark configuration: the model's size, the batch, the device and the optimizer kernel."""

    width: int = 32
    layers_per_block: int = 2
    disc_filters: int = 64
    disc_layers: int = 3
    batch_size: int = 2
    resolution: int = 128
    lpips: bool = True
    lr: float = 1e-4
    channels_last: bool = False
    adam_kernel: str = 'fused'  # every contender's (ADAM_KERNELS); reference_shipped always uses 'default'
    gradient_checkpointing: bool = False
    device: str = 'cpu'


def build_model(
    cfg: BenchConfig, lpips_net: torch.nn.Module | None, sample_posterior: bool = True, seed: int = SEED
) -> ComposerAutoencoderKL:
    """The model every contender trains; the same ``seed`` gives the same initial weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(sd_vae_config(cfg.width, cfg.layers_per_block, cfg.resolution))
    loss = VAEGANLoss(
        lpips=lpips_net,
        lpips_weight=1.0 if lpips_net is not None else 0.0,
        disc_num_filters=cfg.disc_filters,
        disc_num_layers=cfg.disc_layers,
    )
    model = ComposerAutoencoderKL(
        vae, loss, sample_posterior=sample_posterior, gradient_checkpointing=cfg.gradient_checkpointing
    ).to(cfg.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def sample_image(index: int, cfg: BenchConfig) -> torch.Tensor:
    """Image ``index`` of the run (step ``index // batch_size``, row ``index % batch_size``), in [-1, 1]."""
    generator = torch.Generator().manual_seed(1000 + index)
    return torch.rand(3, cfg.resolution, cfg.resolution, generator=generator) * 2 - 1


def images_for_step(step: int, cfg: BenchConfig) -> torch.Tensor:
    """The batch of step ``step``: the same for every contender (content does not change the cost)."""
    return torch.stack([sample_image(step * cfg.batch_size + row, cfg) for row in range(cfg.batch_size)])


def draw(
    step: int, microbatch: int = 0, p_equivariance: float = P_EQUIVARIANCE, seed: int = SEED
) -> tuple[Branch, SpatialTransform]:
    """The branch and transform ``EquivarianceAlgorithm()`` draws for (step, microbatch) under ``seed``."""
    return EquivarianceAlgorithm(p_equivariance=p_equivariance, p_lowres=P_LOWRES).draw(seed, step, microbatch)
