"""Pictures of an autoencoder: latents as RGB through their first three principal components, image grids.

The PCA view follows the reference's latent visualiser: each image's latent cells are points in
C dimensions; projecting them onto their first three principal components and stretching each to
[0, 1] shows which regions the latent groups together (and, for EQ-VAE, how smooth it is).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ['image_rows', 'latent_pca_rgb', 'to_display', 'upsample_nearest']


def latent_pca_rgb(latents: torch.Tensor) -> torch.Tensor:
    """Per image, the first three principal components of the latent cells as RGB in [0, 1].

    Component signs are fixed (largest-magnitude loading positive) so the colours of one image do
    not flip between training steps. Latents with fewer than 3 channels leave the rest black.

    Args:
        latents (Tensor): ``(B, C, h, w)``.

    Returns:
        Tensor: ``(B, 3, h, w)`` in [0, 1].
    """
    batch, channels, height, width = latents.shape
    pictures = []
    for z in latents.detach().float():
        cells = z.flatten(1).T  # (h*w, C)
        cells = cells - cells.mean(0)
        _, _, components = torch.linalg.svd(cells, full_matrices=False)  # rows: principal directions
        components = components[:3]
        signs = components.gather(1, components.abs().argmax(1, keepdim=True)).sign()
        projected = cells @ (components * signs.where(signs != 0, torch.ones_like(signs))).T
        low, high = projected.min(0).values, projected.max(0).values
        projected = (projected - low) / (high - low).clamp_min(1e-8)
        rgb = torch.zeros(height * width, 3)
        rgb[:, : projected.shape[1]] = projected
        pictures.append(rgb.T.reshape(3, height, width))
    return torch.stack(pictures).to(latents.device)


def to_display(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """[-1, 1] images -> [0, 1], placed top-left on a black ``size`` canvas (transformed images are smaller)."""
    images = ((images.detach().float().clamp(-1, 1) + 1) / 2).cpu()
    canvas = torch.zeros(*images.shape[:2], *size)
    h, w = min(images.shape[-2], size[0]), min(images.shape[-1], size[1])
    canvas[..., :h, :w] = images[..., :h, :w]
    return canvas


def image_rows(columns: Sequence[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
    """One row per image, one column per tensor, as a single ``(3, B*H, K*W)`` picture in [0, 1].

    Args:
        columns (Sequence[Tensor]): K tensors ``(B, 3, h_k, w_k)`` in [-1, 1]; smaller ones are
            shown at their true size, not stretched, so scale transforms stay visible.
        size (Sequence[int]): ``(H, W)`` of one cell.
    """
    cells = torch.stack([to_display(column, size) for column in columns], dim=1)  # (B, K, 3, H, W)
    batch, k, channels, height, width = cells.shape
    return cells.permute(2, 0, 3, 1, 4).reshape(channels, batch * height, k * width)


def upsample_nearest(pictures: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Enlarge ``(B, 3, h, w)`` pictures to ``size`` with visible latent cells (nearest neighbour)."""
    return F.interpolate(pictures, size=tuple(size), mode='nearest')
