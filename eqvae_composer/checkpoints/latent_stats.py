"""Latent mean and standard deviation of an autoencoder over a set of images: the latent scale to use.

Diffusion models expect roughly unit-variance latents, so a fine-tuned VAE needs its own factors:
``scaling_factor = 1 / std`` (LDM's ``scale_by_std``: the std of posterior *samples*, all channels
pooled) and ``shift_factor = mean`` (the SD3/FLUX convention ``z' = (z - shift) * scale``; SD-v1
pipelines read only the scale, and since the std is taken about the mean the scale is right for
them too). A wrong scale silently slows or ruins downstream training.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL

__all__ = ['LatentStatistics', 'latent_statistics']


@dataclass(frozen=True)
class LatentStatistics:
    """Moments of the latents of ``num_images`` images.

    Attributes:
        mean: mean over every latent value (all channels pooled).
        std: standard deviation over every latent value, about ``mean`` (unbiased, like ``torch.std``).
        channel_mean: per-channel means.
        channel_std: per-channel standard deviations.
        num_images: images encoded.
        num_values: latent values counted.
        sample_posterior: whether the latents were posterior samples (``True``) or posterior means.
    """

    mean: float
    std: float
    channel_mean: tuple[float, ...]
    channel_std: tuple[float, ...]
    num_images: int
    num_values: int
    sample_posterior: bool

    @property
    def scaling_factor(self) -> float:
        """``1 / std``: what diffusers' ``AutoencoderKL.config.scaling_factor`` should be."""
        return 1.0 / self.std

    @property
    def shift_factor(self) -> float:
        """``mean``: what diffusers' ``AutoencoderKL.config.shift_factor`` should be."""
        return self.mean

    def summary(self) -> str:
        """A human-readable report."""
        kind = 'posterior samples' if self.sample_posterior else 'posterior means (mode)'
        channels = ', '.join(f'{m:+.4f}/{s:.4f}' for m, s in zip(self.channel_mean, self.channel_std))
        return (
            f'latent statistics over {self.num_images} images ({self.num_values} values, {kind}):\n'
            f'  mean {self.mean:+.6f}  std {self.std:.6f}\n'
            f'  per channel mean/std: {channels}\n'
            f'  scaling_factor = 1/std = {self.scaling_factor:.6f}\n'
            f'  shift_factor = mean = {self.shift_factor:+.6f}'
        )


def _images(batch: torch.Tensor | Mapping[str, torch.Tensor], image_key: str) -> torch.Tensor:
    return batch[image_key] if isinstance(batch, Mapping) else batch


@torch.no_grad()
def latent_statistics(
    vae: AutoencoderKL,
    batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    num_images: int | None = None,
    sample_posterior: bool = True,
    image_key: str = 'image',
    generator: torch.Generator | None = None,
) -> LatentStatistics:
    """Encode images and measure their latents' mean and std.

    Args:
        vae: the autoencoder; its ``scaling_factor``/``shift_factor`` are not applied.
        batches: image batches ``[B, 3, H, W]`` in [-1, 1], or dicts holding them under ``image_key``.
        num_images: stop after this many images. Default: ``None`` (all).
        sample_posterior: measure posterior samples (the latents a diffusion model is trained on,
            LDM's convention) rather than posterior means. Default: ``True``.
        image_key: key of the images in dict batches. Default: ``'image'``.
        generator: randomness of the posterior samples. Default: ``None`` (the global generator).

    Raises:
        ValueError: no images, or latents with zero spread.
    """
    was_training = vae.training
    vae.eval()
    device = next(vae.parameters()).device
    total = total_sq = count = None
    seen = 0
    try:
        for batch in batches:
            images = _images(batch, image_key)
            if num_images is not None:
                images = images[: num_images - seen]
            if len(images) == 0:
                break
            posterior = vae.encode(images.to(device, next(vae.parameters()).dtype)).latent_dist
            latents = posterior.sample(generator) if sample_posterior else posterior.mode()
            # float64 sums: millions of values, and var = E[z^2] - E[z]^2 cancels badly in fp32.
            values = latents.double().transpose(0, 1).flatten(1)  # [C, B*h*w]
            total = values.sum(1) + (0 if total is None else total)
            total_sq = values.pow(2).sum(1) + (0 if total_sq is None else total_sq)
            count = values.shape[1] + (0 if count is None else count)
            seen += len(images)
            if num_images is not None and seen >= num_images:
                break
    finally:
        vae.train(was_training)
    if not seen:
        raise ValueError('no images to measure: the data is empty.')
    channel_mean = total / count
    channel_var = (total_sq - count * channel_mean.pow(2)) / (count - 1)
    n = count * len(total)
    mean = total.sum() / n
    std = ((total_sq.sum() - n * mean**2) / (n - 1)).sqrt()
    if not std > 0:
        raise ValueError('the latents have zero spread; no scaling factor exists.')
    return LatentStatistics(
        mean=float(mean),
        std=float(std),
        channel_mean=tuple(channel_mean.tolist()),
        channel_std=tuple(channel_var.clamp_min(0).sqrt().tolist()),
        num_images=seen,
        num_values=int(n),
        sample_posterior=sample_posterior,
    )
