"""The training-step benchmark's contenders, and how their speed and memory are measured.

The contenders train the same model (same initial weights), on the same images, with the same
sequence of EQ-VAE branches and transforms (``eqvae_composer.benchmarks.workload``):

* ``ours``: the Composer Trainer with ``EquivarianceAlgorithm()`` and the full loss (one forward, one backward);
* ``reference``: a plain PyTorch loop stepping the way the reference (LDM ``AutoencoderKL`` +
  ``LPIPSWithDiscriminator`` under PyTorch Lightning 1.4) steps: two optimizers, a full forward for
  the autoencoder step and another for the discriminator step (with its own fresh transform),
  adaptive weight from ``autograd.grad`` w.r.t. the decoder's last weight
  (``eqvae_composer.benchmarks.reference_step``); with the same Adam kernel as ours
  (``BenchConfig.adam_kernel``, default ``fused``), so the ratio measures the step, not the kernel;
* ``reference_shipped``: the same loop with ``torch.optim.Adam``'s defaults, as the reference ships
  (PyTorch picks the kernel: a per-tensor for-loop on CPU, foreach on CUDA);
* ``ours_eq_off``: the same Trainer without the algorithm (full resolution every step);
* ``plain``: our model and loss with the algorithm's transforms applied by hand, no Composer;
* ``ours_ckpt``: ``ours`` with gradient checkpointing.

``bench_resolution`` alternates them (the order rotates every repetition) and times ``steps``
optimizer steps of each per repetition; its ratios are medians of per-repetition ratios, so load
from other jobs on a shared machine hits both sides of a ratio. ``measure_memory`` gives one
contender's peak memory, in a process of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from eqvae_composer.algorithms.equivariance import EquivarianceAlgorithm
from eqvae_composer.algorithms.equivariance.transforms import (
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
from eqvae_composer.benchmarks.workload import (
    P_EQUIVARIANCE,
    SEED,
    BenchConfig,
    build_model,
    draw,
    images_for_step,
    sample_image,
)
from eqvae_composer.introspection import latent_entry_point
from eqvae_composer.models import ComposerAutoencoderKL
from eqvae_composer.train import OptimizerConfig, build_optimizer

__all__ = [
    'ADAM_KERNELS',
    'CONTENDERS',
    'DEFAULT_CONTENDERS',
    'TARGETS',
    'PlainLoop',
    'ReferenceLoop',
    'TrainerLoop',
    'bench_resolution',
    'build_contender',
    'make_optimizer',
    'measure_memory',
    'memory_steps',
    'sync',
]

CONTENDERS = ('ours', 'reference', 'reference_shipped', 'ours_eq_off', 'plain', 'ours_ckpt')
DEFAULT_CONTENDERS = CONTENDERS[:5]
#: ``--adam-kernel`` values: the fused kernel (what train.py builds), or PyTorch's choice (``torch.optim.Adam()``).
ADAM_KERNELS = ('fused', 'default')
#: (numerator, denominator, target ratio, what is compared); a target of None is reported, not judged.
TARGETS = (
    ('ours', 'reference', 1.4, 'images/s'),
    ('ours', 'reference_shipped', None, 'images/s'),
    ('ours', 'ours_eq_off', 1.0, 'images/s'),
    ('ours', 'plain', 0.95, 'images/s'),
    ('ours_ckpt', 'ours', None, 'images/s'),
)


# --- the reference's step ---------------------------------------------------------------------------


class ReferenceLoop:
    """Two Adam optimizers and two full forwards per batch, as the reference trains."""

    def __init__(
        self,
        model: ComposerAutoencoderKL,
        cfg: BenchConfig,
        autocast: Callable[[], Any],
        sample_posterior: bool = True,
        p_equivariance: float = P_EQUIVARIANCE,
    ) -> None:
        self.model, self.cfg, self.autocast = model, cfg, autocast
        self.sample_posterior, self.p_equivariance = sample_posterior, p_equivariance
        groups = model.param_groups(cfg.lr)
        self.ae_params, self.disc_params = groups[0]['params'], groups[1]['params']
        kwargs = {'fused': True} if cfg.adam_kernel == 'fused' else {}  # 'default': torch.optim.Adam's defaults
        self.opt_ae = torch.optim.Adam(self.ae_params, lr=cfg.lr, betas=(0.5, 0.9), **kwargs)
        self.opt_disc = torch.optim.Adam(self.disc_params, lr=cfg.lr, betas=(0.5, 0.9), **kwargs)
        model.train()

    def step(self, step: int, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = _to(images, self.cfg)
        # optimizer_idx 0: the autoencoder
        toggle_optimizer(self.ae_params, self.disc_params)
        branch, tau = draw(step, 0, self.p_equivariance)
        with self.autocast():
            x, x_hat, posterior = reference_forward(self.model, images, branch, tau, self.sample_posterior)
        ae_loss, terms = reference_generator_loss(self.model, x.float(), x_hat.float(), posterior)
        self.opt_ae.zero_grad()
        ae_loss.backward()
        self.opt_ae.step()
        # optimizer_idx 1: the discriminator, after a second full forward with a fresh transform
        toggle_optimizer(self.disc_params, self.ae_params)
        branch, tau = draw(step, 1, self.p_equivariance)
        with self.autocast():
            x, x_hat, _ = reference_forward(self.model, images, branch, tau, self.sample_posterior)
        d_loss = reference_discriminator_loss(self.model, x.float(), x_hat.float())
        self.opt_disc.zero_grad()
        d_loss.backward()
        self.opt_disc.step()
        toggle_optimizer(self.ae_params + self.disc_params, [])
        return {'ae': ae_loss.detach(), 'disc': d_loss.detach(), **{k: v.detach() for k, v in terms.items()}}


# --- our math without Composer ----------------------------------------------------------------------


def _to(images: torch.Tensor, cfg: BenchConfig) -> torch.Tensor:
    images = images.to(cfg.device)
    return images.contiguous(memory_format=torch.channels_last) if cfg.channels_last else images


def make_optimizer(model: ComposerAutoencoderKL, cfg: BenchConfig) -> torch.optim.Adam:
    """The single Adam over two parameter groups that ``train.py`` builds, with ``cfg.adam_kernel``."""
    return build_optimizer(model, OptimizerConfig(lr=cfg.lr, fused=cfg.adam_kernel == 'fused'))


class PlainLoop:
    """``ComposerAutoencoderKL`` + ``EquivarianceAlgorithm``'s transforms in a bare loop: one forward, one backward."""

    def __init__(
        self,
        model: ComposerAutoencoderKL,
        cfg: BenchConfig,
        autocast: Callable[[], Any],
        p_equivariance: float = P_EQUIVARIANCE,
    ) -> None:
        self.model, self.cfg, self.autocast, self.p_equivariance = model, cfg, autocast, p_equivariance
        self.optimizer = make_optimizer(model, cfg)
        self.entry = latent_entry_point(model.vae)
        model.train()

    def step(self, step: int, images: torch.Tensor) -> dict[str, torch.Tensor]:
        images = _to(images, self.cfg)
        factor = self.model.downsample_factor
        branch, tau = draw(step, 0, self.p_equivariance)
        model = self.model
        model.global_step = step
        if branch == Branch.LOW_RES:
            images = downscale_image(images, tau.scale_h, tau.scale_w, factor)
        hook = None
        if branch == Branch.EQUIVARIANCE:
            hook = self.entry.register_forward_pre_hook(
                lambda module, args: (apply_to_latent(args[0], tau).contiguous(), *args[1:])
            )
        try:
            with self.autocast():
                outputs = model({'image': images})
        finally:
            if hook is not None:
                hook.remove()
        target = apply_to_image(images, tau, factor) if branch == Branch.EQUIVARIANCE else images
        with self.autocast():
            losses = model.loss(outputs, {'image': target})
        self.optimizer.zero_grad(set_to_none=True)
        losses['total'].backward()
        self.optimizer.step()
        return {k: v.detach() for k, v in losses.items()}


