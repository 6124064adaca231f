"""Training-step benchmark: ours vs the reference's two-optimizer step, side by side in one process.

    python scripts/bench_train.py                       # 128 and 256 px, about 10 minutes on a loaded 2-core CPU
    python scripts/bench_train.py --smoke               # tiny, under a minute: checks that the benchmark runs
    python scripts/bench_train.py --device cuda --width 128 --resolutions 256   # SD-VAE itself, bf16 autocast
    python scripts/bench_train.py --flops               # analytic FLOPs of one SD-VAE step at 256 px (meta device)
    python scripts/bench_train.py --profile --resolutions 128   # where a full-resolution step's CPU time goes

Contenders (``eqvae_composer/benchmarks/train_step.py`` describes each): ``ours`` (the Composer Trainer with
``EquivarianceAlgorithm()``), ``reference`` (the reference's two-optimizer step, with our Adam kernel,
``--adam-kernel``), ``reference_shipped`` (the same with ``torch.optim.Adam``'s defaults: ours /
reference_shipped is the as-shipped ratio), ``ours_eq_off``, ``plain`` and, only with ``--contenders``,
``ours_ckpt`` (gradient checkpointing). They train the same model on the same images with the same
EQ-VAE draws and alternate; the ratios are medians of per-repetition ratios. Peak memory is measured
per contender in a fresh subprocess (CPU: the process's peak RSS above what it held before building the
contender; CUDA: ``torch.cuda.max_memory_allocated``).

LPIPS is ``lpips.LPIPS(net='vgg')`` with a *randomly initialised* VGG16 (the real weights are not
available offline): the same FLOPs as the real perceptual loss, meaningless values.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from eqvae_composer.benchmarks.flops import count_step_flops  # noqa: E402
from eqvae_composer.benchmarks.profiling import profile_step, time_adam_kernels  # noqa: E402
from eqvae_composer.benchmarks.train_step import (  # noqa: E402
    ADAM_KERNELS,
    CONTENDERS,
    DEFAULT_CONTENDERS,
    TARGETS,
    bench_resolution,
    measure_memory,
)
from eqvae_composer.benchmarks.workload import BenchConfig, random_lpips, sd_vae_config  # noqa: E402


def _memory_in_subprocess(name: str, cfg: BenchConfig, args: argparse.Namespace) -> dict[str, float]:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        '--memory-child',
        name,
        '--resolutions',
        str(cfg.resolution),
        '--batch-size',
        str(cfg.batch_size),
        '--width',
        str(cfg.width),
        '--layers-per-block',
        str(cfg.layers_per_block),
        '--disc-filters',
        str(cfg.disc_filters),
        '--disc-layers',
        str(cfg.disc_layers),
        '--device',
        cfg.device,
        '--threads',
        str(args.threads),
    ]
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
    print(f'{"contender":<18}{"images/s (median)":>20}{"peak MiB":>12}')
    for name, value in median.items():
        mem = f'{memory[name]["peak_mib"]:.0f}' if memory and name in memory else '-'
        print(f'{name:<18}{value:>20.3f}{mem:>12}')
    kernel = result.get('adam_kernel', 'fused')
    notes = {
        'ours/reference': f'equal Adam kernels ({kernel})',
        'ours/reference_shipped': f'as shipped: ours {kernel} Adam, the reference torch.optim.Adam()',
    }
    for a, b, target, _ in TARGETS:
        key = f'{a}/{b}'
        if key in result['ratios']:
            ratio = result['ratios'][key]
            verdict = '' if target is None else f'  (target >= {target}x: {"met" if ratio >= target else "MISSED"})'
            note = f'  [{notes[key]}]' if key in notes else ''
            print(f'{key:<24} {ratio:6.3f}x{verdict}{note}')
    if memory and 'ours' in memory and 'reference' in memory:
        ours, ref = memory['ours']['peak_mib'], memory['reference']['peak_mib']
        print(f'{"peak memory ours/ref":<24} {ours / ref:6.3f}   (target <= 1: {"met" if ours <= ref else "MISSED"})')
    if memory and 'ours' in memory and 'ours_ckpt' in memory:
        print(f'{"peak memory ours_ckpt/ours":<24} {memory["ours_ckpt"]["peak_mib"] / memory["ours"]["peak_mib"]:6.3f}')


# --- entry point ---------------------------------------------------------------------------------------


def _config(args: argparse.Namespace, resolution: int) -> BenchConfig:
    return BenchConfig(
        width=args.width,
        layers_per_block=args.layers_per_block,
        disc_filters=args.disc_filters,
        disc_layers=args.disc_layers,
        batch_size=args.batch_size,
        resolution=resolution,
        lpips=not args.no_lpips,
        channels_last=args.channels_last,
        adam_kernel=args.adam_kernel,
        device=args.device,
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--resolutions', type=int, nargs='+', default=[128, 256])
    parser.add_argument('--reps', type=int, default=4, help='repetitions (alternating contenders)')
    parser.add_argument('--steps', type=int, default=3, help='optimizer steps per contender per repetition')
    parser.add_argument('--warmup', type=int, default=1, help='untimed steps per contender first')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--width', type=int, default=16, help="base width (SD-VAE's is 128)")
    parser.add_argument(
        '--threads',
        type=int,
        default=1,
        help='CPU threads (default 1: on a shared, oversubscribed machine, two OpenMP threads '
        'waiting on each other at every barrier make timings erratic)',
    )
    parser.add_argument('--layers-per-block', type=int, default=2)
    parser.add_argument('--disc-filters', type=int, default=64)
    parser.add_argument('--disc-layers', type=int, default=3)
    parser.add_argument(
        '--contenders',
        nargs='+',
        default=list(DEFAULT_CONTENDERS),
        choices=CONTENDERS,
        help='ours_ckpt: ours with gradient checkpointing (not run by default)',
    )
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--no-lpips', action='store_true', help='drop the perceptual term (faster, less faithful)')
    parser.add_argument('--channels-last', action='store_true', help='every contender in channels_last')
    parser.add_argument(
        '--adam-kernel',
        choices=ADAM_KERNELS,
        default='fused',
        help="every contender's Adam kernel (reference_shipped always PyTorch's default): fused "
        "(train.py's), or default (torch.optim.Adam's choice). Default: fused",
    )
    parser.add_argument(
        '--reference-bf16',
        action='store_true',
        help='on CUDA, run the reference under bf16 autocast too (default: fp32, as the reference)',
    )
    parser.add_argument('--memory', choices=('subprocess', 'none'), default='subprocess')
    parser.add_argument('--smoke', action='store_true', help='tiny and fast, for CI: checks that everything runs')
    parser.add_argument('--flops', action='store_true', help='print the FLOP count of an SD-VAE step and exit')
    parser.add_argument('--adam', action='store_true', help="time Adam's kernels on the model's parameters and exit")
    parser.add_argument(
        '--profile',
        action='store_true',
        help='profile full-resolution PlainLoop steps (torch.profiler, first resolution) and exit',
    )
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
        print(
            'LPIPS: lpips.LPIPS(net="vgg") with a RANDOM VGG16 (real weights are offline-unavailable); '
            'same FLOPs, meaningless values.'
        )
    results: dict[str, Any] = {'environment': env, 'args': vars(args), 'resolutions': {}}
    for resolution in args.resolutions:
        cfg = _config(args, resolution)
        print(
            f'== {resolution} px: batch {cfg.batch_size}, SD-VAE layout at width {cfg.width} '
            f'(block_out_channels {sd_vae_config(cfg.width)["block_out_channels"]}), '
            f'{args.reps} reps x {args.steps} steps (+{args.warmup} warm-up) per contender'
        )
        result = bench_resolution(
            cfg, args.reps, args.steps, args.warmup, args.contenders, lpips_net, args.reference_bf16
        )
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
