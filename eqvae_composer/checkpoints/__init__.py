"""Loading autoencoders from any supported format, and exporting them."""

from eqvae_composer.checkpoints.export import export_diffusers
from eqvae_composer.checkpoints.loading import SD_VAE_CONFIG, AutoencoderLoadError, load_autoencoder, load_state_dict_file

__all__ = ['SD_VAE_CONFIG', 'AutoencoderLoadError', 'export_diffusers', 'load_autoencoder', 'load_state_dict_file']
