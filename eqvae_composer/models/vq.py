"""``ComposerVQModel``: a diffusers ``VQModel`` (VQGAN) with taming's objective, as a ComposerModel.

``EquivarianceAlgorithm()`` works on it unchanged: the ``VQModel`` adapter (``eqvae_composer.introspection``)
puts the latent hook on the quantizer, so tau transforms the encoder's continuous latent z_e and the
decoder reconstructs tau(x) from the codes of tau(z_e) (the method card says why).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import VQModel
from torch import nn
from torchmetrics import Metric

from eqvae_composer.evaluation.codebook import CodebookPerplexity, CodebookUsage, DeadCodeFraction
from eqvae_composer.evaluation.metrics import (
    LatentEquivarianceError,
    LPIPSMetric,
    ReconstructionPSNR,
    ReconstructionSSIM,
    equivariance_errors,
    eval_transforms,
)
from eqvae_composer.introspection import adapter_for, adapter_of_kind
from eqvae_composer.models.gan_model import GANAutoencoderModel, counted_samples, recorded_calls
from eqvae_composer.models.lpips import lpips_distance
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
        unknown = sorted(set(eval_metrics) - set(VQ_EVAL_METRICS))
        if unknown:
            raise ValueError(f'unknown eval_metrics {unknown}; choose from {sorted(VQ_EVAL_METRICS)}.')
        self.autoencoder = VQModelForward(vae)
        self.loss_fn = loss if loss is not None else VQGANLoss(lpips_weight=0.0)
        self.image_key = image_key
        self.eval_metric_names = tuple(eval_metrics)
        object.__setattr__(self, '_lpips_metric_net', lpips_metric or self.loss_fn.lpips)
        if 'LPIPS' in self.eval_metric_names and self._lpips_metric_net is None:
            raise ValueError('the LPIPS eval metric needs an LPIPS network (see load_lpips).')
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

    def eval_forward(self, batch: Any, outputs: Any | None = None) -> dict[str, Any]:
        if outputs is not None:
            return outputs
        images = batch[self.image_key]
        outputs = self.autoencoder(images)
        wants = {name for name in self.eval_metric_names if name.startswith('EquivarianceError')}
        if wants:
            # Each encode is its own forward call of the wrapped module, so FSDP gathers for it.
            def encode(x: torch.Tensor) -> torch.Tensor:
                return self.autoencoder(x, decode=False)['latents']

            outputs['equivariance'] = {
                kind: equivariance_errors(encode, images, taus, self.downsample_factor, outputs['latents'])
                for kind, taus in eval_transforms().items()
                if f'EquivarianceError{kind[0].upper()}' in wants
            }
        return outputs

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        # No train metrics, as ComposerAutoencoderKL: the eval set measures the autoencoder.
        if is_train:
            return {}
        num_codes = self.vae.config.num_vq_embeddings
        factories = {
            'PSNR': ReconstructionPSNR,
            'SSIM': ReconstructionSSIM,
            'LPIPS': LPIPSMetric,
            'EquivarianceErrorR': lambda: LatentEquivarianceError('rotation'),
            'EquivarianceErrorS': lambda: LatentEquivarianceError('scale'),
            'CodebookPerplexity': lambda: CodebookPerplexity(num_codes),
            'DeadCodeFraction': lambda: DeadCodeFraction(num_codes),
        }
        return {name: factories[name]() for name in self.eval_metric_names}

    def update_metric(self, batch: Any, outputs: Any, metric: Metric) -> None:
        keep = counted_samples(batch)
        if keep is None:
            return
        target, reconstruction = batch[self.image_key][keep], outputs['reconstruction'][keep]
        if isinstance(metric, LatentEquivarianceError):
            metric.update(outputs['equivariance'][metric.kind][:, keep])
        elif isinstance(metric, CodebookUsage):
            metric.update(outputs['codes'][keep])
        elif isinstance(metric, LPIPSMetric):
            with torch.no_grad():
                metric.update(lpips_distance(self._lpips_metric_net, target, reconstruction))
        else:
            metric.update(reconstruction, target)
