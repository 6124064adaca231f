"""Classifier-free guidance: label dropout for training, the guided prediction for sampling.

The null class is one extra label, ``num_classes`` (DiT's ``LabelEmbedder`` table has
``num_classes + 1`` rows). A label is dropped with probability ``p`` once per sample.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ['drop_labels', 'guided', 'label_drop_mask']

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def label_drop_mask(batch_size: int, p: float, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """A boolean ``(B,)`` mask, each entry True with probability ``p`` (DiT's ``token_drop`` draw)."""
    if not 0 <= p <= 1:
        raise ValueError(f'the label dropout probability must be in [0, 1], got {p}.')
    return torch.rand(batch_size, generator=generator, device=device) < p


def drop_labels(labels: torch.Tensor, mask: torch.Tensor, null_label: int) -> torch.Tensor:
    """``labels`` with the masked entries replaced by ``null_label``."""
    return torch.where(mask.to(labels.device), torch.full_like(labels, null_label), labels)


def guided(model: ModelFn, scale: float, null_label: int, guided_channels: int | None = None) -> ModelFn:
    """``model`` with classifier-free guidance: ``uncond + scale * (cond - uncond)``, one batched call.

    ``scale`` 1 is the conditional model alone (no extra call). DiT's ``forward_with_cfg`` guides the
    first three channels (written for RGB, it leaves one of SD-VAE's four latent channels unguided);
    here ``guided_channels`` says how many: all of a velocity, the epsilon half of a learned-variance
    output (whose variance values come from the conditional prediction).

    Args:
        model: ``model(x, t, labels) -> prediction``.
        scale: The guidance scale.
        null_label: The label that means "no class".
        guided_channels: Guide the first this many output channels. Default: all.
    """
    if scale == 1:
        return model

    def guided_model(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        null = torch.full_like(labels, null_label)
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        cond, uncond = both.chunk(2)
        n = cond.shape[1] if guided_channels is None else guided_channels
        mixed = uncond[:, :n] + scale * (cond[:, :n] - uncond[:, :n])
        return torch.cat([mixed, cond[:, n:]], dim=1)

    return guided_model
