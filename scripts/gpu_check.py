"""Validate and measure the project on a GPU in one run; ``--dry`` runs the same steps, tiny, on the CPU.

    scripts/gpu_check.sh            # on a GPU machine: installs .whl/ (if any), then runs this
    scripts/gpu_check.sh --dry      # CPU, tiny sizes: what CI runs (tests/test_gpu_check.py)

Steps, each a subprocess with its own time limit so that the whole run stays under 8 minutes:

1. the ``cuda`` tests (``tests/test_cuda.py``; all skipped without CUDA);
2. ``bench_train.py --flops`` (meta device, CPU only: it runs alongside the others);
3. ``bench_train.py``: ours vs the reference step at equal Adam kernels (the default), both under bf16
   autocast, the SD-VAE layout (width 128) at 256 px, batch 16, peak memory per contender;
4. ``bench_compile.py``: eager vs ``torch.compile`` and the recompiles of EQ-VAE's latent sizes;
5. a bf16 matrix product's rate, the GPU's achievable bound.

Writes ``gpu_check.json`` (every figure, every step's exit status and time) and ``gpu_check.md`` (a
summary), with each step's log, to ``$OUT`` (default ``./gpu_check_out``): eight files at most, which
is what the lent machine sends back. A step that fails or runs out of time is recorded, not raised;
the exit status is 0 only when every step passed and no test failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / 'scripts'

#: The issue's targets: ours/reference images/s, and ours' images/s as a fraction of the bf16 FLOP bound.
TARGET_RATIO = 1.3
TARGET_FLOP_FRACTION = 0.35
#: H200 (and H100 SXM) dense bf16 tensor-core peak, TFLOP/s: the nominal bound.
NOMINAL_BF16_TFLOPS = 989.0


@dataclass
class Mode:
    """Sizes and time limits (seconds) of one kind of run."""

    name: str
    device: str
    train_args: list[str]
    compile_args: list[str]
    flops_resolution: int
    matmul_size: int
    limits: dict[str, int] = field(default_factory=dict)


# The time limits add up to 450 s (the flops step runs alongside the others); wheels take ~15 s more.
DEVICE = Mode(
    name='device',
    device='cuda',
    train_args=[
        '--width',
        '128',
        '--resolutions',
        '256',
        '--batch-size',
        '16',
        '--reps',
        '5',
        '--steps',
        '5',
        '--warmup',
        '2',
    ],
    compile_args=['--width', '128', '--resolution', '256', '--batch-size', '16', '--reps', '5', '--sizes', '2'],
    flops_resolution=256,
    matmul_size=8192,
    limits={'cuda_tests': 150, 'bench_train': 170, 'bench_compile': 110, 'flops': 400},
)
DRY = Mode(
    name='dry',
    device='cpu',
    train_args=[
        '--width',
        '8',
        '--layers-per-block',
        '1',
        '--disc-filters',
        '8',
        '--disc-layers',
        '2',
        '--resolutions',
        '64',
        '--batch-size',
        '1',
        '--reps',
        '1',
        '--steps',
        '1',
        '--warmup',
        '1',
        '--no-lpips',
    ],
    # eager: dynamo's tracing without inductor's code generation, which takes minutes on a small CPU
    compile_args=['--width', '8', '--resolution', '32', '--reps', '1', '--sizes', '1', '--backend', 'eager'],
    flops_resolution=128,
    matmul_size=256,
    limits={'cuda_tests': 300, 'bench_train': 600, 'bench_compile': 600, 'flops': 900},
)
CONTENDERS = ['ours', 'reference', 'ours_eq_off']


@dataclass
class Step:
    """One subprocess: its command, its log file under ``$OUT``, and what it did."""

    name: str
    command: list[str]
    log: str
    limit: int
    rc: int | None = None
    seconds: float = 0.0
    timed_out: bool = False
    process: subprocess.Popen | None = None
    started: float = 0.0

    def start(self, out: Path, env: dict[str, str]) -> None:
        self.started = time.monotonic()
        with open(out / self.log, 'w') as log:
            log.write('$ ' + ' '.join(self.command) + '\n')
            log.flush()
            # A session of its own: on timeout the whole group goes (the composer launcher's ranks too).
            self.process = subprocess.Popen(
                self.command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def wait(self) -> None:
        assert self.process is not None
        remaining = self.limit - (time.monotonic() - self.started)
        try:
            self.rc = self.process.wait(timeout=max(remaining, 0))
        except subprocess.TimeoutExpired:
            self.timed_out = True
            os.killpg(self.process.pid, signal.SIGKILL)
            self.rc = self.process.wait()
        self.seconds = round(time.monotonic() - self.started, 1)

    def record(self) -> dict[str, Any]:
        return {
            'command': self.command,
            'rc': self.rc,
            'seconds': self.seconds,
            'timed_out': self.timed_out,
            'limit_s': self.limit,
            'log': self.log,
        }


def build_steps(mode: Mode, out: Path) -> dict[str, Step]:
    py = sys.executable
    bench_train = [py, str(SCRIPTS / 'bench_train.py')]
    return {
        'flops': Step(
            'flops',
            bench_train + ['--flops', '--resolutions', str(mode.flops_resolution)],
            'flops.log',
            mode.limits['flops'],
        ),
        'cuda_tests': Step(
            'cuda_tests',
            [
                py,
                '-m',
                'pytest',
                'tests/test_cuda.py',
                '-q',
                '-rfEs',
                '-p',
                'no:cacheprovider',
                f'--junitxml={out / "tests.xml"}',
            ],
            'tests.log',
            mode.limits['cuda_tests'],
        ),
        'bench_train': Step(
            'bench_train',
            bench_train
            + [
                '--device',
                mode.device,
                *mode.train_args,
                '--contenders',
                *CONTENDERS,
                '--reference-bf16',
                '--json',
                str(out / 'bench_train.json'),
            ],
            'bench_train.log',
            mode.limits['bench_train'],
        ),
        'bench_compile': Step(
            'bench_compile',
            [py, str(SCRIPTS / 'bench_compile.py'), '--device', mode.device, *mode.compile_args],
            'bench_compile.log',
            mode.limits['bench_compile'],
        ),
    }


def run_steps(steps: dict[str, Step], out: Path) -> None:
    env = {
        **os.environ,
        'PYTHONUNBUFFERED': '1',
        'PYTHONPATH': os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])),
    }
    steps['flops'].start(out, env)  # CPU only: alongside the GPU steps, which leave the host's cores idle
    for name in ('cuda_tests', 'bench_train', 'bench_compile'):
        steps[name].start(out, env)
        steps[name].wait()
        print(
            f'gpu_check: {name} rc={steps[name].rc} in {steps[name].seconds} s'
            + (' (time limit)' if steps[name].timed_out else ''),
            flush=True,
        )
    steps['flops'].wait()


# --- reading the steps' output ---------------------------------------------------------------------------


def read_tests(path: Path) -> dict[str, Any]:
    """Counts and failing test ids from pytest's JUnit XML."""
    if not path.exists():
        return {'collected': 0, 'passed': 0, 'failed': 0, 'errors': 0, 'skipped': 0, 'failures': [], 'missing': True}
    cases = ET.parse(path).getroot().iter('testcase')
    counts = {'passed': 0, 'failed': 0, 'errors': 0, 'skipped': 0}
    failures = []
    for case in cases:
        name = f'{case.get("classname")}::{case.get("name")}'
        kind = next((child.tag for child in case if child.tag in ('failure', 'error', 'skipped')), None)
        key = {'failure': 'failed', 'error': 'errors', 'skipped': 'skipped', None: 'passed'}[kind]
        counts[key] += 1
        if kind in ('failure', 'error'):
            failures.append(name)
    return {'collected': sum(counts.values()), **counts, 'failures': failures}


