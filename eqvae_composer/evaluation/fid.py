"""rFID: torchmetrics' Fréchet distance over Inception-v3 pool features, with the weights found offline-safe.

torchmetrics (through torch-fidelity) would download the Inception weights on first use; here the
file is resolved first with ``resolve_weights``, so a machine without it stops before any work with
the file name and where to put it. The feature extractor is injectable so tests can use a tiny one.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from eqvae_composer.compat import torchmetrics_inception
from eqvae_composer.evaluation.metrics import quantize
from eqvae_composer.weights import resolve_weights

__all__ = ['INCEPTION_FILENAME', 'INCEPTION_URL', 'ReconstructionFID', 'load_inception', 'to_uint8']

#: torch-fidelity's Inception-v3 (the TF 2015-12-05 graph used by the original FID code), as
#: ``torch.hub`` caches it when torch-fidelity downloads it.
INCEPTION_FILENAME = 'weights-inception-2015-12-05-6726825d.pth'
INCEPTION_URL = f'https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILENAME}'
_POOL_FEATURES = 2048


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> uint8 ``[0, 255]``, the same levels as ``quantize`` (what a saved PNG holds)."""
    return (quantize(images) * 255).round().to(torch.uint8)


def load_inception(weights: str | os.PathLike | None = None, allow_download: bool | None = None) -> nn.Module:
    """Frozen Inception-v3 returning 2048-d pool features for uint8 ``(B, 3, H, W)`` images.

    Images of any size are resized to 299 inside (torch-fidelity's TF1-compatible bilinear).

    Args:
        weights (str | PathLike, optional): the weight file (any name) or a folder holding
            ``INCEPTION_FILENAME``. Default: looked up in the torch hub cache.
        allow_download (bool, optional): see ``eqvae_composer.weights.resolve_weights``.

    Raises:
        MissingWeightsError: the file is not on this machine and downloading is not allowed.
    """
    path = resolve_weights(INCEPTION_FILENAME, INCEPTION_URL, 'rFID (Inception-v3)', weights, allow_download)
    net = torchmetrics_inception(str(path), _POOL_FEATURES)
    # Declared so FrechetInceptionDistance does not probe the network with a dummy image.
    net.num_features = _POOL_FEATURES
    return net.requires_grad_(False)


class ReconstructionFID(FrechetInceptionDistance):
    """FID between reconstructions and references; ``update(recon, target)`` with images in [-1, 1].

    Both are quantized to uint8 first (the paper's protocol). The feature sums and outer-product
    sums are torchmetrics states reduced by ``sum``, so a multi-rank run accumulates the statistics
    of the whole set rather than averaging per-rank FIDs.

    Args:
        feature_extractor (nn.Module): uint8 ``(B, 3, H, W)`` -> ``(B, D)`` features, e.g.
            ``load_inception()``; one instance can be shared by several metrics.
        **kwargs: ``torchmetrics.Metric`` arguments.
    """

    def __init__(self, feature_extractor: nn.Module, **kwargs) -> None:
        super().__init__(feature=feature_extractor, normalize=False, **kwargs)

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        super().update(to_uint8(target), real=True)
        super().update(to_uint8(preds), real=False)
