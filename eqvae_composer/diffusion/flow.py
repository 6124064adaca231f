"""SiT's linear flow matching: the interpolant between noise and data, and the velocity objective.

SiT (``transport/path.py`` ``ICPlan``, ``transport/transport.py``) puts noise at ``t = 0`` and data at
``t = 1``: ``x_t = t * x1 + (1 - t) * x0`` with velocity ``u_t = x1 - x0``; the model predicts the
velocity and the loss is its squared error averaged over every non-batch dimension. With the linear
path and velocity prediction SiT samples ``t ~ U(0, 1)`` for training (``train_eps`` is 0 there).
"""

from __future__ import annotations

import torch

__all__ = ['expand_like', 'flow_matching_loss', 'linear_path', 'sample_times']


def expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` of shape ``(B,)`` viewed as ``(B, 1, ..., 1)`` to broadcast against ``x``."""
    return t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)


def linear_path(x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The point ``x_t`` on the straight line from noise ``x0`` (t=0) to data ``x1`` (t=1) and its velocity.

    Args:
        x1: Data, ``(B, ...)``.
        x0: Noise of the same shape.
        t: Times in [0, 1], ``(B,)``.

    Returns:
        ``(x_t, u_t)``: ``t * x1 + (1 - t) * x0`` and ``x1 - x0``.
    """
    tt = expand_like(t, x1)
    return tt * x1 + (1 - tt) * x0, x1 - x0


def sample_times(batch_size: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Training times ``t ~ U(0, 1)``, one per sample (SiT's linear path with velocity prediction)."""
    return torch.rand(batch_size, generator=generator, device=device)


def flow_matching_loss(velocity: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error between predicted and true velocity, ``(B,)``; computed in fp32."""
    return (velocity.float() - target.float()).pow(2).flatten(1).mean(dim=1)
