"""TwoNN intrinsic dimension (Facco et al., 2017, Sci. Rep. 7:12140) of latent vectors (paper Table 5).

For each point, mu = r2 / r1 (distances to its second and first nearest neighbours) follows a
Pareto law ``F(mu) = 1 - mu^(-d)`` on a d-dimensional manifold, so ``-log(1 - F(mu))`` against
``log(mu)`` is a line through the origin with slope d. Each image's latent, flattened, is one point.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ['LatentIntrinsicDimension', 'nearest_neighbor_distances', 'twonn_dimension']


def nearest_neighbor_distances(points: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
    """Euclidean distances of each point to its first and second nearest other point, shape ``(N, 2)``.

    Args:
        points (Tensor): ``(N, D)``, N >= 3.
        chunk_size (int): rows of the distance matrix held at once (memory is ``chunk_size x N``).
            Default: ``1024``.
    """
    points = points.double()
    rows = []
    for start in range(0, len(points), chunk_size):
        block = torch.cdist(points[start : start + chunk_size], points)
        index = torch.arange(start, start + len(block))
        block[torch.arange(len(block)), index] = float('inf')  # a point is not its own neighbour
        rows.append(block.topk(2, dim=1, largest=False).values)
    return torch.cat(rows)


def twonn_dimension(points: torch.Tensor, discard_fraction: float = 0.1) -> float:
    """The TwoNN estimate of the intrinsic dimension of a point cloud.

    Args:
        points (Tensor): ``(N, ...)``; each row (flattened) is one point.
        discard_fraction (float): largest ratios dropped before the fit, as Facco et al. do,
            because the tail is the most affected by curvature and density changes. Default: ``0.1``.

    Raises:
        ValueError: fewer than 3 distinct points.
    """
    if not 0 <= discard_fraction < 1:
        raise ValueError(f'discard_fraction must be in [0, 1), got {discard_fraction}.')
    points = points.flatten(1)
    if len(points) < 3:
        raise ValueError(f'TwoNN needs at least 3 points, got {len(points)}.')
    distances = nearest_neighbor_distances(points)
    # Duplicate points have r1 = 0 and an infinite ratio; they carry no information about d.
    distances = distances[distances[:, 0] > 0]
    if len(distances) < 3:
        raise ValueError('TwoNN needs at least 3 distinct points.')
    mu = (distances[:, 1] / distances[:, 0]).sort().values
    n = len(mu)
    empirical_cdf = torch.arange(1, n + 1, dtype=torch.float64) / n
    keep = max(2, int(n * (1 - discard_fraction)))
    x = mu[:keep].log()
    y = -torch.log1p(-empirical_cdf[:keep].clamp_max(1 - 1e-12))
    return float((x * y).sum() / (x * x).sum().clamp_min(1e-300))


class LatentIntrinsicDimension(Metric):
    """TwoNN dimension of all latents seen; ``update(latents)`` with ``(B, C, h, w)``.

    Nearest neighbours are global, so the latents themselves are the state (concatenated across
    ranks): memory is ``N x C x h x w`` floats, e.g. 800 MB for 50k SD-VAE latents at 256 px.

    Args:
        discard_fraction (float): see ``twonn_dimension``. Default: ``0.1``.
        **kwargs: ``torchmetrics.Metric`` arguments.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, discard_fraction: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.discard_fraction = discard_fraction
        self.add_state('latents', [], dist_reduce_fx='cat')

    def update(self, latents: torch.Tensor) -> None:  # type: ignore[override]
        self.latents.append(latents.detach().float().flatten(1))

    def compute(self) -> torch.Tensor:
        return torch.tensor(twonn_dimension(dim_zero_cat(self.latents), self.discard_fraction))
