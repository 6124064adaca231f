"""Analytic FLOPs of one training step, ours and the reference's, per image and over EQ-VAE's branch mix.

Counted on the meta device (no memory, no compute) with ``torch.utils.flop_counter``'s per-op
formulas (matmul and convolution, forward and backward).
"""

from __future__ import annotations

import contextlib
import statistics
from collections.abc import Callable, Iterator
from unittest import mock

import torch

from eqvae_composer.algorithms.equivariance.transforms import (
    GRID_SCALES,
    Branch,
    SpatialTransform,
    apply_to_image,
    apply_to_latent,
    downscale_image,
)
from eqvae_composer.benchmarks.reference_step import (
    reference_discriminator_loss,
    reference_forward,
    reference_generator_loss,
    toggle_optimizer,
)
from eqvae_composer.benchmarks.workload import P_EQUIVARIANCE, P_LOWRES, BenchConfig, build_model, random_lpips
from eqvae_composer.compat import TorchDispatchMode
from eqvae_composer.introspection import latent_entry_point

__all__ = ['FlopCounter', 'count_step_flops']


class FlopCounter(TorchDispatchMode):
    """Sums ``torch.utils.flop_counter``'s per-op formulas (matmul/conv forward and backward).

    ``FlopCounterMode`` itself tracks modules with backward hooks that refuse ``autograd.grad``
    with respect to a leaf, which the loss uses; the FLOP formulas are the same.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.overloadpacket in flop_registry:
            self.total += flop_registry[func.overloadpacket](*args, **kwargs, out_val=out)
        return out


@contextlib.contextmanager
def _autocast_off() -> Iterator[None]:
    """``torch.autocast`` as a no-op: it has no meta-device variant (it raises even disabled), and the
    loss turns it off around its body, which runs in fp32 on the meta device anyway."""
    with mock.patch.object(torch, 'autocast', lambda *args, **kwargs: contextlib.nullcontext()):
        yield


def count_step_flops(
    width: int = 128, resolution: int = 256, batch_size: int = 1, device: str = 'meta'
) -> dict[str, float]:
    """FLOPs of one training step per image (``torch.utils.flop_counter``'s formulas), on the meta device.

    Returns per-image GFLOPs of: the VAE forward and backward alone, ours at full resolution, the
    reference's step at full resolution (both forwards), and the expected FLOPs of ours and the
    reference over EQ-VAE's branch mix (average over the scale grid).
    """
    cfg = BenchConfig(width=width, resolution=resolution, batch_size=batch_size, device=device)
    with torch.device(device):
        lpips_net = random_lpips().to(device)  # its scaling buffers are built with the legacy constructor
        model = build_model(cfg, lpips_net, seed=0)
    images = torch.zeros(batch_size, 3, resolution, resolution, device=device)

    def ours(branch: Branch, tau: SpatialTransform) -> float:
        x = images
        if branch == Branch.LOW_RES:
            x = downscale_image(x, tau.scale_h, tau.scale_w, model.downsample_factor)
        entry = latent_entry_point(model.vae)
        hook = (
            entry.register_forward_pre_hook(lambda m, a: (apply_to_latent(a[0], tau).contiguous(), *a[1:]))
            if branch == Branch.EQUIVARIANCE
            else None
        )
        with FlopCounter() as counter:
            outputs = model({'image': x})
            target = apply_to_image(x, tau, model.downsample_factor) if branch == Branch.EQUIVARIANCE else x
            with _autocast_off():
                model.loss(outputs, {'image': target})['total'].backward()
        if hook is not None:
            hook.remove()
        return counter.total / batch_size / 1e9

    groups = model.param_groups(1e-4)
    ae_params, disc_params = groups[0]['params'], groups[1]['params']

    def reference_half(half: str, branch: Branch, tau: SpatialTransform) -> float:
        with FlopCounter() as counter:
            if half == 'ae':
                toggle_optimizer(ae_params, disc_params)
                x, x_hat, posterior = reference_forward(model, images, branch, tau)
                reference_generator_loss(model, x, x_hat, posterior)[0].backward()
            else:
                toggle_optimizer(disc_params, ae_params)
                x, x_hat, _ = reference_forward(model, images, branch, tau)
                reference_discriminator_loss(model, x, x_hat).backward()
            toggle_optimizer(ae_params + disc_params, [])
        return counter.total / batch_size / 1e9

    def vae_only() -> float:
        with FlopCounter() as counter:
            model({'image': images})['reconstruction'].float().sum().backward()
        return counter.total / batch_size / 1e9

    def mix(cost: Callable[[Branch, SpatialTransform], float]) -> tuple[float, float]:
        full = cost(Branch.FULL_RES, SpatialTransform())
        eq = statistics.mean(cost(Branch.EQUIVARIANCE, SpatialTransform(s, s, 1)) for s in GRID_SCALES)
        low = statistics.mean(cost(Branch.LOW_RES, SpatialTransform(s, s)) for s in GRID_SCALES)
        return full, (1 - P_EQUIVARIANCE) * ((1 - P_LOWRES) * full + P_LOWRES * low) + P_EQUIVARIANCE * eq

    ours_full, ours_mix = mix(ours)
    ae_full, ae_mix = mix(lambda b, t: reference_half('ae', b, t))
    d_full, d_mix = mix(lambda b, t: reference_half('d', b, t))
    return {
        'vae_fwd_bwd': vae_only(),
        'ours_full_res': ours_full,
        'ours_branch_mix': ours_mix,
        'reference_full_res': ae_full + d_full,
        'reference_branch_mix': ae_mix + d_mix,
    }
