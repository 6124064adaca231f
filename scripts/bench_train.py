"""Training-step benchmark: ours vs the reference's two-optimizer step, side by side in one process.

    python scripts/bench_train.py                       # 128 and 256 px, about 10 minutes on a loaded 2-core CPU
    python scripts/bench_train.py --smoke               # tiny, under a minute: checks that the benchmark runs
    python scripts/bench_train.py --device cuda --width 128 --resolutions 256   # SD-VAE itself, bf16 autocast
    python scripts/bench_train.py --flops               # analytic FLOPs of one SD-VAE step at 256 px (meta device)
    python scripts/bench_train.py --profile --resolutions 128   # where a full-resolution step's CPU time goes

The contenders train the same model (same initial weights), on the same images, with the same
sequence of EQ-VAE branches and transforms (drawn exactly as ``EquivarianceAlgorithm`` draws them):

* ``ours``: the Composer Trainer with ``EquivarianceAlgorithm()`` and the full loss (one forward, one backward);
* ``reference``: a plain PyTorch loop written here the way the reference (LDM ``AutoencoderKL`` +
  ``LPIPSWithDiscriminator`` under PyTorch Lightning 1.4) steps: two optimizers, a full forward for
  the autoencoder step and another for the discriminator step (with its own fresh transform),
  adaptive weight from ``autograd.grad`` w.r.t. the decoder's last weight; with the same Adam kernel
  as ours (``--adam-kernel``, default ``fused``), so the ratio measures the step, not the kernel;
* ``reference_shipped``: the same loop with ``torch.optim.Adam``'s defaults, as the reference ships
  (PyTorch picks the kernel: a per-tensor for-loop on CPU, foreach on CUDA); ours / reference_shipped
  is the as-shipped ratio;
* ``ours_eq_off``: the same Trainer without the algorithm (full resolution every step);
* ``plain``: our model and loss with the algorithm's transforms applied by hand, no Composer;
* ``ours_ckpt`` (only with ``--contenders``): ``ours`` with gradient checkpointing.

The contenders alternate (the order rotates every repetition) and each repetition times ``--steps``
optimizer steps of each; the ratios are medians over repetitions of per-repetition ratios, so load
from other jobs on a shared machine hits both sides of a ratio. Peak memory is measured per
contender in a fresh subprocess (CPU: the process's peak RSS above what it held before building the
contender; CUDA: ``torch.cuda.max_memory_allocated``).

LPIPS is ``lpips.LPIPS(net='vgg')`` with a *randomly initialised* VGG16 (the real weights are not
available offline): the same FLOPs as the real perceptual loss, meaningless values.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._python_dispatch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eqvae_composer.algorithms.equivariance import EquivarianceAlgorithm  # noqa: E402
from eqvae_composer.algorithms.equivariance.transforms import (  # noqa: E402
    Branch,
    SpatialTransform,
    apply_to_image,
    apply_to_latent,
    downscale_image,
)
from eqvae_composer.introspection import latent_entry_point  # noqa: E402
from eqvae_composer.models import ComposerAutoencoderKL, VAEGANLoss  # noqa: E402
from eqvae_composer.train import OptimizerConfig, build_optimizer  # noqa: E402

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
SEED = 17
P_EQUIVARIANCE, P_LOWRES = 0.5, 0.25  # the reference's mix, EquivarianceAlgorithm()'s defaults


# --- model, data, transforms ----------------------------------------------------------------------

def sd_vae_config(width: int = 32, layers_per_block: int = 2, resolution: int = 256) -> dict[str, Any]:
    """SD-VAE's layout (kl-f8: 4 blocks, x1 x2 x4 x4 channels, mid-block attention) at base ``width``.

    ``width=128`` is SD-VAE itself; group norm keeps SD-VAE's 4 channels per group in the first block.
    """
    return {
        'in_channels': 3,
        'out_channels': 3,
        'down_block_types': ['DownEncoderBlock2D'] * 4,
        'up_block_types': ['UpDecoderBlock2D'] * 4,
        'block_out_channels': [width, 2 * width, 4 * width, 4 * width],
        'layers_per_block': layers_per_block,
        'latent_channels': 4,
        'norm_num_groups': max(1, width // 4),
        'sample_size': resolution,
    }


def random_lpips() -> torch.nn.Module:
    """LPIPS-VGG's exact network with random VGG weights (calibration layers from the lpips package)."""
    import lpips

    net = lpips.LPIPS(net='vgg', pretrained=True, pnet_rand=True, verbose=False)
    return net.eval().requires_grad_(False)


