"""EQ-VAE equivariance regularization: the Composer algorithm and its functional core."""

# The VAE introspection helpers live in eqvae_composer.introspection; re-exported here for existing imports.

from eqvae_composer.algorithms.equivariance.equivariance import EquivarianceAlgorithm, microbatch_seed
from eqvae_composer.algorithms.equivariance.transforms import (
    DISCRETE_SCALES,
    GRID_SCALES,
    Branch,
    SpatialTransform,
    apply_to_image,
    apply_to_latent,
    check_target_size,
    downscale_image,
    sample_branch,
    sample_scales,
    sample_transform,
    scaled_size,
    smallest_scale,
    smallest_target_size,
)
from eqvae_composer.introspection import find_autoencoder, latent_entry_point, vae_downsample_factor

__all__ = [
    'Branch',
    'DISCRETE_SCALES',
    'EquivarianceAlgorithm',
    'GRID_SCALES',
    'SpatialTransform',
    'apply_to_image',
    'apply_to_latent',
    'check_target_size',
    'downscale_image',
    'find_autoencoder',
    'latent_entry_point',
    'microbatch_seed',
    'sample_branch',
    'sample_scales',
    'sample_transform',
    'scaled_size',
    'smallest_scale',
    'smallest_target_size',
    'vae_downsample_factor',
]
