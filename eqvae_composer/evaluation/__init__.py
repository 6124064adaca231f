"""Reconstruction (PSNR, SSIM, LPIPS) and latent-equivariance metrics."""

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

__all__ = [
    'EVAL_ROTATIONS',
    'EVAL_SCALES',
    'LPIPSMetric',
    'LatentEquivarianceError',
    'MeanPerImage',
    'ReconstructionPSNR',
    'ReconstructionSSIM',
    'equivariance_errors',
    'eval_transforms',
    'quantize',
]
