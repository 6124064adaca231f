"""Evaluation: reconstruction (rFID, PSNR, SSIM, LPIPS) and latent-equivariance metrics, and the eval runner."""

from eqvae_composer.evaluation.datasets import (
    ImageFolderDataset,
    IndexedDataset,
    build_eval_dataset,
    dataset_size,
    load_eval_image,
    rank_shard,
)
from eqvae_composer.evaluation.fid import INCEPTION_FILENAME, INCEPTION_URL, ReconstructionFID, load_inception, to_uint8
from eqvae_composer.evaluation.intrinsic_dim import (
    LatentIntrinsicDimension,
    nearest_neighbor_distances,
    twonn_dimension,
)
from eqvae_composer.evaluation.metrics import (
    EVAL_ROTATIONS,
    EVAL_SCALES,
    LatentEquivarianceError,
    LPIPSMetric,
    MeanPerImage,
    ReconstructionPSNR,
    ReconstructionSSIM,
    equivariance_errors,
    eval_transforms,
    quantize,
)
from eqvae_composer.evaluation.report import format_markdown
from eqvae_composer.evaluation.runner import ALL_METRICS, DEFAULT_METRICS, EvalProtocol, evaluate, posterior_noise
from eqvae_composer.evaluation.visualize import image_rows, latent_pca_rgb, to_display, upsample_nearest

__all__ = [
    'ALL_METRICS',
    'DEFAULT_METRICS',
    'EVAL_ROTATIONS',
    'EVAL_SCALES',
    'INCEPTION_FILENAME',
    'INCEPTION_URL',
    'EvalProtocol',
    'ImageFolderDataset',
    'IndexedDataset',
    'LPIPSMetric',
    'LatentEquivarianceError',
    'LatentIntrinsicDimension',
    'MeanPerImage',
    'ReconstructionFID',
    'ReconstructionPSNR',
    'ReconstructionSSIM',
    'build_eval_dataset',
    'dataset_size',
    'equivariance_errors',
    'eval_transforms',
    'evaluate',
    'format_markdown',
    'image_rows',
    'latent_pca_rgb',
    'load_eval_image',
    'load_inception',
    'nearest_neighbor_distances',
    'posterior_noise',
    'quantize',
    'rank_shard',
    'to_display',
    'to_uint8',
    'twonn_dimension',
    'upsample_nearest',
]
