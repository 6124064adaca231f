"""EQ-VAE algorithms for Composer."""

from eqvae_composer.algorithms.ema import EMA
from eqvae_composer.algorithms.equivariance import EquivarianceAlgorithm

__all__ = ['EMA', 'EquivarianceAlgorithm']
