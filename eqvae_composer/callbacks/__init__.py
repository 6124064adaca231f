"""Composer callbacks for autoencoder training."""

from eqvae_composer.callbacks.global_step import GlobalStepCallback

__all__ = ['GlobalStepCallback']
