"""mosaicml/diffusion's diffusers autoencoder training, reproduced for the integration tests.

Copied in behaviour from ``diffusion/models/autoencoder.py`` (``ComposerDiffusersAutoEncoder``,
``AutoEncoderLoss``, ``NlayerDiscriminator``), ``diffusion/models/layers.py``
(``GradientScalingLayer``) and ``diffusion/algorithms/discriminator_schedule.py``
(``DiscriminatorSchedule``) at mosaicml/diffusion 49282fd, so that "works with mosaicml/diffusion"
is tested against their forward, loss, train metric, ``update_metric``, ``eval_forward`` and
algorithm rather than a stand-in. The package itself is not installable here (it pins other
Composer and torch versions). Two deliberate differences, both offline necessities:
- LPIPS is built with ``pnet_rand=True`` (no torchvision VGG download); the code path is theirs.
- The torchmetrics LPIPS eval metric (which downloads its weights) is left out of ``val_metrics``.
"""

from __future__ import annotations

import lpips
import torch
import torch.nn as nn
import torch.nn.functional as F
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger
from composer.models import ComposerModel
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from torchmetrics import MeanMetric, MeanSquaredError, Metric
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

__all__ = ['AutoEncoderLoss', 'ComposerDiffusersAutoEncoder', 'DiscriminatorSchedule', 'optimizer_for']


class GradientScalingLayer(nn.Module):
    """Identity forward; scales the gradient by ``scale`` (set by the adaptive weight)."""

    def __init__(self):
        super().__init__()
        self.scale: float = 1.0

    def set_scale(self, scale: float):
        self.scale = scale

    def forward(self, x):
        return x

    def backward_hook(self, module, grad_input, grad_output):
        return (self.scale * grad_input[0],)