class _StepImages(torch.utils.data.Dataset):
    """``images_for_step`` through a DataLoader, one image per ``__getitem__`` (the Trainer's data)."""

    def __init__(self, cfg: BenchConfig, num_steps: int) -> None:
        self.cfg, self.num_steps = cfg, num_steps

    def __len__(self) -> int:
        return self.num_steps * self.cfg.batch_size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {'image': sample_image(index, self.cfg)}


# --- the Composer Trainer -----------------------------------------------------------------------------


class TrainerLoop:
    """A Composer Trainer, driven ``steps`` batches at a time with ``fit(duration=...)``.

    A callback times each ``fit`` from the first ``BEFORE_DATALOADER`` to the last ``BATCH_END`` (the
    steps themselves, data loading and every event included; ``fit``'s own start-up excluded) and
    records the transform the algorithm drew, so the benchmark can check it matches the other loops.
    """

    def __init__(self, model: ComposerAutoencoderKL, cfg: BenchConfig, total_steps: int, equivariance: bool) -> None:
        from composer import Callback, Trainer

        from eqvae_composer.callbacks import GlobalStepCallback

        self.algorithm = EquivarianceAlgorithm() if equivariance else None
        bench = self

        class _Timer(Callback):
            def before_dataloader(self, state, logger):
                if bench._start is None:
                    bench._start = time.perf_counter()

            def after_loss(self, state, logger):
                if bench.algorithm is not None:
                    bench.drawn.append((bench.algorithm.branch, bench.algorithm.transform))

            def batch_end(self, state, logger):
                sync(cfg.device)
                bench._end = time.perf_counter()

        self.cfg = cfg
        self.drawn: list[tuple[Branch, SpatialTransform]] = []
        self._start: float | None = None
        self._end = 0.0
        loader = torch.utils.data.DataLoader(_StepImages(cfg, total_steps), batch_size=cfg.batch_size)
        self.trainer = Trainer(
            model=model,
            train_dataloader=loader,
            optimizers=make_optimizer(model, cfg),
            max_duration='0ba',
            algorithms=[self.algorithm] if self.algorithm is not None else [],
            callbacks=[GlobalStepCallback(), _Timer()],
            loggers=[],
            device='gpu' if cfg.device == 'cuda' else 'cpu',
            precision='amp_bf16' if cfg.device == 'cuda' else 'fp32',
            seed=SEED,
            progress_bar=False,
            log_to_console=False,
            save_folder=None,
        )

    def run(self, steps: int) -> float:
        self._start = None
        self.trainer.fit(duration=f'{steps}ba')
        return self._end - self._start


