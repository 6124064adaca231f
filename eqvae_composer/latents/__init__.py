"""Latents for diffusion training: encode an image dataset with a VAE to MDS, and stream them back scaled."""

from eqvae_composer.latents.dataset import StreamingLatentDataset
from eqvae_composer.latents.encode import EncodeOptions, EncodeSummary, encode_latents, format_summary
from eqvae_composer.latents.preprocess import center_crop_arr

__all__ = [
    'EncodeOptions',
    'EncodeSummary',
    'StreamingLatentDataset',
    'center_crop_arr',
    'encode_latents',
    'format_summary',
]
