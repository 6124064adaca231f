"""Codebook usage of a vector-quantized autoencoder: perplexity and dead codes, as torchmetrics ``Metric``s.

Both count how often each code is picked over every latent cell of every image seen, summed across
ranks, and are computed from that histogram once: the perplexity of the whole eval set's code
distribution (taming's ``VectorQuantizer2`` logs a per-batch perplexity, which small batches cap at
the number of cells in a batch) and the share of the codebook no image used.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

__all__ = ['CodebookPerplexity', 'CodebookUsage', 'DeadCodeFraction']


class CodebookUsage(Metric):
    """Histogram of code indices; ``update(codes)`` takes indices of any shape. ``compute`` is the subclass's.

    Args:
        num_codes (int): the codebook size (``VQModel.config.num_vq_embeddings``).
    """

    full_state_update = False

    def __init__(self, num_codes: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if num_codes < 1:
            raise ValueError(f'num_codes must be positive, got {num_codes}.')
        self.num_codes = int(num_codes)
        self.add_state('counts', torch.zeros(self.num_codes, dtype=torch.long), dist_reduce_fx='sum')

    def update(self, codes: torch.Tensor) -> None:  # type: ignore[override]
        codes = codes.detach().flatten().long()
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise ValueError(f'code indices must be in [0, {self.num_codes}), got [{codes.min()}, {codes.max()}].')
        self.counts += torch.bincount(codes, minlength=self.num_codes).to(self.counts.device)


class CodebookPerplexity(CodebookUsage):
    """``exp(-sum_k p_k log p_k)`` of the code frequencies: 1 when one code is used, ``num_codes`` when all equally."""

    higher_is_better = True

    def compute(self) -> torch.Tensor:
        p = self.counts.double() / self.counts.sum().clamp_min(1)
        entropy = -(p * torch.log(p.clamp_min(1e-300))).sum()  # 0 log 0 = 0
        return entropy.exp().float()


class DeadCodeFraction(CodebookUsage):
    """Share of the codebook that no latent cell of the images seen was quantized to."""

    higher_is_better = False

    def compute(self) -> torch.Tensor:
        return (self.counts == 0).float().mean()
