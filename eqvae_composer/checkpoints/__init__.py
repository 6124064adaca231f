"""Loading autoencoders from any supported format, exporting them, and measuring their latent scale."""

from eqvae_composer.checkpoints.composer_state import (
    EMA_COPY_CALLBACK,
    AutoencoderConfigRecorder,
    composer_vae_state,
    full_vae,
    is_composer_checkpoint,
    trained_autoencoder,
)
from eqvae_composer.checkpoints.export import export_diffusers, export_ldm, load_for_export, set_latent_factors
from eqvae_composer.checkpoints.image_source import image_loader
from eqvae_composer.checkpoints.latent_stats import LatentStatistics, latent_statistics
from eqvae_composer.checkpoints.ldm import KeyMismatchError, diffusers_to_ldm, ldm_key_map, ldm_to_diffusers
from eqvae_composer.checkpoints.loading import (
    SD_VAE_CONFIG,
    AutoencoderLoadError,
    load_autoencoder,
    load_composer_checkpoint,
    load_state_dict_file,
    read_checkpoint_file,
    resolve_config,
)
from eqvae_composer.checkpoints.sharded import is_sharded_checkpoint, read_sharded_checkpoint
from eqvae_composer.checkpoints.taming import (
    diffusers_to_taming,
    is_taming_vq_state_dict,
    taming_key_map,
    taming_to_diffusers,
    taming_vq_config,
)

__all__ = [
    'EMA_COPY_CALLBACK',
    'SD_VAE_CONFIG',
    'AutoencoderConfigRecorder',
    'AutoencoderLoadError',
    'KeyMismatchError',
    'LatentStatistics',
    'composer_vae_state',
    'diffusers_to_ldm',
    'diffusers_to_taming',
    'export_diffusers',
    'export_ldm',
    'full_vae',
    'image_loader',
    'is_composer_checkpoint',
    'is_sharded_checkpoint',
    'is_taming_vq_state_dict',
    'latent_statistics',
    'ldm_key_map',
    'ldm_to_diffusers',
    'load_autoencoder',
    'load_composer_checkpoint',
    'load_for_export',
    'load_state_dict_file',
    'read_checkpoint_file',
    'read_sharded_checkpoint',
    'resolve_config',
    'set_latent_factors',
    'taming_key_map',
    'taming_to_diffusers',
    'taming_vq_config',
    'trained_autoencoder',
]
