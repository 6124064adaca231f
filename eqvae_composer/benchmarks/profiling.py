"""Where a training step's time goes: ``torch.profiler`` by group of ops, and Adam's kernels side by side."""

from __future__ import annotations

import statistics
import time

import torch

from eqvae_composer.algorithms.equivariance.transforms import Branch
from eqvae_composer.benchmarks.train_step import build_contender, sync
from eqvae_composer.benchmarks.workload import BenchConfig, build_model, draw, images_for_step

__all__ = ['profile_step', 'time_adam_kernels']


def time_adam_kernels(cfg: BenchConfig, reps: int = 3, steps: int = 20) -> dict[str, float]:
    """Milliseconds per ``Adam.step`` over the benchmark model's parameters (VAE + discriminator), per kernel.

    ``for-loop`` is ``torch.optim.Adam``'s default on CPU tensors (what the reference gets), ``foreach``
    its CUDA default, ``fused`` what ``train.py`` builds. The kernels alternate over ``reps``.
    """
    model = build_model(cfg, None)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    kernels = {'for-loop': {'foreach': False}, 'foreach': {'foreach': True}, 'fused': {'fused': True}}
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for rep in range(reps):
        for name in list(kernels)[rep % 3 :] + list(kernels)[: rep % 3]:
            optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=(0.5, 0.9), **kernels[name])
            optimizer.step()  # allocates the state
            sync(cfg.device)
            start = time.perf_counter()
            for _ in range(steps):
                optimizer.step()
            sync(cfg.device)
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


_PROFILE_GROUPS = (  # (group, test on the lower-cased op name); the first match wins
    ('Adam (the optimizer step)', lambda op: 'adam' in op or op.startswith('optimizer.step')),
    ('convolution backward', lambda op: 'conv' in op and 'backward' in op),
    ("convolution forward, PyTorch's im2col path", lambda op: 'slow_conv' in op or 'im2col' in op),
    ('convolution forward (mkldnn)', lambda op: 'conv' in op),
    ('max pooling (LPIPS-VGG)', lambda op: 'max_pool' in op),
    ('group norm and SiLU', lambda op: 'group_norm' in op or 'silu' in op),
)


def profile_step(cfg: BenchConfig, lpips_net, steps: int = 4, warmup: int = 1) -> list[str]:
    """``torch.profiler`` over ``steps`` full-resolution ``PlainLoop`` steps: CPU self time per group of ops."""
    from torch.profiler import ProfilerActivity, profile

    if cfg.device != 'cpu':
        raise ValueError('--profile breaks down CPU time; run it with --device cpu.')
    loop = build_contender('plain', cfg, lpips_net, warmup + steps).loop
    full = [step for step in range(1000) if draw(step)[0] == Branch.FULL_RES][: warmup + steps]
    for step in full[:warmup]:
        loop.step(step, images_for_step(step, cfg))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for step in full[warmup:]:
            loop.step(step, images_for_step(step, cfg))
        seconds = (time.perf_counter() - start) / steps
    events = prof.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    grouped = dict.fromkeys([group for group, _ in _PROFILE_GROUPS] + ['everything else (element-wise, copies)'], 0.0)
    for event in events:
        op = event.key.lower()
        group = next((g for g, match in _PROFILE_GROUPS if match(op)), 'everything else (element-wise, copies)')
        grouped[group] += event.self_cpu_time_total
    lines = [
        f'PlainLoop, {cfg.resolution} px, width {cfg.width}, batch {cfg.batch_size}, full resolution, '
        f'{torch.get_num_threads()} thread(s), Adam kernel {cfg.adam_kernel}: {steps} steps of {seconds:.2f} s '
        f'(under the profiler); share of CPU self time:'
    ]
    lines += [f'  {group:<46s}{100 * us / total:5.1f}%' for group, us in grouped.items()]
    lines += ['top ops by self CPU time:', events.table(sort_by='self_cpu_time_total', row_limit=12)]
    return lines
