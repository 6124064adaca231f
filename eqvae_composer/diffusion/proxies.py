"""Diffusability proxies that need no diffusion training: the latents' spectrum and channel statistics.

Skorokhodov et al. 2025 ("Improving the diffusability of autoencoders") find that latents with more
high-frequency content than the images they encode are harder to diffuse: diffusion generates coarse
to fine, and spectral power that the image lacks at those frequencies is noise the model must learn.
The radially averaged power spectral density (RAPSD) is taken per channel on each grid's own
frequency axis (cycles per pixel over the Nyquist frequency, so 1 is each grid's finest), which makes
a 256 px image and its 32 px latent comparable curve to curve.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ['channel_statistics', 'high_frequency_share', 'plot_report', 'radial_power_spectrum']


def _power_and_radius(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``|FFT|^2`` of each ``(B, C)`` plane, averaged over B and C, and each frequency's radius / Nyquist."""
    if x.dim() != 4 or x.shape[-1] != x.shape[-2] or x.shape[-1] < 4:
        raise ValueError(f'the spectrum takes (B, C, N, N) tensors with N >= 4, got {tuple(x.shape)}.')
    n = x.shape[-1]
    power = torch.fft.fft2(x.double()).abs().pow(2).mean(dim=(0, 1)) / (n * n)
    freqs = torch.fft.fftfreq(n, dtype=torch.float64)  # cycles per pixel, Nyquist 0.5
    radius = torch.sqrt(freqs[:, None] ** 2 + freqs[None, :] ** 2) / 0.5
    return power, radius


def radial_power_spectrum(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The RAPSD of ``x``: ``(frequencies in [0, 1], mean power per ring)``, rings 1/(N/2) wide up to Nyquist.

    Args:
        x: ``(B, C, N, N)`` images or latents.
    """
    power, radius = _power_and_radius(x)
    half = x.shape[-1] // 2
    ring = torch.round(radius * half).long()
    inside = ring <= half
    sums = torch.zeros(half + 1, dtype=torch.float64).index_add_(0, ring[inside], power[inside])
    counts = torch.zeros(half + 1, dtype=torch.float64).index_add_(0, ring[inside], torch.ones_like(power[inside]))
    return torch.arange(half + 1, dtype=torch.float64) / half, sums / counts


def high_frequency_share(x: torch.Tensor, cutoff: float = 0.5) -> float:
    """The share of the non-constant spectral energy above ``cutoff`` x Nyquist (within the Nyquist disc).

    Args:
        x: ``(B, C, N, N)``.
        cutoff: Fraction of the Nyquist frequency. Default: 0.5.
    """
    power, radius = _power_and_radius(x)
    moving = (radius > 0) & (radius <= 1)
    total = power[moving].sum()
    return float(power[moving & (radius > cutoff)].sum() / total) if total > 0 else 0.0


def channel_statistics(latents: torch.Tensor) -> dict[str, list[float]]:
    """Per channel of ``(B, C, h, w)`` latents: mean, std, and the share of values beyond 3 std (heavy tails)."""
    flat = latents.double().transpose(0, 1).flatten(1)
    mean, std = flat.mean(dim=1), flat.std(dim=1)
    beyond = ((flat - mean[:, None]).abs() > 3 * std[:, None]).double().mean(dim=1)
    return {'mean': mean.tolist(), 'std': std.tolist(), 'beyond_3_std': beyond.tolist()}


def plot_report(report: dict[str, Any], path: str | os.PathLike) -> None:
    """A PNG: the images' and latents' RAPSD (normalized to unit total), and the latents' channel means and stds."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (spectra, channels) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ('images', 'latents'):
        spectrum = report['spectrum'][name]
        power = torch.tensor(spectrum['power'])
        label = f'{name} (high-frequency share {spectrum["high_frequency_share"]:.3f})'
        spectra.semilogy(spectrum['frequency'][1:], (power / power[1:].sum())[1:].tolist(), label=label)
    spectra.set_xlabel('frequency / Nyquist')
    spectra.set_ylabel('normalized power')
    spectra.set_title('radially averaged power spectrum')
    spectra.legend()
    stats = report['channels']
    index = list(range(len(stats['mean'])))
    channels.bar([i - 0.2 for i in index], stats['mean'], width=0.4, label='mean')
    channels.bar([i + 0.2 for i in index], stats['std'], width=0.4, label='std')
    channels.set_xlabel('latent channel (scaled as diffusion sees it)')
    channels.set_title(report.get('title', 'latent channels'))
    channels.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
