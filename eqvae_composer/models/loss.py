"""The reference autoencoder objective (LDM's ``LPIPSWithDiscriminator``) in one forward and one backward.

The reference trains the autoencoder and the discriminator with two optimizers, so Lightning runs
the model twice per batch. Here both losses come out of one call and one ``backward()``:

* the discriminator runs once on the reconstruction, detached from the autoencoder's graph: the
  hinge loss on those logits sends gradients to the discriminator only, and the generator term
  ``g = -mean(D(x_hat))`` reaches the autoencoder only through its gradient with respect to the
  image (below), never through the discriminator's parameters;
* the adaptive weight needs the gradients of ``nll`` and ``g`` with respect to the decoder's last
  convolution. Both are computed from the gradients with respect to the reconstruction (one
  backward through LPIPS and one through the discriminator) and the last layer's input; the same
  reconstruction gradients then drive the autoencoder's backward, so LPIPS and the discriminator
  are not differentiated a second time. The last layer's weight is never read, which keeps the
  norm exact under FSDP, where the weight is sharded but activations are not.

For the reference's alternating updates (``AlternatingGANUpdates``) the loss also computes one side
at a time: ``phase='autoencoder'`` the autoencoder's loss only, ``phase='discriminator'`` the hinge
loss only, on a reconstruction made without gradients.

Beyond the paper, the per-pixel reconstruction term can mix L1, L2 (squared error) and SSIM
(``1 - SSIM`` per image, broadcast per pixel like LPIPS) with a weight each, as MS-LC-EQ-D-VR's SDXL
run does (L1 0.3, L2 0.5, SSIM 0.5, LPIPS 0.5). The defaults (L1 1, L2 0, SSIM 0) compute exactly
the reference's ``rec``, and every term passes through ``nll``, so the adaptive weight sees all of them.

The value of ``'total'`` is the autoencoder's loss (the reference's ``train/total_loss``): the hinge
loss adds its gradient for the discriminator but nothing to the value, and is logged as ``'disc'``.

``ReconstructionGANLoss`` holds all of that; a subclass says how the per-pixel reconstruction term is
reduced and what the latent term is: ``VAEGANLoss`` (LDM, KL) here, ``VQGANLoss`` (taming, codebook)
in ``vq_loss.py``.
"""

from __future__ import annotations

import contextlib
import functools
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure

from eqvae_composer.compat import DiagonalGaussianDistribution
from eqvae_composer.models.discriminator import PatchGANDiscriminator
from eqvae_composer.models.lpips import dropout_active, lpips_distance

__all__ = [
    'GAN_KEYS',
    'GAN_PHASES',
    'LOSS_KEYS',
    'RECONSTRUCTION_KEYS',
    'ReconstructionGANLoss',
    'VAEGANLoss',
    'hinge_discriminator_loss',
    'ssim_distance',
]

#: The keys of the reconstruction terms and of the GAN terms, in every ``ReconstructionGANLoss``.
RECONSTRUCTION_KEYS = ('total', 'nll', 'rec', 'l1', 'l2', 'ssim', 'lpips')
GAN_KEYS = ('g', 'disc', 'disc_weight', 'disc_factor', 'logits_real', 'logits_fake')

#: Every key ``VAEGANLoss`` returns, on every step: Composer all-reduces the dict across ranks.
LOSS_KEYS = (*RECONSTRUCTION_KEYS, 'kl', *GAN_KEYS, 'logvar')

