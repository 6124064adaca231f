"""How good the probe's samples are: gFID (torchmetrics' FID) and SWD against held-out images.

The Inception network is an argument (``scripts/eval_diffusion.py`` loads it offline-safe, as rFID
does), so the measures are testable with a tiny feature extractor. Images are [-1, 1] tensors and are
quantized to uint8 first, as a saved PNG would be (the protocol of DiT's ``sample_ddp.py`` + ADM's suite).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from eqvae_composer.diffusion.model import ComposerLatentDiffusion
from eqvae_composer.diffusion.swd import swd

__all__ = ['generate_latents', 'sample_quality', 'to_uint8']


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 [0, 255] (DiT's ``sample_ddp.py``: ``clamp(127.5 * x + 128, 0, 255)``)."""
    return torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8)


def generate_latents(
    model: ComposerLatentDiffusion,
    latent_shape: tuple[int, int, int],
    num_samples: int,
    batch_size: int = 32,
    guidance_scale: float = 1.0,
    num_steps: int = 250,
    sampler: str | None = None,
    seed: int = 0,
) -> Iterator[torch.Tensor]:
    """Batches of scaled latents for uniformly drawn classes (DiT's ``sample_ddp.py``), reproducible by ``seed``."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        labels = torch.randint(0, model.num_classes, (n,), generator=generator).to(device)
        noise = torch.randn((n, *latent_shape), generator=generator).to(device)
        step_generator = torch.Generator(device=device).manual_seed(seed + 1 + start)
        yield model.generate(labels, noise, guidance_scale, num_steps, sampler, generator=step_generator)


def sample_quality(
    samples: Iterable[torch.Tensor],
    references: Iterable[torch.Tensor],
    feature_extractor: nn.Module,
    swd_images: int = 2048,
    swd_seed: int = 0,
) -> dict[str, float]:
    """gFID over all images and SWD over the first ``swd_images`` of each set.

    Args:
        samples: Batches of generated images in [-1, 1].
        references: Batches of held-out real images in [-1, 1], the same size.
        feature_extractor: uint8 ``(B, 3, H, W)`` -> ``(B, D)`` (``eqvae_composer.evaluation.fid.load_inception()``).
        swd_images: Images per set for SWD (it holds them in memory). Default: 2048.
        swd_seed: Seed of SWD's patches and directions. Default: 0.

    Returns:
        ``{'gfid', 'swd_avg', 'swd_<resolution>'..., 'num_samples', 'num_references'}``.

    Raises:
        ValueError: Fewer than two images on either side, or different image sizes.
    """
    fid = FrechetInceptionDistance(feature=feature_extractor, normalize=False)
    kept: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    counts = {True: 0, False: 0}
    for real, batches in ((False, samples), (True, references)):
        for images in batches:
            images = to_uint8(images.float())
            fid.update(images.to(fid.device), real=real)
            counts[real] += len(images)
            held = sum(len(x) for x in kept[real])
            if held < swd_images:
                kept[real].append(images[: swd_images - held].cpu())
    if min(counts.values()) < 2:
        raise ValueError(
            f'gFID needs at least two images on each side, got {counts[False]} samples, {counts[True]} references.'
        )
    fake, real = torch.cat(kept[False]), torch.cat(kept[True])
    if fake.shape[1:] != real.shape[1:]:
        raise ValueError(f'samples are {tuple(fake.shape[1:])}, references {tuple(real.shape[1:])}: use the same size.')
    n = min(len(fake), len(real))
    results = {'gfid': float(fid.compute()), 'num_samples': counts[False], 'num_references': counts[True]}
    results.update(swd(fake[:n].float(), real[:n].float(), seed=swd_seed))
    return results
