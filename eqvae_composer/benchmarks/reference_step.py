"""The reference's training step, written the way LDM ``AutoencoderKL`` + ``LPIPSWithDiscriminator`` run it.

Under PyTorch Lightning 1.4 the reference steps each batch twice, once per optimizer: the
autoencoder's pass (``optimizer_idx`` 0: nll + KL + adaptive-weighted generator loss, the weight
from ``autograd.grad`` with respect to the decoder's last weight) and the discriminator's (1: the
hinge loss on detached images), each with its own full forward. These functions are that math on
this project's ``ComposerAutoencoderKL``, so the benchmark compares like with like
(``tests/test_bench_train.py`` checks they give our losses and gradients).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from eqvae_composer.algorithms.equivariance.transforms import (
    Branch,
    SpatialTransform,
    apply_to_image,
    apply_to_latent,
    downscale_image,
)
from eqvae_composer.models import ComposerAutoencoderKL

__all__ = ['reference_discriminator_loss', 'reference_forward', 'reference_generator_loss', 'toggle_optimizer']


def reference_forward(
    model: ComposerAutoencoderKL,
    images: torch.Tensor,
    branch: Branch,
    tau: SpatialTransform,
    sample_posterior: bool = True,
):
    """LDM ``AutoencoderKL.forward`` with EQ-VAE's transform: encode, sample, tau(z), decode; and tau(x)."""
    vae, factor = model.vae, model.downsample_factor
    if branch == Branch.LOW_RES:
        images = downscale_image(images, tau.scale_h, tau.scale_w, factor)
    posterior = vae.encode(images).latent_dist
    z = posterior.sample() if sample_posterior else posterior.mode()
    target = images
    if branch == Branch.EQUIVARIANCE:
        z = apply_to_latent(z, tau).contiguous()
        target = apply_to_image(images, tau, factor)
    return target, vae.decode(z).sample, posterior


def reference_generator_loss(
    model: ComposerAutoencoderKL, x: torch.Tensor, x_hat: torch.Tensor, posterior
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``LPIPSWithDiscriminator.forward(optimizer_idx=0)``: nll + kl + adaptive-weighted generator loss."""
    loss = model.loss_fn
    rec = (x - x_hat).abs()
    if loss.lpips_weight > 0:
        rec = rec + loss.lpips_weight * loss.lpips(x, x_hat)
    nll = rec / torch.exp(loss.logvar) + loss.logvar
    nll = nll.sum() / nll.shape[0]
    kl = posterior.kl().sum() / x.shape[0]
    g = -loss.discriminator(x_hat).mean()
    last = model.vae.decoder.conv_out.weight
    nll_grads = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g, last, retain_graph=True)[0]
    d_weight = torch.clamp(nll_grads.norm() / (g_grads.norm() + 1e-4), 0.0, 1e4).detach() * loss.disc_weight
    total = nll + loss.kl_weight * kl + d_weight * loss.disc_factor * g
    return total, {'nll': nll, 'kl': kl, 'g': g, 'disc_weight': d_weight}


def reference_discriminator_loss(model: ComposerAutoencoderKL, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """``LPIPSWithDiscriminator.forward(optimizer_idx=1)``: hinge loss on detached images."""
    disc = model.loss_fn.discriminator
    logits_real, logits_fake = disc(x.detach()), disc(x_hat.detach())
    return model.loss_fn.disc_factor * 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def toggle_optimizer(params_on: Sequence[torch.nn.Parameter], params_off: Sequence[torch.nn.Parameter]) -> None:
    """Lightning's ``toggle_optimizer``: only the current optimizer's parameters require grad."""
    for p in params_off:
        p.requires_grad_(False)
    for p in params_on:
        p.requires_grad_(True)
