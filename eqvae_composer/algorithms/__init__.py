"""EQ-VAE algorithms for Composer."""

from eqvae_composer.algorithms.equivariance import EquivarianceAlgorithm

__all__ = ['EquivarianceAlgorithm']
