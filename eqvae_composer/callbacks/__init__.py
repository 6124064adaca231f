"""Composer callbacks for autoencoder training."""

from eqvae_composer.callbacks.global_step import GlobalStepCallback
from eqvae_composer.callbacks.image_grid import ImageGridCallback

__all__ = ['GlobalStepCallback', 'ImageGridCallback']