@dataclass
class BenchConfig:
    width: int = 32
    layers_per_block: int = 2
    disc_filters: int = 64
    disc_layers: int = 3
    batch_size: int = 2
    resolution: int = 128
    lpips: bool = True
    lr: float = 1e-4
    channels_last: bool = False
    adam_kernel: str = 'fused'  # every contender's (ADAM_KERNELS); reference_shipped always uses 'default'
    gradient_checkpointing: bool = False
    device: str = 'cpu'


def build_model(cfg: BenchConfig, lpips_net: torch.nn.Module | None, sample_posterior: bool = True,
                seed: int = SEED) -> ComposerAutoencoderKL:
    """The model every contender trains; the same ``seed`` gives the same initial weights."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(sd_vae_config(cfg.width, cfg.layers_per_block, cfg.resolution))
    loss = VAEGANLoss(lpips=lpips_net, lpips_weight=1.0 if lpips_net is not None else 0.0,
                      disc_num_filters=cfg.disc_filters, disc_num_layers=cfg.disc_layers)
    model = ComposerAutoencoderKL(vae, loss, sample_posterior=sample_posterior,
                                  gradient_checkpointing=cfg.gradient_checkpointing).to(cfg.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def sample_image(index: int, cfg: BenchConfig) -> torch.Tensor:
    """Image ``index`` of the run (step ``index // batch_size``, row ``index % batch_size``), in [-1, 1]."""
    generator = torch.Generator().manual_seed(1000 + index)
    return torch.rand(3, cfg.resolution, cfg.resolution, generator=generator) * 2 - 1


def images_for_step(step: int, cfg: BenchConfig) -> torch.Tensor:
    """The batch of step ``step``: the same for every contender (content does not change the cost)."""
    return torch.stack([sample_image(step * cfg.batch_size + row, cfg) for row in range(cfg.batch_size)])


class _StepImages(torch.utils.data.Dataset):
    """``images_for_step`` through a DataLoader, one image per ``__getitem__`` (the Trainer's data)."""

    def __init__(self, cfg: BenchConfig, num_steps: int) -> None:
        self.cfg, self.num_steps = cfg, num_steps

    def __len__(self) -> int:
        return self.num_steps * self.cfg.batch_size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {'image': sample_image(index, self.cfg)}


def draw(step: int, microbatch: int = 0, p_equivariance: float = P_EQUIVARIANCE,
         seed: int = SEED) -> tuple[Branch, SpatialTransform]:
    """The branch and transform ``EquivarianceAlgorithm()`` draws for (step, microbatch) under ``seed``."""
    return EquivarianceAlgorithm(p_equivariance=p_equivariance, p_lowres=P_LOWRES).draw(seed, step, microbatch)


# --- the reference's step, written the way LDM + Lightning 1.4 run it ---------------------------------

def _reference_forward(model: ComposerAutoencoderKL, images: torch.Tensor, branch: Branch,
                       tau: SpatialTransform, sample_posterior: bool = True):
    """LDM ``AutoencoderKL.forward`` with EQ-VAE's transform: encode, sample, tau(z), decode; and tau(x)."""
    vae, factor = model.vae, model.downsample_factor
    if branch == Branch.LOW_RES:
        images = downscale_image(images, tau.scale_h, tau.scale_w, factor)
    posterior = vae.encode(images).latent_dist
    z = posterior.sample() if sample_posterior else posterior.mode()
    target = images
    if branch == Branch.EQUIVARIANCE:
        z = apply_to_latent(z, tau).contiguous()
        target = apply_to_image(images, tau, factor)
    return target, vae.decode(z).sample, posterior


def reference_generator_loss(model: ComposerAutoencoderKL, x: torch.Tensor, x_hat: torch.Tensor,
                             posterior) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``LPIPSWithDiscriminator.forward(optimizer_idx=0)``: nll + kl + adaptive-weighted generator loss."""
    loss = model.loss_fn
    rec = (x - x_hat).abs()
    if loss.lpips_weight > 0:
        rec = rec + loss.lpips_weight * loss.lpips(x, x_hat)
    nll = rec / torch.exp(loss.logvar) + loss.logvar
    nll = nll.sum() / nll.shape[0]
    kl = posterior.kl().sum() / x.shape[0]
    g = -loss.discriminator(x_hat).mean()
    last = model.vae.decoder.conv_out.weight
    nll_grads = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g, last, retain_graph=True)[0]
    d_weight = torch.clamp(nll_grads.norm() / (g_grads.norm() + 1e-4), 0.0, 1e4).detach() * loss.disc_weight
    total = nll + loss.kl_weight * kl + d_weight * loss.disc_factor * g
    return total, {'nll': nll, 'kl': kl, 'g': g, 'disc_weight': d_weight}


def reference_discriminator_loss(model: ComposerAutoencoderKL, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """``LPIPSWithDiscriminator.forward(optimizer_idx=1)``: hinge loss on detached images."""
    disc = model.loss_fn.discriminator
    logits_real, logits_fake = disc(x.detach()), disc(x_hat.detach())
    return model.loss_fn.disc_factor * 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def _toggle(params_on: Sequence[torch.nn.Parameter], params_off: Sequence[torch.nn.Parameter]) -> None:
    # Lightning's toggle_optimizer: only the current optimizer's parameters require grad.
    for p in params_off:
        p.requires_grad_(False)
    for p in params_on:
        p.requires_grad_(True)


class ReferenceLoop:
    """Two Adam optimizers and two full forwards per batch, as the reference trains."""

    def __init__(self, model: ComposerAutoencoderKL, cfg: BenchConfig, autocast: Callable[[], Any],
                 sample_posterior: bool = True, p_equivariance: float = P_EQUIVARIANCE) -> None:
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
        _toggle(self.ae_params, self.disc_params)
        branch, tau = draw(step, 0, self.p_equivariance)
        with self.autocast():
            x, x_hat, posterior = _reference_forward(self.model, images, branch, tau, self.sample_posterior)
        ae_loss, terms = reference_generator_loss(self.model, x.float(), x_hat.float(), posterior)
        self.opt_ae.zero_grad()
        ae_loss.backward()
        self.opt_ae.step()
        # optimizer_idx 1: the discriminator, after a second full forward with a fresh transform
        _toggle(self.disc_params, self.ae_params)
        branch, tau = draw(step, 1, self.p_equivariance)
        with self.autocast():
            x, x_hat, _ = _reference_forward(self.model, images, branch, tau, self.sample_posterior)
        d_loss = reference_discriminator_loss(self.model, x.float(), x_hat.float())
        self.opt_disc.zero_grad()
        d_loss.backward()
        self.opt_disc.step()
        _toggle(self.ae_params + self.disc_params, [])
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

    def __init__(self, model: ComposerAutoencoderKL, cfg: BenchConfig, autocast: Callable[[], Any],
                 p_equivariance: float = P_EQUIVARIANCE) -> None:
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
                lambda module, args: (apply_to_latent(args[0], tau).contiguous(), *args[1:]))
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
                _sync(cfg.device)
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


def _sync(device: str) -> None:
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
        _sync(self.cfg.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.loop.step(self.next_step, images_for_step(self.next_step, self.cfg))
            self.next_step += 1
        _sync(self.cfg.device)
        return time.perf_counter() - start


def build_contender(name: str, cfg: BenchConfig, lpips_net, total_steps: int, reference_bf16: bool = False):
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


# --- peak memory, one fresh process per contender ---------------------------------------------------------

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
    is fixed, as ``_memory_in_subprocess`` does. CUDA: ``torch.cuda.max_memory_allocated`` above the
    same point.
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


def _memory_in_subprocess(name: str, cfg: BenchConfig, args: argparse.Namespace) -> dict[str, float]:
    cmd = [sys.executable, os.path.abspath(__file__), '--memory-child', name, '--resolutions', str(cfg.resolution),
           '--batch-size', str(cfg.batch_size), '--width', str(cfg.width), '--layers-per-block',
           str(cfg.layers_per_block), '--disc-filters', str(cfg.disc_filters), '--disc-layers', str(cfg.disc_layers),
           '--device', cfg.device, '--threads', str(args.threads)]
    cmd += ['--no-lpips'] if not cfg.lpips else []
    cmd += ['--channels-last'] if cfg.channels_last else []
    cmd += ['--adam-kernel', cfg.adam_kernel]
    cmd += ['--reference-bf16'] if args.reference_bf16 else []
    # glibc raises its mmap threshold after large frees and then keeps freed tensor memory in the heap,
    # so RSS would count memory no tensor uses (it moved peaks by ~30% between identical runs). A fixed
    # threshold makes every large tensor an mmap returned on free: RSS follows live tensors.
    env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': str(128 * 1024)}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


# --- the benchmark --------------------------------------------------------------------------------------

def bench_resolution(cfg: BenchConfig, reps: int, steps: int, warmup: int, contenders: Sequence[str],
                     lpips_net, reference_bf16: bool = False, log=print) -> dict[str, Any]:
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
        log(f'  [{cfg.resolution}px] rep {rep + 1}/{reps}: '
            + ', '.join(f'{n} {ips[n][-1]:.2f} img/s' for n in contenders))
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
        'ratios': {f'{a}/{b}': statistics.median(x / y for x, y in zip(ips[a], ips[b]))
                   for a, b, _, _ in TARGETS if a in ips and b in ips},
        'timed_branches': {b.name: branches.count(int(b)) for b in Branch},
        'adam_kernel': cfg.adam_kernel,
    }


def _environment(device: str) -> dict[str, Any]:
    import composer
    import diffusers

    env = {
        'date': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
        'python': platform.python_version(),
        'torch': torch.__version__,
        'composer': composer.__version__,
        'diffusers': diffusers.__version__,
        'threads': torch.get_num_threads(),
        'nproc': os.cpu_count(),
        'loadavg': os.getloadavg(),
    }
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo') as f:
            env['cpu'] = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), '?')
    if device == 'cuda':
        env['gpu'] = torch.cuda.get_device_name()
    return env


def _print_table(result: dict[str, Any], memory: dict[str, Any] | None) -> None:
    median = result['median_images_per_second']
    print(f"{'contender':<18}{'images/s (median)':>20}{'peak MiB':>12}")
    for name, value in median.items():
        mem = f"{memory[name]['peak_mib']:.0f}" if memory and name in memory else '-'
        print(f'{name:<18}{value:>20.3f}{mem:>12}')
    kernel = result.get('adam_kernel', 'fused')
    notes = {'ours/reference': f'equal Adam kernels ({kernel})',
             'ours/reference_shipped': f'as shipped: ours {kernel} Adam, the reference torch.optim.Adam()'}
    for a, b, target, _ in TARGETS:
        key = f'{a}/{b}'
        if key in result['ratios']:
            ratio = result['ratios'][key]
            verdict = '' if target is None else f'  (target >= {target}x: {"met" if ratio >= target else "MISSED"})'
            note = f'  [{notes[key]}]' if key in notes else ''
            print(f'{key:<24} {ratio:6.3f}x{verdict}{note}')
    if memory and 'ours' in memory and 'reference' in memory:
        ours, ref = memory['ours']['peak_mib'], memory['reference']['peak_mib']
        print(f"{'peak memory ours/ref':<24} {ours / ref:6.3f}   (target <= 1: {'met' if ours <= ref else 'MISSED'})")
    if memory and 'ours' in memory and 'ours_ckpt' in memory:
        print(f"{'peak memory ours_ckpt/ours':<24} {memory['ours_ckpt']['peak_mib'] / memory['ours']['peak_mib']:6.3f}")


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
        for name in list(kernels)[rep % 3:] + list(kernels)[:rep % 3]:
            optimizer = torch.optim.Adam(params, lr=cfg.lr, betas=(0.5, 0.9), **kernels[name])
            optimizer.step()  # allocates the state
            _sync(cfg.device)
            start = time.perf_counter()
            for _ in range(steps):
                optimizer.step()
            _sync(cfg.device)
            times[name].append((time.perf_counter() - start) / steps * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


# --- where the step's time goes -----------------------------------------------------------------------

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
    loop = PlainLoop(build_model(cfg, lpips_net), cfg, _autocast(cfg))
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
    lines = [f'PlainLoop, {cfg.resolution} px, width {cfg.width}, batch {cfg.batch_size}, full resolution, '
             f'{torch.get_num_threads()} thread(s), Adam kernel {cfg.adam_kernel}: {steps} steps of {seconds:.2f} s '
             f'(under the profiler); share of CPU self time:']
    lines += [f'  {group:<46s}{100 * us / total:5.1f}%' for group, us in grouped.items()]
    lines += ['top ops by self CPU time:', events.table(sort_by='self_cpu_time_total', row_limit=12)]
    return lines


# --- analytic FLOPs ------------------------------------------------------------------------------------

class _FlopCounter(torch.utils._python_dispatch.TorchDispatchMode):
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
        if func._overloadpacket in flop_registry:
            self.total += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        return out


def count_step_flops(width: int = 128, resolution: int = 256, batch_size: int = 1, device: str = 'meta'
                     ) -> dict[str, float]:
    """FLOPs of one training step per image (``torch.utils.flop_counter``'s formulas), on the meta device.

    Returns per-image GFLOPs of: the VAE forward and backward alone, ours at full resolution, the
    reference's step at full resolution (both forwards), and the expected FLOPs of ours and the
    reference over EQ-VAE's branch mix (average over the scale grid).
    """
    from eqvae_composer.algorithms.equivariance.transforms import GRID_SCALES

    cfg = BenchConfig(width=width, resolution=resolution, batch_size=batch_size, device=device)
    with torch.device(device):
        lpips_net = random_lpips().to(device)  # its scaling buffers are built with the legacy constructor
        model = build_model(cfg, lpips_net, seed=0)
    images = torch.zeros(batch_size, 3, resolution, resolution, device=device)

    def ours(branch: Branch, tau: SpatialTransform) -> float:
        x = images
        if branch == Branch.LOW_RES:
            x = downscale_image(x, tau.scale_h, tau.scale_w, 8)
        entry = latent_entry_point(model.vae)
        hook = entry.register_forward_pre_hook(lambda m, a: (apply_to_latent(a[0], tau).contiguous(), *a[1:])) \
            if branch == Branch.EQUIVARIANCE else None
        with _FlopCounter() as counter:
            outputs = model({'image': x})
            target = apply_to_image(x, tau, 8) if branch == Branch.EQUIVARIANCE else x
            # the loss's autocast guard has no meta-device variant: call its body directly
            model.loss_fn._losses(target, outputs['reconstruction'], outputs['posterior'], model.vae.decoder.conv_out,
                                  outputs['last_layer_input'], 0)['total'].backward()
        if hook is not None:
            hook.remove()
        return counter.total / batch_size / 1e9

    groups = model.param_groups(1e-4)
    ae_params, disc_params = groups[0]['params'], groups[1]['params']

    def reference_half(half: str, branch: Branch, tau: SpatialTransform) -> float:
        with _FlopCounter() as counter:
            if half == 'ae':
                _toggle(ae_params, disc_params)
                x, x_hat, posterior = _reference_forward(model, images, branch, tau)
                reference_generator_loss(model, x, x_hat, posterior)[0].backward()
            else:
                _toggle(disc_params, ae_params)
                x, x_hat, _ = _reference_forward(model, images, branch, tau)
                reference_discriminator_loss(model, x, x_hat).backward()
            _toggle(ae_params + disc_params, [])
        return counter.total / batch_size / 1e9

    def vae_only() -> float:
        with _FlopCounter() as counter:
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


# --- entry point ---------------------------------------------------------------------------------------

def _config(args: argparse.Namespace, resolution: int) -> BenchConfig:
    return BenchConfig(width=args.width, layers_per_block=args.layers_per_block, disc_filters=args.disc_filters,
                       disc_layers=args.disc_layers, batch_size=args.batch_size, resolution=resolution,
                       lpips=not args.no_lpips, channels_last=args.channels_last, adam_kernel=args.adam_kernel,
                       device=args.device)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--resolutions', type=int, nargs='+', default=[128, 256])
    parser.add_argument('--reps', type=int, default=4, help='repetitions (alternating contenders)')
    parser.add_argument('--steps', type=int, default=3, help='optimizer steps per contender per repetition')
    parser.add_argument('--warmup', type=int, default=1, help='untimed steps per contender first')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--width', type=int, default=16, help="base width (SD-VAE's is 128)")
    parser.add_argument('--threads', type=int, default=1,
                        help='CPU threads (default 1: on a shared, oversubscribed machine, two OpenMP threads '
                             'waiting on each other at every barrier make timings erratic)')
    parser.add_argument('--layers-per-block', type=int, default=2)
    parser.add_argument('--disc-filters', type=int, default=64)
    parser.add_argument('--disc-layers', type=int, default=3)
    parser.add_argument('--contenders', nargs='+', default=list(DEFAULT_CONTENDERS), choices=CONTENDERS,
                        help='ours_ckpt: ours with gradient checkpointing (not run by default)')
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--no-lpips', action='store_true', help='drop the perceptual term (faster, less faithful)')
    parser.add_argument('--channels-last', action='store_true', help='every contender in channels_last')
    parser.add_argument('--adam-kernel', choices=ADAM_KERNELS, default='fused',
                        help="every contender's Adam kernel (reference_shipped always PyTorch's default): fused "
                             "(train.py's), or default (torch.optim.Adam's choice). Default: fused")
    parser.add_argument('--reference-bf16', action='store_true',
                        help='on CUDA, run the reference under bf16 autocast too (default: fp32, as the reference)')
    parser.add_argument('--memory', choices=('subprocess', 'none'), default='subprocess')
    parser.add_argument('--smoke', action='store_true', help='tiny and fast, for CI: checks that everything runs')
    parser.add_argument('--flops', action='store_true', help='print the FLOP count of an SD-VAE step and exit')
    parser.add_argument('--adam', action='store_true', help="time Adam's kernels on the model's parameters and exit")
    parser.add_argument('--profile', action='store_true',
                        help="profile full-resolution PlainLoop steps (torch.profiler, first resolution) and exit")
    parser.add_argument('--json', help='also write the results here')
    parser.add_argument('--memory-child', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.resolutions, args.reps, args.steps, args.warmup = [64], 2, 1, 1
        args.width, args.layers_per_block, args.batch_size, args.disc_filters, args.disc_layers = 8, 1, 1, 8, 2
        args.memory = 'none'

    if args.adam:
        if args.device == 'cpu':
            torch.set_num_threads(args.threads)
        adam = time_adam_kernels(_config(args, args.resolutions[0]))
        print(json.dumps({'adam_step_ms': adam, 'params': 'VAE + discriminator', 'width': args.width}))
        return {'adam_step_ms': adam}
    if args.flops:
        flops = count_step_flops(resolution=args.resolutions[-1])
        print(json.dumps(flops, indent=1))
        return {'flops': flops}

    if args.device == 'cpu':
        torch.set_num_threads(args.threads)
    lpips_net = random_lpips().to(args.device) if not args.no_lpips else None
    if args.profile:
        lines = profile_step(_config(args, args.resolutions[0]), lpips_net)
        print('\n'.join(lines))
        return {'profile': lines}
    if args.memory_child:
        result = measure_memory(args.memory_child, _config(args, args.resolutions[0]), lpips_net, args.reference_bf16)
        print(json.dumps(result))
        return result

    env = _environment(args.device)
    print(json.dumps(env))
    if lpips_net is not None:
        print('LPIPS: lpips.LPIPS(net="vgg") with a RANDOM VGG16 (real weights are offline-unavailable); '
              'same FLOPs, meaningless values.')
    results: dict[str, Any] = {'environment': env, 'args': vars(args), 'resolutions': {}}
    for resolution in args.resolutions:
        cfg = _config(args, resolution)
        print(f'== {resolution} px: batch {cfg.batch_size}, SD-VAE layout at width {cfg.width} '
              f'(block_out_channels {sd_vae_config(cfg.width)["block_out_channels"]}), '
              f'{args.reps} reps x {args.steps} steps (+{args.warmup} warm-up) per contender')
        result = bench_resolution(cfg, args.reps, args.steps, args.warmup, args.contenders, lpips_net,
                                  args.reference_bf16)
        memory = None
        if args.memory == 'subprocess':
            memory = {name: _memory_in_subprocess(name, cfg, args) for name in args.contenders}
            result['memory'] = memory
        print(f'timed branches: {result["timed_branches"]}')
        _print_table(result, memory)
        results['resolutions'][resolution] = result
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == '__main__':
    main()
