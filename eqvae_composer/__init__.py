"""eqvae-composer: EQ-VAE fine-tuning of diffusers autoencoders with Composer."""

from eqvae_composer.algorithms import EquivarianceAlgorithm
from eqvae_composer.models import ComposerAutoencoderKL, VAEGANLoss, load_lpips

__version__ = '0.1.0'

__all__ = ['ComposerAutoencoderKL', 'EquivarianceAlgorithm', 'VAEGANLoss', 'load_lpips']
