"""The ComposerModels around diffusers autoencoders (AutoencoderKL, VQModel), their losses and discriminator."""

from eqvae_composer.models.autoencoder import EVAL_METRICS, AutoencoderKLForward, ComposerAutoencoderKL
from eqvae_composer.models.discriminator import PatchGANDiscriminator
from eqvae_composer.models.gan_model import GANAutoencoderModel
from eqvae_composer.models.gan_updates import AlternatingAdam, AlternatingGANUpdates
from eqvae_composer.models.loss import (
    GAN_PHASES,
    LOSS_KEYS,
    ReconstructionGANLoss,
    VAEGANLoss,
    hinge_discriminator_loss,
)
from eqvae_composer.models.lpips import load_lpips, lpips_distance
from eqvae_composer.models.vq import VQ_EVAL_METRICS, ComposerVQModel, VQModelForward
from eqvae_composer.models.vq_loss import VQ_LOSS_KEYS, VQGANLoss

__all__ = [
    'AlternatingAdam',
    'AlternatingGANUpdates',
    'AutoencoderKLForward',
    'ComposerAutoencoderKL',
    'ComposerVQModel',
    'EVAL_METRICS',
    'GANAutoencoderModel',
    'GAN_PHASES',
    'LOSS_KEYS',
    'PatchGANDiscriminator',
    'ReconstructionGANLoss',
    'VAEGANLoss',
    'VQGANLoss',
    'VQModelForward',
    'VQ_EVAL_METRICS',
    'VQ_LOSS_KEYS',
    'hinge_discriminator_loss',
    'load_lpips',
    'lpips_distance',
]
