"""``ComposerVQModel``: a diffusers ``VQModel`` (VQGAN) with taming's objective, as a ComposerModel.

``EquivarianceAlgorithm()`` works on it unchanged: the ``VQModel`` adapter (``eqvae_composer.introspection``)
puts the latent hook on the quantizer, so tau transforms the encoder's continuous latent z_e and the
decoder reconstructs tau(x) from the codes of tau(z_e) (the method card says why).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import VQModel
from torch import nn
from torchmetrics import Metric

from eqvae_composer.evaluation.codebook import CodebookPerplexity, CodebookUsage, DeadCodeFraction
from eqvae_composer.introspection import adapter_for, adapter_of_kind
from eqvae_composer.models.gan_model import GANAutoencoderModel, recorded_calls
from eqvae_composer.models.vq_loss import VQGANLoss

__all__ = ['VQ_EVAL_METRICS', 'ComposerVQModel', 'VQModelForward']

#: Metric name -> what it measures on the eval set.
VQ_EVAL_METRICS = {
    'PSNR': 'PSNR of D(q(E(x))) against x (uint8-quantized)',
    'SSIM': 'SSIM of D(q(E(x))) against x (uint8-quantized)',
    'LPIPS': 'LPIPS-VGG of D(q(E(x))) against x (needs the VGG weights)',
    'EquivarianceErrorR': 'equivariance error of the pre-quantization latent z_e over rotations 90/180/270',
    'EquivarianceErrorS': 'equivariance error of the pre-quantization latent z_e over scales 0.25/0.5/0.75',
    'CodebookPerplexity': 'perplexity of the code frequencies over the eval set',
    'DeadCodeFraction': 'share of the codebook no eval image used',
}


class VQModelForward(nn.Module):
    """Runs ``VQModel`` encode -> quantize -> decode inside one ``forward`` (FSDP gathers around it).

    Records, for the loss and the metrics, the codes the quantizer picked and the input of the
    decoder's last convolution (the adaptive GAN weight), with hooks that live only for the decode.
    """

    def __init__(self, vae: VQModel) -> None:
        super().__init__()
        self.vae = vae

    def forward(
        self,
        images: torch.Tensor | None = None,
        sample_posterior: bool = True,
        decode: bool = True,
        latents: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Encode ``images`` to z_e; with ``decode``, also quantize and reconstruct.

        Args:
            images (Tensor, optional): images in [-1, 1] to encode.
            sample_posterior (bool): ignored: the latent is deterministic. Accepted so that code written
                for ``AutoencoderKLForward`` (the image-grid callback) calls either the same way.
            decode (bool): also quantize and decode.
            latents (Tensor, optional): instead of ``images``, a pre-quantization latent to decode.

        Returns:
            dict: ``latents`` (z_e) when encoding, and with ``decode``: ``reconstruction``,
            ``codebook_loss`` (the quantizer's codebook + commitment loss), ``codes`` (the code
            indices, ``(B, cells)``) and ``last_layer_input``.
        """
        outputs: dict[str, Any] = {}
        if latents is None:
            if images is None:
                raise ValueError('VQModelForward needs images or latents.')
            latents = adapter_for(self.vae).encode(self.vae, images)
            outputs['latents'] = latents
        if decode:
            with recorded_calls(self.vae.quantize) as quantized, recorded_calls(self.vae.decoder.conv_out) as last:
                decoded = self.vae.decode(latents)
            _, _, (_, _, codes) = quantized[0][1]
            outputs.update(
                reconstruction=decoded.sample,
                codebook_loss=decoded.commit_loss,
                codes=codes.reshape(len(latents), -1),
                last_layer_input=last[0][0][0],
            )
        return outputs


class ComposerVQModel(GANAutoencoderModel):
    """A diffusers ``VQModel`` trained with taming's VQGAN objective, one forward and one backward.

    Add ``EquivarianceAlgorithm()`` to the Trainer for EQ-VAE on a VQGAN; use ``param_groups()`` for
    the single optimizer (autoencoder and codebook, discriminator).

    Args:
        vae (VQModel): the autoencoder.
        loss (VQGANLoss, optional): the objective. Default: ``VQGANLoss(lpips_weight=0)``.
        image_key (str): batch key of the images, in [-1, 1]. Default: ``'image'``.
        eval_metrics (Sequence[str]): names from ``VQ_EVAL_METRICS``. Default: all but ``LPIPS``.
        lpips_metric (nn.Module, optional): LPIPS network for the ``LPIPS`` metric; defaults to the loss's.
    """

    EVAL_METRICS = VQ_EVAL_METRICS

    def __init__(
        self,
        vae: VQModel,
        loss: VQGANLoss | None = None,
        image_key: str = 'image',
        eval_metrics: Sequence[str] = (
            'PSNR',
            'SSIM',
            'EquivarianceErrorR',
            'EquivarianceErrorS',
            'CodebookPerplexity',
            'DeadCodeFraction',
        ),
        lpips_metric: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if adapter_for(vae) is not adapter_of_kind('vq'):
            raise TypeError(f'ComposerVQModel needs a diffusers VQModel, got {type(vae).__name__}.')
        self.autoencoder = VQModelForward(vae)
        self.loss_fn = loss if loss is not None else VQGANLoss(lpips_weight=0.0)
        self.image_key = image_key
        self.eval_sample_posterior = False  # ignored by VQModelForward: the latent is deterministic
        self._set_eval_metrics(eval_metrics, lpips_metric)
        self.downsample_factor = adapter_for(vae).downsample_factor(vae)

    @property
    def vae(self) -> VQModel:
        return self.autoencoder.vae

    def forward(self, batch: Any) -> dict[str, Any]:
        with self._forward_grad():
            return self.autoencoder(batch[self.image_key])

    def loss(self, outputs: dict[str, Any], batch: Any) -> dict[str, torch.Tensor]:
        return self._gan_loss(
            batch[self.image_key], outputs['reconstruction'], outputs['codebook_loss'], outputs.get('last_layer_input')
        )

    def _equivariance_latent(self, outputs: dict[str, Any]) -> torch.Tensor:
        return outputs['latents']  # z_e, before quantization

    def _metric_factories(self) -> dict[str, Callable[[], Metric]]:
        num_codes = self.vae.config.num_vq_embeddings
        return {
            **super()._metric_factories(),
            'CodebookPerplexity': lambda: CodebookPerplexity(num_codes),
            'DeadCodeFraction': lambda: DeadCodeFraction(num_codes),
        }

    def _update_metric(self, metric: Metric, target: torch.Tensor, outputs: Any, keep: slice | torch.Tensor) -> None:
        if isinstance(metric, CodebookUsage):
            metric.update(outputs['codes'][keep])
        else:
            super()._update_metric(metric, target, outputs, keep)
