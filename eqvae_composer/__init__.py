"""eqvae-composer: EQ-VAE fine-tuning of diffusers autoencoders with Composer."""

from eqvae_composer.algorithms import EquivarianceAlgorithm
from eqvae_composer.models import ComposerAutoencoderKL, ComposerVQModel, VAEGANLoss, VQGANLoss, load_lpips

__version__ = '0.1.0'

__all__ = ['ComposerAutoencoderKL', 'ComposerVQModel', 'EquivarianceAlgorithm', 'VAEGANLoss', 'VQGANLoss', 'load_lpips']
