"""DiT's DDPM objective: epsilon prediction with a learned variance range (improved DDPM's hybrid loss).

What ``facebookresearch/DiT`` ``diffusion/gaussian_diffusion.py`` ``training_losses`` computes with
``create_diffusion(timestep_respacing='')``: linear betas from 1e-4 to 0.02 over 1000 steps, the
model's output split into epsilon and variance values, ``loss = mse(eps) + vb`` where ``vb`` is the
variational bound term (in bits per dimension) on the *detached* mean and the learned variance, so the
variance head learns from the bound and the mean from the simple loss only. Tables are float64, as DiT's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ['DDPMSchedule', 'ddpm_loss', 'linear_betas', 'q_sample']


def linear_betas(num_timesteps: int = 1000) -> torch.Tensor:
    """Ho et al.'s linear schedule, stretched to any number of steps (DiT's ``get_named_beta_schedule('linear')``)."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


@dataclass(frozen=True)
class DDPMSchedule:
    """The float64 tables a Gaussian diffusion needs, built from its betas."""

    betas: torch.Tensor

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return torch.cumprod(1 - self.betas, dim=0)

    @property
    def alphas_cumprod_prev(self) -> torch.Tensor:
        return torch.cat([self.betas.new_ones(1), self.alphas_cumprod[:-1]])

    @property
    def posterior_variance(self) -> torch.Tensor:
        return self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)

    @property
    def posterior_log_variance_clipped(self) -> torch.Tensor:
        # The posterior variance is 0 at t = 0: its log takes t = 1's value there.
        variance = self.posterior_variance
        return torch.log(torch.cat([variance[1:2], variance[1:]]))

    def posterior_mean(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean of q(x_{t-1} | x_t, x_0)."""
        acp, acp_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        coef1 = self.betas * acp_prev.sqrt() / (1 - acp)
        coef2 = (1 - acp_prev) * (1 - self.betas).sqrt() / (1 - acp)
        return _take(coef1, t, x_t) * x_start + _take(coef2, t, x_t) * x_t

    def predict_start_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        acp = self.alphas_cumprod
        return _take((1 / acp).sqrt(), t, x_t) * x_t - _take((1 / acp - 1).sqrt(), t, x_t) * eps


def _take(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``table[t]`` in ``like``'s dtype, shaped to broadcast over ``like`` (DiT's ``_extract_into_tensor``)."""
    values = table.to(t.device)[t].float()
    return values.reshape(-1, *([1] * (like.dim() - 1)))


def q_sample(schedule: DDPMSchedule, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``x_t = sqrt(acp_t) * x_0 + sqrt(1 - acp_t) * noise``, with integer timesteps ``t`` of shape ``(B,)``."""
    acp = schedule.alphas_cumprod
    return _take(acp.sqrt(), t, x_start) * x_start + _take((1 - acp).sqrt(), t, x_start) * noise


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of ``x`` (data in [-1, 1] on a 256-level grid) under a discretized Gaussian."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)


def ddpm_loss(
    schedule: DDPMSchedule,
    model_output: torch.Tensor,
    x_start: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    learn_sigma: bool = True,
) -> dict[str, torch.Tensor]:
    """DiT's per-sample training loss for a model output at ``(x_t, t)``.

    Args:
        schedule: The diffusion's tables.
        model_output: ``(B, 2C, ...)`` epsilon and variance values with ``learn_sigma``, else ``(B, C, ...)``.
        x_start: Clean data ``x_0``.
        x_t: ``q_sample(schedule, x_start, t, noise)``.
        t: Integer timesteps, ``(B,)``.
        noise: The epsilon that made ``x_t``.
        learn_sigma: Whether the output carries the variance values (DiT: True). Default: ``True``.

    Returns:
        ``{'mse', 'vb', 'loss'}``, each ``(B,)`` (``vb`` is zeros without ``learn_sigma``).
    """
    channels = x_t.shape[1]
    model_output = model_output.float()
    if not learn_sigma:
        mse = _mean_flat((noise.float() - model_output) ** 2)
        return {'mse': mse, 'vb': torch.zeros_like(mse), 'loss': mse}
    eps, var_values = model_output.split(channels, dim=1)
    x_start, x_t = x_start.float(), x_t.float()
    # The bound trains the variance only: the mean comes from the detached epsilon.
    min_log = _take(schedule.posterior_log_variance_clipped, t, x_t)
    max_log = _take(schedule.betas.log(), t, x_t)
    frac = (var_values + 1) / 2
    model_log_variance = frac * max_log + (1 - frac) * min_log
    pred_start = schedule.predict_start_from_eps(x_t, t, eps.detach())
    model_mean = schedule.posterior_mean(pred_start, x_t, t)
    true_mean = schedule.posterior_mean(x_start, x_t, t)
    kl = _mean_flat(_normal_kl(true_mean, min_log, model_mean, model_log_variance)) / math.log(2.0)
    nll = -_mean_flat(_discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_variance)) / math.log(
        2.0
    )
    vb = torch.where(t == 0, nll, kl)
    mse = _mean_flat((noise.float() - eps) ** 2)
    return {'mse': mse, 'vb': vb, 'loss': mse + vb}