class NlayerDiscriminator(nn.Module):
    """Their PatchGAN: needs inputs of at least 24 px with 3 layers (8x down, then two 4x4 stride-1 convs)."""

    def __init__(self, input_channels: int = 3, num_filters: int = 64, num_layers: int = 3):
        super().__init__()
        self.blocks = nn.ModuleList()
        self.blocks.append(nn.Conv2d(input_channels, num_filters, kernel_size=4, stride=2, padding=1))
        out_filters = num_filters
        for n in range(1, num_layers):
            in_filters = num_filters * 2 ** (n - 1)
            out_filters = num_filters * min(2**n, 8)
            conv = nn.Conv2d(in_filters, out_filters, kernel_size=4, stride=2, padding=1, bias=False)
            self.blocks.extend([conv, nn.BatchNorm2d(out_filters), nn.LeakyReLU(0.2, True)])
        final_out_filters = num_filters * min(2**num_layers, 8)
        conv = nn.Conv2d(out_filters, final_out_filters, kernel_size=4, stride=1, padding=1, bias=False)
        self.blocks.extend([conv, nn.BatchNorm2d(final_out_filters), nn.LeakyReLU(0.2, True)])
        output_conv = nn.Conv2d(final_out_filters, 1, kernel_size=4, stride=1, padding=1, bias=False)
        nn.init.zeros_(output_conv.weight)
        self.blocks.append(output_conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class AutoEncoderLoss(nn.Module):
    """Their loss: L1 + LPIPS nll with learned log variance, KL, BCE PatchGAN with an adaptive weight."""

    def __init__(
        self,
        input_key='image',
        ae_output_channels=3,
        learn_log_var=True,
        log_var_init=0.0,
        kl_divergence_weight=1.0,
        lpips_weight=0.25,
        discriminator_weight=0.5,
        discriminator_num_filters=64,
        discriminator_num_layers=3,
    ):
        super().__init__()
        self.input_key = input_key
        self.kl_divergence_weight = kl_divergence_weight
        self.lpips_weight = lpips_weight
        self.discriminator_weight = discriminator_weight
        if learn_log_var:
            self.log_var = nn.Parameter(torch.zeros(size=()))
        else:
            self.log_var = torch.zeros(size=())
        self.log_var.data.fill_(log_var_init)
        self.lpips = lpips.LPIPS(net='vgg', pnet_rand=True, verbose=False).eval()
        for param in self.lpips.parameters():
            param.requires_grad_(False)
        self.discriminator = NlayerDiscriminator(
            ae_output_channels, discriminator_num_filters, discriminator_num_layers
        )
        self.scale_gradients = GradientScalingLayer()
        self.scale_gradients.register_full_backward_hook(self.scale_gradients.backward_hook)

    def set_discriminator_weight(self, weight: float):
        self.discriminator_weight = weight

    def calc_discriminator_adaptive_weight(self, nll_loss, fake_loss, last_layer):
        self.scale_gradients.set_scale(1.0)
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        disc_grads = torch.autograd.grad(fake_loss, last_layer, retain_graph=True)[0]
        nll_grads_norm = torch.norm(nll_grads)
        disc_grads_norm = torch.norm(disc_grads)
        disc_weight = nll_grads_norm / (disc_grads_norm + 1e-4)
        disc_weight = torch.clamp(disc_weight, 0.0, 1e4).detach()
        disc_weight *= self.discriminator_weight
        self.scale_gradients.set_scale(-disc_weight.item())
        return disc_weight, nll_grads_norm, disc_grads_norm

    def forward(self, outputs, batch, last_layer):
        losses = {}
        ae_loss = F.l1_loss(outputs['x_recon'], batch[self.input_key], reduction='none')
        num_output_elements = ae_loss[0].numel()
        losses['ae_loss'] = ae_loss.mean()
        recon_img = outputs['x_recon'].clamp(-1, 1)
        target_img = batch[self.input_key].clamp(-1, 1)
        lpips_loss = self.lpips(recon_img, target_img)
        losses['lpips_loss'] = lpips_loss.mean()
        rec_loss = ae_loss + self.lpips_weight * lpips_loss
        nll_loss = rec_loss / torch.exp(self.log_var) + self.log_var + 2
        nll_loss = nll_loss.mean()
        losses['nll_loss'] = nll_loss
        losses['output_variance'] = torch.exp(self.log_var)
        real = self.discriminator(batch[self.input_key])
        fake = self.discriminator(self.scale_gradients(outputs['x_recon']))
        real_loss = F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
        fake_loss = F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake))
        losses['disc_real_loss'] = real_loss
        losses['disc_fake_loss'] = fake_loss
        losses['disc_loss'] = 0.5 * (real_loss + fake_loss)
        disc_weight, nll_grads_norm, disc_grads_norm = self.calc_discriminator_adaptive_weight(
            nll_loss, fake_loss, last_layer
        )
        losses['disc_weight'] = disc_weight
        losses['nll_grads_norm'] = nll_grads_norm
        losses['disc_grads_norm'] = disc_grads_norm
        mean, log_var = outputs['mean'], outputs['log_var']
        kl_div_loss = -0.5 * (1 + log_var - mean.pow(2) - log_var.exp())
        num_latent_elements = mean[0].numel()
        losses['kl_div_loss'] = kl_div_loss.mean()
        dimensionality_weight = num_latent_elements / num_output_elements
        total_loss = losses['nll_loss'] + self.kl_divergence_weight * dimensionality_weight * losses['kl_div_loss']
        total_loss += losses['disc_loss']
        losses['total'] = total_loss
        return losses


