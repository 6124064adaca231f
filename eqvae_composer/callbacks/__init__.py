"""Composer callbacks for autoencoder training."""

from eqvae_composer.callbacks.checkpointing import RestoreRNGMidEpoch, ResumableCheckpointSaver
from eqvae_composer.callbacks.global_step import GlobalStepCallback
from eqvae_composer.callbacks.image_grid import ImageGridCallback
from eqvae_composer.callbacks.nan_guard import NaNGuard, NonFiniteError

__all__ = [
    'GlobalStepCallback',
    'ImageGridCallback',
    'NaNGuard',
    'NonFiniteError',
    'RestoreRNGMidEpoch',
    'ResumableCheckpointSaver',
]