#: The passes of the reference's alternating updates, in order; ``None`` (the default) is one joint pass.
GAN_PHASES = ('autoencoder', 'discriminator')


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """``0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat))))``."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def ssim_distance(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """``1 - SSIM(x, x_hat)`` per image, shape ``(B, 1, 1, 1)``, for images in [-1, 1]; differentiable.

    torchmetrics' SSIM (Gaussian window 11, sigma 1.5, k1 0.01, k2 0.03, reflection-padded borders), with
    the data range fixed at 2 rather than measured or clamped: a measured range would move with the batch,
    and clamping would cut the gradient of reconstructions that overshoot [-1, 1].
    """
    similarity = structural_similarity_index_measure(x_hat, x, data_range=2.0, reduction='none')
    return (1.0 - similarity).view(-1, 1, 1, 1)


def _kl(posterior: DiagonalGaussianDistribution) -> torch.Tensor:
    """Per-sample KL to N(0, I), like ``posterior.kl()`` but in fp32 whatever the encoder's dtype."""
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class ReconstructionGANLoss(nn.Module):
    """L1 + LPIPS + a latent term + PatchGAN (hinge) with the adaptive weight, in one forward and one backward.

    The machinery shared by the KL and VQ objectives (see the module docstring): the discriminator,
    its hinge loss, the generator term, the adaptive weight on the decoder's last layer and the
    surrogate that trains the autoencoder without differentiating LPIPS and the discriminator twice.
    A subclass defines ``loss_keys``, ``_nll`` (how the per-pixel ``rec`` term is reduced; its
    gradient with respect to the image drives the adaptive weight) and ``_latent_loss`` (the weighted
    term that reaches the encoder without passing through the reconstruction: KL, codebook).

    It is an ``nn.Module`` because it owns the discriminator: under FSDP it is wrapped as a unit, and
    everything that touches its parameters runs in ``forward``.

    Args:
        lpips (Callable, optional): ``lpips(x, x_hat) -> (B, 1, 1, 1)`` on [-1, 1] images, e.g. from
            ``load_lpips()``. Kept out of the module's parameters and checkpoints: it is frozen.
            Required when ``lpips_weight > 0``.
        lpips_weight (float): weight of the perceptual term. Default: ``1.0``.
        disc_weight (float): scale of the adaptive weight; ``0`` removes the discriminator (unless
            ``always_train_discriminator``). Default: ``0.5``.
        disc_factor (float): multiplies both GAN terms once active. Default: ``1.0``.
        disc_start (int): training step from which the GAN terms count. Default: ``0``.
        disc_in_channels (int), disc_num_filters (int), disc_num_layers (int): the PatchGAN's shape.
            Defaults: ``3``, ``64``, ``3``.
        adaptive_weight_max (float): upper clamp of the adaptive weight. Default: ``1e4``.
        lpips_dropout (bool): train with LPIPS's dropout active (p = 0.5 before each linear layer), as
            the reference does: Lightning's ``model.train()`` reaches the LPIPS module it built in eval
            mode. Needs an LPIPS ``nn.Module`` with ``Dropout`` layers (``load_lpips`` builds one);
            evaluation and the LPIPS metric stay deterministic. Default: ``False``.
        always_train_discriminator (bool): with ``disc_weight = 0``, still build the discriminator and
            train it with its hinge loss, as the reference does (its discriminator optimizer steps
            whatever the weight); the autoencoder gets no GAN gradient either way. Default: ``False``.
        l1_weight (float): weight of ``|x - x_hat|`` in ``rec``. Default: ``1.0`` (the reference).
        l2_weight (float): weight of ``(x - x_hat)^2`` in ``rec`` (beyond the paper). Default: ``0.0``.
        ssim_weight (float): weight of ``1 - SSIM(x, x_hat)`` per image in ``rec`` (``ssim_distance``;
            beyond the paper). Default: ``0.0``.
    """

    #: Every key ``forward`` returns, on every call.
    loss_keys: tuple[str, ...] = ()

    def __init__(
        self,
        lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        lpips_weight: float = 1.0,
        disc_weight: float = 0.5,
        disc_factor: float = 1.0,
        disc_start: int = 0,
        disc_in_channels: int = 3,
        disc_num_filters: int = 64,
        disc_num_layers: int = 3,
        adaptive_weight_max: float = 1e4,
        lpips_dropout: bool = False,
        always_train_discriminator: bool = False,
        l1_weight: float = 1.0,
        l2_weight: float = 0.0,
        ssim_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if lpips_weight < 0 or disc_weight < 0 or disc_factor < 0 or disc_start < 0:
            raise ValueError('loss weights and disc_start must be non-negative.')
        for name, value in (('l1_weight', l1_weight), ('l2_weight', l2_weight), ('ssim_weight', ssim_weight)):
            if value < 0:
                raise ValueError(f'{name} must be non-negative, got {value}.')
        if l1_weight == l2_weight == ssim_weight == lpips_weight == 0:
            raise ValueError('l1_weight, l2_weight, ssim_weight and lpips_weight are all 0: nothing to reconstruct.')
        if lpips_weight > 0 and lpips is None:
            raise ValueError('lpips_weight > 0 needs an LPIPS network (see eqvae_composer.models.load_lpips).')
        if lpips_dropout and (lpips_weight == 0 or not isinstance(lpips, nn.Module)):
            raise ValueError(
                'lpips_dropout needs lpips_weight > 0 and an LPIPS nn.Module with Dropout layers '
                '(see eqvae_composer.models.load_lpips).'
            )
        if lpips_dropout:
            with dropout_active(lpips):  # fails now, naming the fix, if it has no Dropout layer
                pass
        self.lpips_dropout = bool(lpips_dropout)
        self.lpips_weight = float(lpips_weight)
        self.l1_weight = float(l1_weight)
        self.l2_weight = float(l2_weight)
        self.ssim_weight = float(ssim_weight)
        self.disc_weight = float(disc_weight)
        self.disc_factor = float(disc_factor)
        self.disc_start = int(disc_start)
        self.adaptive_weight_max = float(adaptive_weight_max)
        # Bypass nn.Module registration: a frozen network, not state of this model.
        object.__setattr__(self, 'lpips', lpips)
        self.discriminator = (
            PatchGANDiscriminator(disc_in_channels, disc_num_filters, disc_num_layers)
            if disc_weight > 0 or always_train_discriminator
            else None
        )

    def _nll(self, rec: torch.Tensor) -> torch.Tensor:
        """The reconstruction loss from the per-pixel ``rec`` (see ``_reconstruction``)."""
        raise NotImplementedError

    def _latent_loss(self, latent: Any, batch_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted latent term added to the autoencoder's loss, and the terms to log."""
        raise NotImplementedError

    def forward(
        self,
        target: torch.Tensor,
        reconstruction: torch.Tensor,
        latent: Any,
        last_layer: nn.Conv2d,
        last_layer_input: torch.Tensor | None,
        global_step: int = 0,
        phase: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every key of ``loss_keys``; ``'total'`` has the autoencoder loss's value and both losses' gradients.

        Args:
            target (Tensor): the images the reconstruction should match, in [-1, 1].
            reconstruction (Tensor): the decoder's output (``last_layer``'s output).
            latent: what ``_latent_loss`` reads (the posterior, the codebook loss).
            last_layer (Conv2d): the decoder's last convolution (only its hyperparameters are read).
            last_layer_input (Tensor, optional): that convolution's input; needed for the adaptive
                weight while training with the discriminator active.
            global_step (int): the training step, compared with ``disc_start``.
            phase (str, optional): ``None``: both losses in one pass. ``'autoencoder'``: the
                autoencoder's loss only (no gradient reaches the discriminator). ``'discriminator'``:
                the hinge loss only; the autoencoder's terms are logged as 0 and LPIPS is not run.
                Default: ``None``.
        """
        if phase is not None and phase not in GAN_PHASES:
            raise ValueError(f'phase must be None or one of {GAN_PHASES}, got {phase!r}.')
        if phase == 'discriminator' and self.discriminator is None:
            raise ValueError(
                'the discriminator phase needs a discriminator (disc_weight > 0 or always_train_discriminator).'
            )
        with torch.autocast(device_type=target.device.type, enabled=False):
            terms = self._terms(
                target.float(), reconstruction.float(), latent, last_layer, last_layer_input, global_step, phase
            )
        # Only 'total' is differentiated. The other terms are for logging: detached, they do not keep the
        # graphs they came from (LPIPS's, for nll) alive while the trainer holds the loss dict.
        return {name: value if name == 'total' else value.detach() for name, value in terms.items()}

    def _terms(self, x, x_hat, latent, last_layer, last_layer_input, global_step, phase) -> dict[str, torch.Tensor]:
        # Every key on every pass (Composer all-reduces the dict and, over the two alternating passes,
        # sums it): a pass logs 0 for the other pass's terms, as the reference logs them only in theirs.
        terms = dict.fromkeys(self.loss_keys, x.new_zeros(()))
        factor = self.disc_factor if global_step >= self.disc_start else 0.0
        trains_autoencoder = phase != 'discriminator'
        disc, logits_fake, fake = terms['disc'], None, None
        if self.discriminator is not None:
            # One discriminator forward on the reconstruction serves both losses in the joint pass: it
            # runs on a detached leaf, so the hinge loss reaches only D's parameters, and g's gradient
            # with respect to the image is taken from that leaf and routed to the autoencoder through
            # the surrogate below.
            fake = x_hat.detach().requires_grad_(x_hat.requires_grad and trains_autoencoder)
            logits_real = self.discriminator(x.detach()) if phase != 'autoencoder' else None
            logits_fake = self.discriminator(fake)
            if logits_real is not None:
                disc = factor * hinge_discriminator_loss(logits_real, logits_fake)
                terms.update(
                    disc=disc, logits_real=logits_real.detach().mean(), logits_fake=logits_fake.detach().mean()
                )
        # The hinge loss's gradient, adding nothing to the value: 'total' is the autoencoder's loss.
        disc_gradient = disc - disc.detach()
        if not trains_autoencoder:
            terms['total'] = disc_gradient
            return terms

        rec, logged = self._reconstruction(x, x_hat)
        nll = self._nll(rec)
        latent_value, latent_terms = self._latent_loss(latent, x.shape[0])
        value = nll + latent_value
        terms.update(nll=nll, rec=rec.mean(), **logged, **latent_terms)
        if logits_fake is None:
            terms['total'] = value
            return terms

        g = -logits_fake.mean()
        terms.update(g=g.detach(), disc_factor=x.new_tensor(factor))
        trains_generator = (
            self.disc_weight > 0 and self.training and torch.is_grad_enabled() and x_hat.requires_grad and factor > 0
        )
        if not trains_generator:
            terms['total'] = value + disc_gradient
            return terms
        if last_layer_input is None:
            raise ValueError("the adaptive GAN weight needs the input of the decoder's last layer.")

        # The nll graph (through LPIPS) is not needed again: free it now instead of holding it through
        # the discriminator and the backward. D's graph on `fake` is, by `disc`, in the joint pass.
        grad_nll = torch.autograd.grad(nll, x_hat)[0]
        grad_g = torch.autograd.grad(g, fake, retain_graph=disc.requires_grad)[0]
        d_weight = self._adaptive_weight(grad_nll, grad_g, last_layer, last_layer_input)
        terms['disc_weight'] = d_weight
        value = value + d_weight * factor * g
        # Same gradients as `value` for the autoencoder, without a second pass through LPIPS and D;
        # nll of the detached rec carries nll's gradient for anything but the image (a learnable logvar).
        surrogate = (x_hat * (grad_nll + d_weight * factor * grad_g)).sum() + latent_value + self._nll(rec.detach())
        terms['total'] = (value - surrogate).detach() + surrogate + disc_gradient
        return terms

    def _reconstruction(self, x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The per-pixel ``rec``, the weighted sum of the terms whose weight is not 0, and each term's mean.

        With the default weights this is the reference's ``|x - x_hat| + lpips_weight * LPIPS``, operation
        for operation (a weight of 1 is not multiplied in). A term whose weight is 0 is not computed and
        logs 0, so the keys stay the same on every step. The per-image terms (SSIM, LPIPS; ``(B, 1, 1, 1)``)
        count once per pixel, as the reference broadcasts LPIPS.
        """
        zero = x.new_zeros(())
        logged = {'l1': zero, 'l2': zero, 'ssim': zero, 'lpips': zero}
        weighted = []
        difference = x - x_hat
        for name, weight, distance in (
            ('l1', self.l1_weight, difference.abs),
            ('l2', self.l2_weight, difference.square),
            ('ssim', self.ssim_weight, lambda: ssim_distance(x, x_hat)),
            ('lpips', self.lpips_weight, lambda: self._perceptual(x, x_hat)),
        ):
            if weight > 0:
                term = distance()
                logged[name] = term.mean()
                weighted.append(term if weight == 1.0 else weight * term)
        rec = functools.reduce(operator.add, weighted)
        return rec.expand_as(x) if rec.shape != x.shape else rec, logged

    def _perceptual(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        dropout = dropout_active(self.lpips) if self.lpips_dropout and self.training else contextlib.nullcontext()
        with dropout:
            return lpips_distance(self.lpips, x, x_hat)

    def _adaptive_weight(self, grad_nll, grad_g, last_layer: nn.Conv2d, last_layer_input) -> torch.Tensor:
        """``disc_weight * clamp(||dnll/dW|| / (||dg/dW|| + 1e-4), 0, max)`` for W the last layer's weight."""
        h = last_layer_input.detach().float()
        padding = last_layer.padding
        if last_layer.padding_mode != 'zeros':  # as Conv2d does: pad the input itself, then convolve unpadded
            (pad_h, pad_w), padding = padding, 0
            h = F.pad(h, (pad_w, pad_w, pad_h, pad_h), mode=last_layer.padding_mode)
        # The weight's shape from the layer's hyperparameters, not from `last_layer.weight`: outside the
        # wrapped forward, FSDP1 with a sharding strategy leaves that a flat shard or freed storage.
        weight_shape = (last_layer.out_channels, last_layer.in_channels // last_layer.groups, *last_layer.kernel_size)

        def weight_grad(grad_output: torch.Tensor) -> torch.Tensor:
            return torch.nn.grad.conv2d_weight(
                h,
                weight_shape,
                grad_output,
                last_layer.stride,
                padding,
                last_layer.dilation,
                last_layer.groups,
            )

        ratio = weight_grad(grad_nll).norm() / (weight_grad(grad_g).norm() + 1e-4)
        return torch.clamp(ratio, 0.0, self.adaptive_weight_max).detach() * self.disc_weight


class VAEGANLoss(ReconstructionGANLoss):
    """L1 + LPIPS + KL + PatchGAN with adaptive weight, as in the reference (spec section 3).

    nll = sum(rec / exp(logvar) + logvar) / B and the latent term kl_weight * KL; the rest is
    ``ReconstructionGANLoss``'s. It owns ``logvar`` too (a parameter when learnable).

    Args:
        lpips, lpips_weight, disc_weight, disc_factor, disc_start: see ``ReconstructionGANLoss``.
        kl_weight (float): weight of the KL term. Default: ``1e-6``.
        logvar_init (float): initial ``logvar`` of ``nll = rec / exp(logvar) + logvar``. Default: ``0``.
        learn_logvar (bool): make ``logvar`` a trained parameter (the reference keeps it fixed).
            Default: ``False``.
        **kwargs: the other ``ReconstructionGANLoss`` arguments (the PatchGAN's shape,
            ``adaptive_weight_max``, ``lpips_dropout``, ``always_train_discriminator``).
    """

    loss_keys = LOSS_KEYS

    def __init__(
        self,
        lpips: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        lpips_weight: float = 1.0,
        kl_weight: float = 1e-6,
        disc_weight: float = 0.5,
        disc_factor: float = 1.0,
        disc_start: int = 0,
        logvar_init: float = 0.0,
        learn_logvar: bool = False,
        **kwargs: Any,
    ) -> None:
        if kl_weight < 0:
            raise ValueError('loss weights and disc_start must be non-negative.')
        super().__init__(lpips, lpips_weight, disc_weight, disc_factor, disc_start, **kwargs)
        self.kl_weight = float(kl_weight)
        logvar = torch.full((), float(logvar_init))
        if learn_logvar:
            self.logvar = nn.Parameter(logvar)
        else:
            self.register_buffer('logvar', logvar)

    def forward(
        self,
        target: torch.Tensor,
        reconstruction: torch.Tensor,
        posterior: DiagonalGaussianDistribution,
        last_layer: nn.Conv2d,
        last_layer_input: torch.Tensor | None,
        global_step: int = 0,
        phase: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Every key of ``LOSS_KEYS``: ``ReconstructionGANLoss.forward`` with the posterior, for the KL."""
        return super().forward(target, reconstruction, posterior, last_layer, last_layer_input, global_step, phase)

    def _nll(self, rec: torch.Tensor) -> torch.Tensor:
        logvar = self.logvar.float()
        return (rec / torch.exp(logvar) + logvar).sum() / rec.shape[0]

    def _latent_loss(self, posterior: DiagonalGaussianDistribution, batch_size: int):
        kl = _kl(posterior).sum() / batch_size
        return self.kl_weight * kl, {'kl': kl, 'logvar': self.logvar.float()}
