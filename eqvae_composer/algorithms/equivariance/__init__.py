"""EQ-VAE equivariance regularization: the Composer algorithm and its functional core."""

from eqvae_composer.algorithms.equivariance.equivariance import (
    EquivarianceAlgorithm,
    find_autoencoder,
    latent_entry_point,
    microbatch_seed,
    vae_downsample_factor,
)
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
