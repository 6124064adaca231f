"""rFID as the reference computes it: pytorch-fid's Inception-v3 and its statistics, the weights found offline-safe.

zelaki/eqvae's ``eval.py`` (L148) calls a copy of pytorch-fid's ``calculate_fid_given_paths`` on
its folders of reference and reconstructed PNGs: each PNG is read as ``ToTensor`` reads it
(uint8 / 255), fed to pytorch-fid's ``InceptionV3`` (bilinear resize to 299 inside), the 2048-d
pool features are kept per image in float64, ``np.mean`` / ``np.cov`` give the statistics and
pytorch-fid's ``calculate_frechet_distance`` (``scipy.linalg.sqrtm``) the distance.
``ReferenceFID`` does the same on the uint8 images in memory; PNG is lossless, so the pixels are
the ones the files would hold.
"""

from __future__ import annotations

import os

import numpy as np
import pytorch_fid.inception
import torch
from pytorch_fid.fid_score import calculate_frechet_distance
from torch import nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from eqvae_composer.compat import pytorch_fid_inception
from eqvae_composer.weights import resolve_weights

__all__ = ['REFERENCE_INCEPTION_FILENAME', 'REFERENCE_INCEPTION_URL', 'ReferenceFID', 'load_reference_inception']

#: pytorch-fid's port of the TF 2015-12-05 Inception graph (not torch-fidelity's file of the same graph).
REFERENCE_INCEPTION_FILENAME = 'pt_inception-2015-12-05-6726825d.pth'
REFERENCE_INCEPTION_URL = pytorch_fid.inception.FID_WEIGHTS_URL
_POOL_BLOCK = pytorch_fid.inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]


class _PoolFeatures(nn.Module):
    """pytorch-fid's ``InceptionV3`` as ``get_activations`` uses it: ``(B, 3, H, W)`` in [0, 1] -> ``(B, 2048)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)[0].squeeze(3).squeeze(2)


def load_reference_inception(weights: str | os.PathLike | None = None, allow_download: bool | None = None) -> nn.Module:
    """pytorch-fid's frozen Inception-v3, float ``(B, 3, H, W)`` images in [0, 1] -> 2048-d pool features.

    The arguments and the ``MissingWeightsError`` are ``load_inception``'s, for the file
    ``REFERENCE_INCEPTION_FILENAME`` (a path to it under any name, or a folder holding it).
    """
    what = 'rFID of --protocol reference (pytorch-fid Inception-v3)'
    path = resolve_weights(REFERENCE_INCEPTION_FILENAME, REFERENCE_INCEPTION_URL, what, weights, allow_download)
    state = torch.load(path, map_location='cpu', weights_only=True)
    net = pytorch_fid_inception(state, [_POOL_BLOCK])  # never downloads; rejects a file that is not the network's
    return _PoolFeatures(net).eval().requires_grad_(False)


class ReferenceFID(Metric):
    """pytorch-fid's FID between references and reconstructions; ``update(recon, target)`` with uint8 images.

    Features are kept per image (``cat`` states, gathered from every rank at ``compute``) because
    pytorch-fid's ``np.cov`` takes the activations themselves; the first path of the reference's
    call (L148) is the references, the second the reconstructions.

    Args:
        feature_extractor (nn.Module): float ``(B, 3, H, W)`` in [0, 1] -> ``(B, D)``, e.g.
            ``load_reference_inception()``.
        **kwargs: ``torchmetrics.Metric`` arguments.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, feature_extractor: nn.Module, **kwargs) -> None:
        super().__init__(**kwargs)
        self.feature_extractor = feature_extractor
        self.add_state('reference_features', [], dist_reduce_fx='cat')
        self.add_state('reconstruction_features', [], dist_reduce_fx='cat')

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f'ReferenceFID takes uint8 images (reference_uint8), got {images.dtype}.')
        # torchvision's ToTensor on a PNG: uint8 -> float32, divided by 255.
        return self.feature_extractor(images.float().div(255)).float()

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:  # type: ignore[override]
        self.reference_features.append(self._features(target))
        self.reconstruction_features.append(self._features(preds))

    def compute(self) -> torch.Tensor:
        # pytorch-fid stores the float32 activations in a float64 array before np.mean / np.cov.
        reference = dim_zero_cat(self.reference_features).cpu().double().numpy()
        reconstruction = dim_zero_cat(self.reconstruction_features).cpu().double().numpy()
        distance = calculate_frechet_distance(
            np.mean(reference, axis=0),
            np.cov(reference, rowvar=False),
            np.mean(reconstruction, axis=0),
            np.cov(reconstruction, rowvar=False),
        )
        return torch.tensor(float(distance), dtype=torch.float64)