def _json_lines(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.startswith('{'):
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return lines


def read_flops(path: Path) -> dict[str, float] | None:
    """``bench_train.py --flops`` prints one indented JSON object (GFLOP per image) after its warnings."""
    text = path.read_text() if path.exists() else ''
    start = text.rfind('\n{')
    try:
        return json.loads(text[start + 1 :]) if start >= 0 else None
    except json.JSONDecodeError:
        return None


def read_train(path: Path, flops: dict[str, float] | None, matmul_tflops: float | None) -> dict[str, Any] | None:
    if not path.exists():
        return None
    bench = json.loads(path.read_text())
    resolution, result = next(iter(bench['resolutions'].items()))
    ips = result['median_images_per_second']
    summary: dict[str, Any] = {
        'resolution': int(resolution),
        'batch_size': bench['args']['batch_size'],
        'width': bench['args']['width'],
        'adam_kernel': result.get('adam_kernel'),
        'reference_bf16': bench['args']['reference_bf16'],
        'images_per_second': ips,
        'ratios': result['ratios'],
        'timed_branches': result['timed_branches'],
        'peak_mib': {name: m['peak_mib'] for name, m in result.get('memory', {}).items()},
        'environment': bench['environment'],
    }
    ratio = result['ratios'].get('ours/reference')
    summary['ours_over_reference'] = {
        'value': ratio,
        'target': TARGET_RATIO,
        'met': None if ratio is None else ratio >= TARGET_RATIO,
    }
    if flops and 'ours' in ips:
        # ours' FLOPs per image over EQ-VAE's branch mix (bench_train --flops counts the real SD-VAE,
        # width 128): the rate it would reach at the bound, against the rate it reached
        achieved = ips['ours'] * flops['ours_branch_mix'] / 1e3  # TFLOP/s
        summary['ours_tflops'] = achieved
        summary['flop_fraction'] = {
            'of_nominal_bf16': achieved / NOMINAL_BF16_TFLOPS,
            'of_measured_matmul': achieved / matmul_tflops if matmul_tflops else None,
            'nominal_tflops': NOMINAL_BF16_TFLOPS,
            'measured_matmul_tflops': matmul_tflops,
            'target': TARGET_FLOP_FRACTION,
            'met': achieved / NOMINAL_BF16_TFLOPS >= TARGET_FLOP_FRACTION,
            'valid': bench['args']['width'] == 128,  # the FLOP count is of the width-128 SD-VAE
        }
    return summary


def read_compile(path: Path) -> dict[str, Any]:
    lines = _json_lines(path)
    merged: dict[str, Any] = {'recompiles': []}
    for line in lines:
        if 'latent_size' in line:
            merged['recompiles'].append(line)
        else:
            merged.update(line)
    ratio = merged.get('speedup_compiled_over_eager')
    failed = any('failed' in r for r in merged['recompiles'])
    merged['pays'] = None if ratio is None else bool(ratio > 1.0 and not failed)
    return merged


def measure_matmul_tflops(device: str, size: int, reps: int = 10) -> float | None:
    """bf16 ``size``^3 matrix products per second (three warm-ups, then the mean of ``reps``)."""
    try:
        import torch
    except ImportError:
        return None
    if device == 'cuda' and not torch.cuda.is_available():
        return None
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    if device == 'cuda':
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == 'cuda':
        torch.cuda.synchronize()
    return 2 * size**3 * reps / (time.perf_counter() - start) / 1e12


def environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {'python': platform.python_version(), 'wheels': os.environ.get('GPU_CHECK_WHEELS', 'none')}
    for package in ('torch', 'torchvision', 'torchmetrics', 'mosaicml', 'mosaicml-streaming', 'diffusers', 'numpy'):
        try:
            env[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            env[package] = None
    try:
        import torch

        env['cuda'] = torch.version.cuda
        env['gpu'] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    except ImportError:
        pass
    return env


# --- the report -------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = '.3f') -> str:
    return '-' if value is None else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
    env = report['environment']
    lines = [
        f'# gpu_check ({report["mode"]}): {"OK" if report["ok"] else "FAILED"}',
        '',
        f'{report["started"]}, {report["seconds"]} s; torch {env.get("torch")}, CUDA {env.get("cuda")}, '
        f'GPU {env.get("gpu")}, Python {env.get("python")}; wheels: {env.get("wheels")}',
        '',
        '| step | exit | seconds | limit |',
        '|---|---|---|---|',
    ]
    if report['mode'] == 'dry':
        lines[4:4] = [
            'Dry run: tiny sizes on the CPU. It checks that every step runs and reports; its figures measure nothing.',
            '',
        ]
    for name, step in report['steps'].items():
        rc = 'time limit' if step['timed_out'] else step['rc']
        lines.append(f'| {name} | {rc} | {step["seconds"]} | {step["limit_s"]} |')
    tests = report['cuda_tests']
    lines += [
        '',
        f'CUDA tests: {tests["passed"]} passed, {tests["failed"]} failed, {tests["errors"]} errors, '
        f'{tests["skipped"]} skipped',
    ]
    lines += [f'- failed: `{name}`' for name in tests['failures']]
    train = report['train']
    if train:
        lines += [
            '',
            f'Training step ({train["resolution"]} px, batch {train["batch_size"]}, width {train["width"]}, '
            f'Adam kernel {train["adam_kernel"]} on both sides, reference in bf16: {train["reference_bf16"]}):',
            '',
            '| contender | images/s | peak MiB |',
            '|---|---|---|',
        ]
        for name, ips in train['images_per_second'].items():
            lines.append(f'| {name} | {ips:.2f} | {_fmt(train["peak_mib"].get(name), ".0f")} |')
        ours_ref = train['ours_over_reference']
        lines += [
            '',
            f'ours/reference {_fmt(ours_ref["value"])}x (target >= {ours_ref["target"]}x: '
            f'{ {True: "met", False: "MISSED", None: "-"}[ours_ref["met"]] })',
        ]
        fraction = train.get('flop_fraction')
        if fraction:
            note = '' if fraction['valid'] else ' (not the width-128 model: the fraction is meaningless)'
            lines.append(
                f'ours {train["ours_tflops"]:.1f} TFLOP/s = {fraction["of_nominal_bf16"]:.1%} of '
                f'{fraction["nominal_tflops"]:.0f} nominal bf16, '
                f'{_fmt(fraction["of_measured_matmul"], ".1%")} of the measured matmul '
                f'({_fmt(fraction["measured_matmul_tflops"], ".3g")} TFLOP/s); target >= '
                f'{fraction["target"]:.0%}: {"met" if fraction["met"] else "MISSED"}{note}'
            )
    compiled = report['compile']
    lines += [
        '',
        f'torch.compile: first step {compiled.get("first_compiled_step_s", "-")} s, eager '
        f'{compiled.get("eager_step_s", "-")} s vs compiled {compiled.get("compiled_step_s", "-")} s per step '
        f'(speedup {compiled.get("speedup_compiled_over_eager", "-")}x); recompiles: '
        + (
            ', '.join(f'{r["latent_size"]}: {r.get("first_decode_s", r.get("failed"))}' for r in compiled['recompiles'])
            or '-'
        )
        + f'; pays: {compiled["pays"]}',
    ]
    return '\n'.join(lines) + '\n'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--dry', action='store_true', help='CPU, tiny sizes: checks that every step runs')
    parser.add_argument(
        '--out', default=os.environ.get('OUT') or 'gpu_check_out', help='default: $OUT, else ./gpu_check_out'
    )
    args = parser.parse_args(argv)
    mode = DRY if args.dry else DEVICE
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started, start = datetime.datetime.now().astimezone().isoformat(timespec='seconds'), time.monotonic()

    steps = build_steps(mode, out)
    run_steps(steps, out)
    matmul = measure_matmul_tflops(mode.device, mode.matmul_size)
    flops = read_flops(out / steps['flops'].log)
    report: dict[str, Any] = {
        'mode': mode.name,
        'started': started,
        'environment': environment(mode.device),
        'steps': {name: step.record() for name, step in steps.items()},
        'cuda_tests': read_tests(out / 'tests.xml'),
        'flops_gflop_per_image': flops,
        'matmul_bf16_tflops': matmul,
        'train': read_train(out / 'bench_train.json', flops, matmul),
        'compile': read_compile(out / steps['bench_compile'].log),
    }
    report['ok'] = (
        all(s.rc == 0 for s in steps.values())
        and report['cuda_tests']['failed'] == 0
        and report['cuda_tests']['errors'] == 0
        and not report['cuda_tests'].get('missing')
    )
    report['seconds'] = round(time.monotonic() - start, 1)
    (out / 'gpu_check.json').write_text(json.dumps(report, indent=1))
    (out / 'gpu_check.md').write_text(markdown(report))
    print(markdown(report))
    return 0 if report['ok'] else 1


if __name__ == '__main__':
    sys.exit(main())
