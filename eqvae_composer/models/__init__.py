"""The ComposerModel around a diffusers AutoencoderKL, its loss and discriminator."""

from eqvae_composer.models.autoencoder import EVAL_METRICS, AutoencoderKLForward, ComposerAutoencoderKL
from eqvae_composer.models.discriminator import PatchGANDiscriminator
from eqvae_composer.models.gan_updates import AlternatingAdam, AlternatingGANUpdates
from eqvae_composer.models.loss import GAN_PHASES, LOSS_KEYS, VAEGANLoss, hinge_discriminator_loss
from eqvae_composer.models.lpips import load_lpips, lpips_distance

__all__ = [
    'AlternatingAdam',
    'AlternatingGANUpdates',
    'AutoencoderKLForward',
    'ComposerAutoencoderKL',
    'EVAL_METRICS',
    'GAN_PHASES',
    'LOSS_KEYS',
    'PatchGANDiscriminator',
    'VAEGANLoss',
    'hinge_discriminator_loss',
    'load_lpips',
    'lpips_distance',
]