def sync(device: str) -> None:
    """Wait for the device's queued work, so that a clock reading after it counts that work."""
    if device == 'cuda':
        torch.cuda.synchronize()


def _autocast(cfg: BenchConfig, reference: bool = False, reference_bf16: bool = False) -> Callable[[], Any]:
    if cfg.device != 'cuda' or (reference and not reference_bf16):
        return contextlib.nullcontext  # CPU runs fp32; the reference trains in fp32
    return lambda: torch.autocast('cuda', dtype=torch.bfloat16)


class _LoopContender:
    def __init__(self, loop: ReferenceLoop | PlainLoop, cfg: BenchConfig) -> None:
        self.loop, self.cfg, self.next_step = loop, cfg, 0

    def run(self, steps: int) -> float:
        sync(self.cfg.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.loop.step(self.next_step, images_for_step(self.next_step, self.cfg))
            self.next_step += 1
        sync(self.cfg.device)
        return time.perf_counter() - start


def build_contender(name: str, cfg: BenchConfig, lpips_net, total_steps: int, reference_bf16: bool = False):
    """Contender ``name`` of ``CONTENDERS``, ready to ``run(steps)`` (returns seconds) for ``total_steps`` in all."""
    if name == 'ours_ckpt':
        cfg = dataclasses.replace(cfg, gradient_checkpointing=True)
    model = build_model(cfg, lpips_net)
    if name in ('ours', 'ours_ckpt'):
        return TrainerLoop(model, cfg, total_steps, equivariance=True)
    if name == 'ours_eq_off':
        return TrainerLoop(model, cfg, total_steps, equivariance=False)
    if name == 'plain':
        return _LoopContender(PlainLoop(model, cfg, _autocast(cfg)), cfg)
    if name in ('reference', 'reference_shipped'):
        if name == 'reference_shipped':
            cfg = dataclasses.replace(cfg, adam_kernel='default')
        return _LoopContender(ReferenceLoop(model, cfg, _autocast(cfg, True, reference_bf16)), cfg)
    raise ValueError(f'unknown contender {name!r}; choose from {CONTENDERS}.')


# --- peak memory, one fresh process per contender (scripts/bench_train.py starts them) ----------------


def _proc_status_kib(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise KeyError(field)


def memory_steps(max_steps: int = 8) -> int:
    """Enough steps from 0 to include a full-resolution step of ours (the largest one)."""
    for step in range(max_steps):
        if draw(step)[0] == Branch.FULL_RES:
            return step + 1
    return max_steps


def measure_memory(name: str, cfg: BenchConfig, lpips_net, reference_bf16: bool = False) -> dict[str, float]:
    """Peak memory of ``memory_steps()`` steps of contender ``name``; meant for a fresh process.

    CPU: peak RSS (``VmHWM``) above the RSS before the contender was built, so it counts weights,
    gradients, optimizer state and activations; RSS follows live tensors when glibc's mmap threshold
    is fixed, as ``scripts/bench_train.py`` does for its memory subprocesses. CUDA:
    ``torch.cuda.max_memory_allocated`` above the same point.
    """
    steps = memory_steps()
    if cfg.device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        # Reset the peak RSS to the current RSS (Linux >= 4.0): building LPIPS's VGG16 (classifier
        # included, then dropped) left a high-water mark that no contender would exceed.
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        base = _proc_status_kib('VmRSS') * 1024
    contender = build_contender(name, cfg, lpips_net, steps, reference_bf16)
    contender.run(steps)
    peak = torch.cuda.max_memory_allocated() if cfg.device == 'cuda' else _proc_status_kib('VmHWM') * 1024
    return {'peak_mib': (peak - base) / 2**20, 'steps': steps}


# --- the benchmark --------------------------------------------------------------------------------------


def bench_resolution(
    cfg: BenchConfig,
    reps: int,
    steps: int,
    warmup: int,
    contenders: Sequence[str],
    lpips_net,
    reference_bf16: bool = False,
    log=print,
) -> dict[str, Any]:
    """Alternate the contenders over ``reps`` repetitions of ``steps`` steps each; per-rep images/s."""
    total = warmup + reps * steps
    built = {name: build_contender(name, cfg, lpips_net, total, reference_bf16) for name in contenders}
    for name, contender in built.items():
        start = time.perf_counter()
        contender.run(warmup)
        log(f'  [{cfg.resolution}px] warm-up {name}: {time.perf_counter() - start:.1f} s')
    ips: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    for rep in range(reps):
        for name in order:
            seconds = built[name].run(steps)
            ips[name].append(steps * cfg.batch_size / seconds)
        log(
            f'  [{cfg.resolution}px] rep {rep + 1}/{reps}: '
            + ', '.join(f'{n} {ips[n][-1]:.2f} img/s' for n in contenders)
        )
        order = order[1:] + order[:1]  # rotate: nobody always runs first (or right after the heaviest)
    # Same branches and transforms in every loop: check ours against the sequence the loops used.
    if 'ours' in built:
        expected = [draw(step) for step in range(total)]
        if built['ours'].drawn != expected:
            raise RuntimeError('the Trainer drew different transforms than the plain loops; the comparison is void.')
    branches = [int(draw(step)[0]) for step in range(warmup, total)]
    return {
        'images_per_second': ips,
        'median_images_per_second': {n: statistics.median(v) for n, v in ips.items()},
        'ratios': {
            f'{a}/{b}': statistics.median(x / y for x, y in zip(ips[a], ips[b]))
            for a, b, _, _ in TARGETS
            if a in ips and b in ips
        },
        'timed_branches': {b.name: branches.count(int(b)) for b in Branch},
        'adam_kernel': cfg.adam_kernel,
    }
