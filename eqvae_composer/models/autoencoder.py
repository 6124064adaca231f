"""``ComposerAutoencoderKL``: a diffusers ``AutoencoderKL`` with the reference loss, as a ComposerModel."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import nn

from eqvae_composer.introspection import vae_downsample_factor
from eqvae_composer.models.gan_model import GANAutoencoderModel, recorded_calls
from eqvae_composer.models.loss import VAEGANLoss

__all__ = ['AutoencoderKLForward', 'ComposerAutoencoderKL', 'EVAL_METRICS']

#: Metric name -> what it measures on the eval set.
EVAL_METRICS = {
    'PSNR': 'PSNR of D(z), z ~ q(z|x), against x (uint8-quantized)',
    'SSIM': 'SSIM of D(z) against x (uint8-quantized)',
    'LPIPS': 'LPIPS-VGG of D(z) against x (needs the VGG weights)',
    'EquivarianceErrorR': 'latent equivariance error over rotations 90/180/270',
    'EquivarianceErrorS': 'latent equivariance error over scales 0.25/0.5/0.75',
}


class AutoencoderKLForward(nn.Module):
    """Runs ``AutoencoderKL`` encode -> sample -> decode inside one ``forward``.

    FSDP gathers a unit's parameters around its ``forward`` only, so all VAE compute goes through
    here rather than through ``vae.encode()`` / ``vae.decode()`` called from outside. It also
    records the input of the decoder's last convolution, which the adaptive GAN weight needs: a hook
    that lives only for the duration of its own decode, so direct ``vae.decode()`` calls keep nothing
    and wrapping the same VAE twice leaves no hook behind.
    """

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(
        self,
        images: torch.Tensor | None = None,
        sample_posterior: bool = True,
        decode: bool = True,
        latents: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Encode ``images``; with ``decode``, also reconstruct from a posterior sample (or the mode).

        Args:
            images (Tensor, optional): images in [-1, 1] to encode.
            sample_posterior (bool): decode a posterior sample; ``False`` decodes the mode.
            decode (bool): also decode.
            latents (Tensor, optional): instead of ``images``, a latent to decode (e.g. tau(z) for
                a visualisation); decoding it here keeps FSDP's parameter gathering in force.

        Returns:
            dict: ``posterior`` (DiagonalGaussianDistribution) and ``latents`` (the decoded z) when
            encoding, and with ``decode``: ``reconstruction`` and ``last_layer_input``.
        """
        outputs: dict[str, Any] = {}
        if latents is None:
            if images is None:
                raise ValueError('AutoencoderKLForward needs images or latents.')
            posterior = self.vae.encode(images).latent_dist
            latents = posterior.sample() if sample_posterior else posterior.mode()
            outputs = {'posterior': posterior, 'latents': latents}
        if decode:
            with recorded_calls(self.vae.decoder.conv_out) as calls:
                outputs['reconstruction'] = self.vae.decode(latents).sample
            inputs = [args[0] for args, _ in calls]
            outputs['last_layer_input'] = torch.cat(inputs) if len(inputs) > 1 else inputs[0]
        return outputs


class ComposerAutoencoderKL(GANAutoencoderModel):
    """A diffusers ``AutoencoderKL`` trained with L1 + LPIPS + KL + PatchGAN, one forward and one backward.

    Add ``EquivarianceAlgorithm()`` to the Trainer for EQ-VAE; without it this is the ordinary VAE
    objective. Use ``param_groups()`` to build the single optimizer with separate autoencoder and
    discriminator settings.

    Args:
        vae (AutoencoderKL): the autoencoder (see ``eqvae_composer.checkpoints.load_autoencoder``).
        loss (VAEGANLoss, optional): the objective. Default: ``VAEGANLoss(lpips_weight=0)``.
        image_key (str): batch key of the images, in [-1, 1]. Default: ``'image'``.
        sample_posterior (bool): train on a posterior sample z ~ q(z|x), as the reference;
            ``False`` decodes the mean (deterministic, for ablations and exact-equality tests).
            Default: ``True``.
        eval_sample_posterior (bool): reconstruct from a posterior sample at evaluation (the
            paper's protocol); ``False`` uses the mode. Default: ``True``.
        eval_metrics (Sequence[str]): names from ``EVAL_METRICS``. Default: PSNR, SSIM and both
            equivariance errors.
        lpips_metric (Callable, optional): LPIPS network for the ``LPIPS`` metric; defaults to
            the loss's when it has one.
        gradient_checkpointing (bool): recompute the encoder's and decoder's blocks during the
            backward instead of keeping their activations (diffusers' checkpointing): less memory for
            a larger batch or resolution, at the cost of about one more VAE forward. The adaptive GAN
            weight stays exact: the decoder's last convolution is outside the checkpointed blocks.
            Default: ``False``.
    """

    EVAL_METRICS = EVAL_METRICS

    def __init__(
        self,
        vae: AutoencoderKL,
        loss: VAEGANLoss | None = None,
        image_key: str = 'image',
        sample_posterior: bool = True,
        eval_sample_posterior: bool = True,
        eval_metrics: Sequence[str] = ('PSNR', 'SSIM', 'EquivarianceErrorR', 'EquivarianceErrorS'),
        lpips_metric: nn.Module | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if gradient_checkpointing:
            vae.enable_gradient_checkpointing()
        self.autoencoder = AutoencoderKLForward(vae)
        self.loss_fn = loss if loss is not None else VAEGANLoss(lpips_weight=0.0)
        self.image_key = image_key
        self.sample_posterior = sample_posterior
        self.eval_sample_posterior = eval_sample_posterior
        self._set_eval_metrics(eval_metrics, lpips_metric)
        self.downsample_factor = vae_downsample_factor(vae)

    @property
    def vae(self) -> AutoencoderKL:
        return self.autoencoder.vae

    def forward(self, batch: Any) -> dict[str, Any]:
        with self._forward_grad():
            return self.autoencoder(batch[self.image_key], sample_posterior=self.sample_posterior)

    def loss(self, outputs: dict[str, Any], batch: Any) -> dict[str, torch.Tensor]:
        return self._gan_loss(
            batch[self.image_key], outputs['reconstruction'], outputs['posterior'], outputs.get('last_layer_input')
        )

    def _equivariance_latent(self, outputs: dict[str, Any]) -> torch.Tensor:
        return outputs['posterior'].mode()
