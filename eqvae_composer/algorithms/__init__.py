"""EQ-VAE algorithms for Composer."""

from eqvae_composer.algorithms.equivariance import EquivarianceAlgorithm
from eqvae_composer.ema import EMA

__all__ = ['EMA', 'EquivarianceAlgorithm']
