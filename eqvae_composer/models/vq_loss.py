"""VQGAN's objective (taming-transformers' ``VQLPIPSWithDiscriminator``) in one forward and one backward.

taming-transformers ``taming/modules/losses/vqperceptual.py``: ``nll = mean(|x - x_hat| + w_p * LPIPS)``
(a mean over every pixel, not LDM's sum per sample), ``loss = nll + d * disc_factor * g +
codebook_weight * codebook_loss``, with the same hinge PatchGAN and adaptive weight as the KL objective
(``ReconstructionGANLoss`` computes those). ``codebook_loss`` is what diffusers' ``VectorQuantizer``
returns (``VQModel.decode(...).commit_loss``): ``mean((sg(z_q) - z)^2) + beta * mean((z_q - sg(z))^2)``
with beta = 0.25, taming's ``VectorQuantizer2`` with ``legacy=True``, the formula taming's VQGANs were
trained with (beta on the codebook term).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from eqvae_composer.models.loss import GAN_KEYS, RECONSTRUCTION_KEYS, ReconstructionGANLoss

__all__ = ['VQ_LOSS_KEYS', 'VQGANLoss']

#: Every key ``VQGANLoss`` returns, on every step: Composer all-reduces the dict across ranks.
VQ_LOSS_KEYS = (*RECONSTRUCTION_KEYS, 'codebook', *GAN_KEYS)


class VQGANLoss(ReconstructionGANLoss):
    """L1 + LPIPS + codebook/commitment + PatchGAN (hinge) with the adaptive weight, as taming's VQGAN.

    Args:
        lpips (Callable, optional): LPIPS, as ``ReconstructionGANLoss``'s. Required when ``lpips_weight > 0``.
        lpips_weight (float): weight of the perceptual term (taming's ``perceptual_weight``). Default: ``1.0``.
        codebook_weight (float): weight of the quantizer's codebook + commitment loss. Default: ``1.0``.
        disc_weight (float): scale of the adaptive weight; ``0`` removes the discriminator (unless
            ``always_train_discriminator``). Default: ``1.0`` (taming's; its ImageNet VQGAN uses 0.8).
        **kwargs: the other ``ReconstructionGANLoss`` arguments (``disc_factor``, ``disc_start``, the
            PatchGAN's shape, ``adaptive_weight_max``, ``lpips_dropout``, ``always_train_discriminator``).
    """

    loss_keys = VQ_LOSS_KEYS

    def __init__(
        self,
        lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        lpips_weight: float = 1.0,
        codebook_weight: float = 1.0,
        disc_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if codebook_weight < 0:
            raise ValueError(f'codebook_weight must be non-negative, got {codebook_weight}.')
        super().__init__(lpips, lpips_weight, disc_weight, **kwargs)
        self.codebook_weight = float(codebook_weight)

    def _nll(self, rec: torch.Tensor) -> torch.Tensor:
        return rec.mean()

    def _latent_loss(self, codebook_loss: torch.Tensor, batch_size: int):
        codebook = codebook_loss.float().mean()
        return self.codebook_weight * codebook, {'codebook': codebook}