class ComposerDiffusersAutoEncoder(ComposerModel):
    """Their Composer wrapper of a diffusers ``AutoencoderKL``, with an MSE train metric."""

    def __init__(self, model: AutoencoderKL, autoencoder_loss: AutoEncoderLoss, input_key: str = 'image'):
        super().__init__()
        self.model = model
        self.autoencoder_loss = autoencoder_loss
        self.input_key = input_key
        train_metrics = [MeanSquaredError()]
        self.train_metrics = {metric.__class__.__name__: metric for metric in train_metrics}
        val_metrics = [
            MeanSquaredError(),
            MeanMetric(),
            PeakSignalNoiseRatio(data_range=2.0),
            StructuralSimilarityIndexMeasure(data_range=2.0),
        ]
        self.val_metrics = {metric.__class__.__name__: metric for metric in val_metrics}

    def get_last_layer_weight(self) -> torch.Tensor:
        return self.model.decoder.conv_out.weight

    def forward(self, batch):
        encoder_output = self.model.encode(batch[self.input_key], return_dict=True)
        assert isinstance(encoder_output, AutoencoderKLOutput)
        latent_dist = encoder_output['latent_dist']
        latents = latent_dist.sample()
        mean, log_var = latent_dist.mean, latent_dist.logvar
        output_dist = self.model.decode(latents, return_dict=True)
        assert isinstance(output_dist, DecoderOutput)
        recon = output_dist.sample
        return {'x_recon': recon, 'latents': latents, 'mean': mean, 'log_var': log_var}

    def loss(self, outputs, batch):
        return self.autoencoder_loss(outputs, batch, self.get_last_layer_weight())

    def eval_forward(self, batch, outputs=None):
        if outputs is not None:
            return outputs
        return self.forward(batch)

    def get_metrics(self, is_train: bool = False):
        metrics = self.train_metrics if is_train else self.val_metrics
        metrics_dict = {}
        for name, metric in metrics.items():
            assert isinstance(metric, Metric)
            metrics_dict[name] = metric
        return metrics_dict

    def update_metric(self, batch, outputs, metric):
        clamped_imgs = outputs['x_recon'].clamp(-1, 1)
        if isinstance(metric, MeanMetric):
            metric.update(torch.square(outputs['latents']))
        elif isinstance(metric, (PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure)):
            metric.update(clamped_imgs, batch[self.input_key])
        else:
            metric.update(outputs['x_recon'], batch[self.input_key])


class DiscriminatorSchedule(Algorithm):
    """Their schedule: the discriminator's group gets lr 0 and weight 0 before ``start_iteration``."""

    def __init__(self, start_iteration: str = '0ba') -> None:
        self.start_iteration = Time.from_timestring(start_iteration)
        self.lr = 0.0
        self.weight_decay = 0.0
        self.discriminator_weight = 0.0
        if self.start_iteration.unit != TimeUnit.BATCH:
            raise ValueError('start_iteration must be in units of batches')

    def match(self, event: Event, state: State) -> bool:
        return event in [Event.INIT, Event.BATCH_START, Event.AFTER_LOSS]

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if hasattr(state.model, 'autoencoder_loss') and isinstance(state.model.autoencoder_loss, nn.Module):
            autoencoder_loss = state.model.autoencoder_loss
        elif isinstance(state.model.module, nn.Module) and hasattr(state.model.module, 'autoencoder_loss'):
            autoencoder_loss = state.model.module.autoencoder_loss
        else:
            raise ValueError('Model does not have a discriminator weight')
        if event == Event.INIT:
            self.discriminator_weight = autoencoder_loss.discriminator_weight
            self.lr = state.optimizers[0].param_groups[1]['lr']
            self.weight_decay = state.optimizers[0].param_groups[1]['weight_decay']
        elif event == Event.BATCH_START:
            if state.timestamp.get(TimeUnit.BATCH).value >= self.start_iteration.value:
                state.optimizers[0].param_groups[1]['lr'] = self.lr
                state.optimizers[0].param_groups[1]['weight_decay'] = self.weight_decay
                autoencoder_loss.set_discriminator_weight(self.discriminator_weight)
            else:
                state.optimizers[0].param_groups[1]['lr'] = 0.0
                state.optimizers[0].param_groups[1]['weight_decay'] = 0.0
                autoencoder_loss.set_discriminator_weight(0.0)


def optimizer_for(model: ComposerDiffusersAutoEncoder, lr: float = 1e-4) -> torch.optim.Optimizer:
    """Their two parameter groups: the autoencoder (and log variance), then the discriminator."""
    disc = list(model.autoencoder_loss.discriminator.parameters())
    disc_ids = {id(p) for p in disc}
    ae = [p for p in model.parameters() if p.requires_grad and id(p) not in disc_ids]
    return torch.optim.AdamW(
        [{'params': ae, 'lr': lr, 'weight_decay': 0.01}, {'params': disc, 'lr': lr, 'weight_decay': 0.01}]
    )
