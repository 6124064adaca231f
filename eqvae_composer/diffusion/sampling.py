"""Samplers: fixed-step ODE solvers (Euler, Heun) for the flow, DDPM/DDIM (diffusers' schedulers) for DDPM.

The flow runs from noise at ``t = 0`` to data at ``t = 1`` (SiT's convention) on ``num_steps`` equal
steps. Everything is a function of a model callable ``model(x, t, labels)`` and the initial noise,
so a sampler is testable with a closed-form velocity field.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDIMScheduler, DDPMScheduler

__all__ = ['ODE_SOLVERS', 'ddpm_scheduler', 'sample_ddpm', 'sample_ode']

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ODE_SOLVERS = ('euler', 'heun')


@torch.no_grad()
def sample_ode(
    velocity: VelocityFn,
    noise: torch.Tensor,
    labels: torch.Tensor,
    num_steps: int = 50,
    solver: str = 'heun',
) -> torch.Tensor:
    """Integrate ``dx/dt = velocity(x, t, labels)`` from ``t = 0`` (``noise``) to ``t = 1``.

    Args:
        velocity: The (possibly guided) velocity model.
        noise: ``x`` at ``t = 0``.
        labels: Class labels, ``(B,)``.
        num_steps: Equal steps over [0, 1]. Default: 50.
        solver: ``'euler'`` (one evaluation per step) or ``'heun'`` (two: second order). Default: ``'heun'``.

    Returns:
        ``x`` at ``t = 1``.
    """
    if solver not in ODE_SOLVERS:
        raise ValueError(f'solver must be one of {", ".join(ODE_SOLVERS)}, got {solver!r}.')
    if num_steps < 1:
        raise ValueError(f'num_steps must be at least 1, got {num_steps}.')
    times = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64)
    x = noise
    for t, t_next in zip(times[:-1].tolist(), times[1:].tolist()):
        h = t_next - t
        v = velocity(x, x.new_full((x.shape[0],), t), labels)
        if solver == 'euler':
            x = x + h * v
        else:
            x_euler = x + h * v
            v_next = velocity(x_euler, x.new_full((x.shape[0],), t_next), labels)
            x = x + h * 0.5 * (v + v_next)
    return x


def ddpm_scheduler(
    kind: str, num_train_timesteps: int = 1000, learn_sigma: bool = True
) -> DDPMScheduler | DDIMScheduler:
    """diffusers' DDPM or DDIM scheduler for DiT's linear betas (1e-4 .. 0.02).

    Args:
        kind: ``'ddpm'`` (ancestral; with ``learn_sigma`` it uses the learned variance range) or ``'ddim'`` (eta 0).
        num_train_timesteps: The diffusion's length. Default: 1000.
        learn_sigma: Whether the model outputs variance values after epsilon. Default: ``True``.
    """
    scale = 1000 / num_train_timesteps
    common = dict(
        num_train_timesteps=num_train_timesteps,
        beta_start=scale * 1e-4,
        beta_end=scale * 0.02,
        beta_schedule='linear',
        prediction_type='epsilon',
        clip_sample=False,
        # DiT's respacing (space_timesteps): round(linspace(0, T - 1, steps)), from T - 1 down to 0.
        timestep_spacing='linspace',
    )
    if kind == 'ddpm':
        return DDPMScheduler(**common, variance_type='learned_range' if learn_sigma else 'fixed_small')
    if kind == 'ddim':
        # The last step returns the predicted x_0, as DiT's ddim_sample (alpha_bar_prev = 1 at t = 0).
        return DDIMScheduler(**common, set_alpha_to_one=True)
    raise ValueError(f"the DDPM objective samples with 'ddpm' or 'ddim', got {kind!r}.")


@torch.no_grad()
def sample_ddpm(
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    noise: torch.Tensor,
    labels: torch.Tensor,
    scheduler: DDPMScheduler | DDIMScheduler,
    num_steps: int = 250,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Denoise ``noise`` with ``scheduler`` in ``num_steps`` steps; ``model(x, t, labels)`` gets integer timesteps.

    With a DDIM scheduler the variance values of a ``2C``-channel output are dropped.
    """
    scheduler.set_timesteps(num_steps, device=noise.device)
    x = noise
    channels = noise.shape[1]
    for t in scheduler.timesteps:
        out = model(x, t.expand(x.shape[0]), labels)
        if isinstance(scheduler, DDIMScheduler):
            out = out[:, :channels]
        kwargs = {'generator': generator} if generator is not None else {}
        x = scheduler.step(out, t, x, **kwargs).prev_sample
    return x
