"""Data: raw images -> MDS shards (conversion), and the streaming image dataset for training/eval."""

from eqvae_composer.data.convert import ConvertOptions, SplitSummary, convert, convert_split
from eqvae_composer.data.dataset import StreamingImageDataset, build_image_dataloader

__all__ = [
    'ConvertOptions',
    'SplitSummary',
    'StreamingImageDataset',
    'build_image_dataloader',
    'convert',
    'convert_split',
]
