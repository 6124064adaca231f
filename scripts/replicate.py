"""Reproduce EQ-VAE's claim at small scale on CPU: base -> (eq | control) fine-tunes -> evaluation -> docs.

    python scripts/replicate.py                 # the full experiment (docs/RESULTS.md, docs/results/)
    python scripts/replicate.py --quick --out /tmp/rep --docs /tmp/rep/docs   # a few minutes, a smoke run

Stages, each skipped when its outputs exist and resumed from its last checkpoint otherwise:
1. base: a small AutoencoderKL trained from scratch with the ordinary objective (no EquivarianceAlgorithm);
2. eq: base fine-tuned for M steps with ``EquivarianceAlgorithm()``;
3. control: base fine-tuned for the same M steps, same seed and data order, without it;
4. evaluation of every checkpoint on the held-out split (the paper's protocol at the run's resolution),
   then the table, the plots and ``RESULTS.md``.

LPIPS needs VGG16 weights an offline machine lacks, so every stage trains with ``lpips_weight: 0``
(L1 + KL + adaptive PatchGAN); evaluation leaves out rFID and LPIPS for the same reason.
"""

from __future__ import annotations

import argparse
import copy
import glob
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from eqvae_composer.algorithms.equivariance.transforms import SpatialTransform, apply_to_image, apply_to_latent
from eqvae_composer.checkpoints import load_autoencoder
from eqvae_composer.cli import run_cli
from eqvae_composer.evaluation import EvalProtocol, build_eval_dataset, dataset_size, evaluate
from eqvae_composer.evaluation.visualize import image_rows
from eqvae_composer.introspection import vae_downsample_factor
from eqvae_composer.train import train

NOTES_MARKER = '<!-- notes: everything below this line is kept when the script rewrites the file -->'
FINETUNES = ('control', 'eq')
MODELS = ('base', 'control', 'eq')


@dataclass(frozen=True)
class Plan:
    """Sizes and schedules of one experiment."""

    resolution: int = 64
    block_out_channels: tuple[int, ...] = (16, 32, 32, 32)
    norm_num_groups: int = 8
    batch_size: int = 8
    base_steps: int = 2000
    base_lr: float = 5e-4
    base_checkpoint_every: int = 250
    finetune_steps: int = 800
    finetune_lr: float = 2e-4
    finetune_evals: int = 4  # checkpoints evaluated along fine-tuning (every M / finetune_evals steps)
    eval_images: int | None = None  # None: the whole held-out split
    seed: int = 17


FULL = Plan()
QUICK = Plan(base_steps=20, base_checkpoint_every=10, finetune_steps=8, eval_images=8)


def vae_config(plan: Plan) -> dict[str, Any]:
    """A small f8 AutoencoderKL: SD-VAE's layout (4 blocks, 4 latent channels) at reduced width."""
    blocks = len(plan.block_out_channels)
    return {
        'in_channels': 3,
        'out_channels': 3,
        'down_block_types': ['DownEncoderBlock2D'] * blocks,
        'up_block_types': ['UpDecoderBlock2D'] * blocks,
        'block_out_channels': list(plan.block_out_channels),
        'layers_per_block': 1,
        'latent_channels': 4,
        'norm_num_groups': plan.norm_num_groups,
        'sample_size': plan.resolution,
    }


def stage_config(plan: Plan, stage: str, data: str, out: str, base_vae: str | None = None) -> dict[str, Any]:
    """The ``TrainConfig`` dict of one stage (``base``, ``eq`` or ``control``)."""
    run_dir = os.path.join(out, stage)
    finetune = stage != 'base'
    steps = plan.finetune_steps if finetune else plan.base_steps
    every = max(1, plan.finetune_steps // plan.finetune_evals) if finetune else plan.base_checkpoint_every
    return {
        'run_name': f'replicate-{stage}',
        'seed': plan.seed,  # eq and control share it: same discriminator init, same data order
        'model': {
            'vae': {'pretrained': base_vae} if finetune else {'config': vae_config(plan)},
            'loss': {
                'lpips_weight': 0.0,  # VGG16 weights are not available offline
                'kl_weight': 1e-6,
                'disc_weight': 0.5,
                'disc_start': 0,
                'disc_num_filters': 32,
                # at 64 px the smallest scale (0.25) gives 16 px images: a 3-layer PatchGAN needs 24
                'disc_num_layers': 2 if plan.resolution < 128 else 3,
            },
            'eval_metrics': ['PSNR'],
        },
        'train_loader': {'dataset': {'local': os.path.join(data, 'train'), 'resolution': plan.resolution}},
        'optimizer': {'lr': plan.finetune_lr if finetune else plan.base_lr, 'betas': [0.5, 0.9]},
        'algorithms': {'equivariance': {}} if stage == 'eq' else {},
        'global_train_batch_size': plan.batch_size,
        'max_duration': f'{steps}ba',
        'precision': 'fp32',
        'console_log_interval': f'{max(1, steps // 10)}ba',
        'save_folder': os.path.join(run_dir, 'checkpoints'),
        'save_interval': f'{every}ba',
        'save_num_checkpoints_to_keep': -1,  # the intermediate checkpoints are the curves' points
        'autoresume': True,
        'export_folder': os.path.join(run_dir, 'vae'),
        'metrics_file': os.path.join(run_dir, 'metrics.json'),
    }


def run_stage(plan: Plan, stage: str, data: str, out: str, base_vae: str | None = None) -> tuple[str, float]:
    """Train one stage unless its export exists; return the exported VAE folder and its training seconds."""
    cfg = stage_config(plan, stage, data, out, base_vae)
    export = cfg['export_folder']
    seconds_file = os.path.join(out, stage, 'seconds.txt')
    if os.path.isfile(os.path.join(export, 'config.json')):
        print(f'[{stage}] done already: {export}', flush=True)
        return export, float(open(seconds_file).read()) if os.path.isfile(seconds_file) else 0.0
    print(
        f'[{stage}] training {cfg["max_duration"]} (resumes from {cfg["save_folder"]} if it has checkpoints)',
        flush=True,
    )
    start = time.perf_counter()
    trainer = train(cfg)
    trainer.close()
    seconds = time.perf_counter() - start
    with open(seconds_file, 'w') as f:  # a restarted run reports the time the stage took when it ran
        f.write(f'{seconds:.1f}')
    print(f'[{stage}] {seconds:.0f} s', flush=True)
    return export, seconds


def checkpoints(out: str, stage: str) -> dict[int, str]:
    """A stage's Composer checkpoints by batch count (Composer's default ``ep{e}-ba{b}-rank0.pt`` names)."""
    found = {}
    for path in glob.glob(os.path.join(out, stage, 'checkpoints', 'ep*-ba*-rank0.pt')):
        match = re.search(r'-ba(\d+)-rank0\.pt$', path)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def cached_eval(
    path: str,
    source: str,
    dataset: Any,
    metrics: Sequence[str],
    protocol: EvalProtocol,
    num_images: int | None,
) -> dict[str, float]:
    """``evaluate`` a VAE (folder or checkpoint) once; the numbers are cached in ``path``."""
    if not os.path.isfile(path):
        start = time.perf_counter()
        vae = load_autoencoder(source)
        results = evaluate(vae, dataset, metrics, protocol, num_images=num_images, batch_size=20, progress=False)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'w') as f:
            json.dump({'source': source, **results, 'total_seconds': time.perf_counter() - start}, f, indent=2)
    with open(path) as f:
        return json.load(f)['metrics']


def evaluate_all(plan: Plan, data: str, out: str, exports: dict[str, str]) -> dict[str, Any]:
    """Final numbers of the three models, and the curves along base training and fine-tuning."""
    dataset = build_eval_dataset(os.path.join(data, 'val'), plan.resolution)
    protocol = EvalProtocol(resolution=plan.resolution, sample_posterior=True, seed=0)
    evals = os.path.join(out, 'evals')
    final = {
        name: cached_eval(
            os.path.join(evals, f'{name}.json'),
            exports[name],
            dataset,
            ['psnr', 'ssim', 'equivariance', 'intrinsic_dim'],
            protocol,
            plan.eval_images,
        )
        for name in MODELS
    }
    # The same models at twice the resolution: at 64 px an f8 latent is 8x8 and scale 0.25 leaves 2x2
    # cells, where the error measures border effects more than equivariance.
    double = plan.resolution * 2
    protocol_2x = EvalProtocol(resolution=double, sample_posterior=True, seed=0)
    dataset_2x = build_eval_dataset(os.path.join(data, 'val'), double)
    final_2x = {
        name: cached_eval(
            os.path.join(evals, f'{name}-{double}px.json'),
            exports[name],
            dataset_2x,
            ['psnr', 'ssim', 'equivariance'],
            protocol_2x,
            plan.eval_images,
        )
        for name in MODELS
    }
    curve_metrics = ['psnr', 'ssim', 'equivariance']
    base_curve = {
        step: cached_eval(
            os.path.join(evals, f'base-ba{step}.json'), path, dataset, ['psnr'], protocol, plan.eval_images
        )['psnr']
        for step, path in checkpoints(out, 'base').items()
    }
    curves: dict[str, dict[int, dict[str, float]]] = {}
    for name in FINETUNES:
        curves[name] = {0: final['base']}
        for step, path in checkpoints(out, name).items():
            curves[name][step] = cached_eval(
                os.path.join(evals, f'{name}-ba{step}.json'), path, dataset, curve_metrics, protocol, plan.eval_images
            )
    eval_seconds, eval_files = 0.0, glob.glob(os.path.join(evals, '*.json'))
    for path in eval_files:
        with open(path) as f:
            record = json.load(f)
        eval_seconds += record.get('total_seconds', record.get('seconds', 0.0))
    return {
        'final': final,
        'final_2x': final_2x,
        'base_psnr_curve': base_curve,
        'finetune_curves': curves,
        'eval_seconds': eval_seconds,
        'num_evaluations': len(eval_files),
        'protocol': protocol.describe(),
        'num_eval_images': plan.eval_images or 'all',
    }


def plot_curves(results: dict[str, Any], path: str) -> None:
    """Equivariance errors R and S and PSNR of eq and control over fine-tuning steps (+ base training PSNR)."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    colours = {'eq': 'tab:red', 'control': 'tab:blue'}
    for name, curve in results['finetune_curves'].items():
        steps = sorted(curve, key=int)
        for key, style in (('equivariance_error/R', '-o'), ('equivariance_error/S', '--s')):
            axes[0].plot(
                steps,
                [curve[s][key] for s in steps],
                style,
                color=colours[name],
                label=f'{name} {key[-1]}',
                markersize=4,
            )
        axes[1].plot(steps, [curve[s]['psnr'] for s in steps], '-o', color=colours[name], label=name, markersize=4)
    axes[0].set(title='latent equivariance error (held out)', xlabel='fine-tuning step', ylabel='error')
    axes[1].set(title='reconstruction PSNR (held out)', xlabel='fine-tuning step', ylabel='dB')
    base = results['base_psnr_curve']
    axes[2].plot(sorted(base, key=int), [base[s] for s in sorted(base, key=int)], '-o', color='k', markersize=4)
    axes[2].set(title='base training: PSNR (held out)', xlabel='base step', ylabel='dB')
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


@torch.no_grad()
def plot_reconstructions(plan: Plan, data: str, exports: dict[str, str], path: str, count: int = 4) -> None:
    """Per held-out image and transform: tau(x) | D(tau(E(x))) for base, control, eq (E = posterior mode)."""
    from PIL import Image

    dataset = build_eval_dataset(os.path.join(data, 'val'), plan.resolution)
    step = max(1, dataset_size(dataset) // count)
    images = torch.stack([dataset[i * step]['image'] for i in range(count)])
    vaes = {name: load_autoencoder(exports[name]).eval() for name in MODELS}
    factor = vae_downsample_factor(vaes['base'])
    size = (plan.resolution, plan.resolution)
    blocks = []
    transforms = (
        SpatialTransform(),
        SpatialTransform(0.5, 0.5),
        SpatialTransform(0.25, 0.25),
        SpatialTransform(quarter_turns=1),
        SpatialTransform(0.5, 0.5, quarter_turns=2),
    )
    latents = {name: vaes[name].encode(images).latent_dist.mode() for name in MODELS}
    for tau in transforms:
        columns = [apply_to_image(images, tau, factor)]
        for name in MODELS:
            columns.append(vaes[name].decode(apply_to_latent(latents[name], tau)).sample)
        blocks.append(image_rows(columns, size))
    picture = torch.cat(blocks, dim=2)  # transforms side by side, 4 columns each
    array = (picture.permute(1, 2, 0).clamp(0, 1) * 255).round().byte().numpy()
    Image.fromarray(array).save(path, optimize=True)


def _fmt(value: float, digits: int = 3) -> str:
    return f'{value:.{digits}f}'


def results_table(final: dict[str, dict[str, float]]) -> str:
    """The markdown table of the three models."""
    scales = sorted({k.split('/')[1] for k in final['base'] if k.startswith('scaled_psnr/')}, key=float)
    head = ['model', 'eq. error R', 'eq. error S', 'PSNR', 'SSIM'] + [f'PSNR D(tau(z)) s={s}' for s in scales]
    head.append('intrinsic dim')
    rows = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for name in MODELS:
        m = final[name]
        cells = (
            [
                name,
                _fmt(m['equivariance_error/R']),
                _fmt(m['equivariance_error/S']),
                _fmt(m['psnr'], 2),
                _fmt(m['ssim']),
            ]
            + [_fmt(m[f'scaled_psnr/{s}'], 2) for s in scales]
            + [_fmt(m['intrinsic_dim'], 1)]
        )
        rows.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(rows)


def transform_table(final: dict[str, dict[str, float]]) -> str:
    """Equivariance error per transform (rows: models), and PSNR."""
    names = [k.split('/')[1] for k in final['base'] if k.startswith('equivariance_error/') and k[-1] not in 'RS']
    head = ['model'] + names + ['R', 'S', 'PSNR']
    rows = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    for name in MODELS:
        m = final[name]
        cells = [name] + [_fmt(m[f'equivariance_error/{t}']) for t in names + ['R', 'S']] + [_fmt(m['psnr'], 2)]
        rows.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(rows)


def curve_table(curves: dict[str, dict[int, dict[str, float]]]) -> str:
    """Fine-tuning curves as a markdown table (step; R, S, PSNR for control and eq)."""
    steps = sorted(set().union(*[set(map(int, c)) for c in curves.values()]))
    rows = ['| step | control R | control S | control PSNR | eq R | eq S | eq PSNR |', '|---|---|---|---|---|---|---|']
    for step in steps:
        cells = [str(step)]
        for name in FINETUNES:
            m = curves[name].get(step) or curves[name].get(str(step))
            cells += (
                [_fmt(m['equivariance_error/R']), _fmt(m['equivariance_error/S']), _fmt(m['psnr'], 2)]
                if m
                else ['', '', '']
            )
        rows.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(rows)


def write_markdown(path: str, plan: Plan, results: dict[str, Any], command: str, seconds: float) -> None:
    """``RESULTS.md``: the generated part, then whatever notes the existing file has below ``NOTES_MARKER``."""
    notes = ''
    if os.path.isfile(path):
        with open(path) as f:
            text = f.read()
        if NOTES_MARKER in text:
            notes = text.split(NOTES_MARKER, 1)[1]
    final = results['final']
    stage_seconds = results['stage_seconds']
    base_curve = results['base_psnr_curve']
    base_points = ', '.join(f'{s}: {v:.2f}' for s, v in sorted(base_curve.items(), key=lambda i: int(i[0])))
    minutes = {name: stage_seconds.get(name, 0) / 60 for name in MODELS}
    total = sum(stage_seconds.values()) + results['eval_seconds']
    text = f"""# EQ-VAE at small scale: results

Generated by `scripts/replicate.py` (issue 8). The claim under test (paper, SD-VAE): fine-tuning with the
equivariance regularizer lowers the latent equivariance error (R / S 0.93 / 0.80 -> 0.49 / 0.15) at no
cost in reconstruction, while the same fine-tuning without it does not.

## Setup
- Data: `{results['data']}/train`, held-out `{results['data']}/val`, at {plan.resolution} px. By default the
  demo photographs (`python convert_dataset.py --out mds/`): 336 crops of 7 photos for training, 40 crops of
  2 other photos held out.
- Model: AutoencoderKL f8, 4 latent channels, block_out_channels {list(plan.block_out_channels)},
  1 layer per block (SD-VAE's layout at reduced width), trained from scratch.
- Objective: L1 + 1e-6 KL + adaptive-weight PatchGAN (hinge, {2 if plan.resolution < 128 else 3} layers,
  disc_weight 0.5, from step 0). **LPIPS off (`lpips_weight: 0`)**: its VGG16 weights are not available
  offline.
- base: {plan.base_steps} steps, batch {plan.batch_size}, Adam(0.5, 0.9) lr {plan.base_lr:g}.
- eq / control: {plan.finetune_steps} steps from base, batch {plan.batch_size}, lr {plan.finetune_lr:g}, same
  seed ({plan.seed}) and data order; eq adds `EquivarianceAlgorithm()` (reference defaults: p=0.5,
  scale grid 8/32..31/32, rotations 90/180/270, bilinear). The discriminator starts fresh in both
  (the exported base holds only the VAE).
- Evaluation: the project's protocol (`evaluate`, as `scripts/eval.py`) on {results['num_eval_images']}
  held-out images at {plan.resolution} px, reconstruction from a posterior sample, uint8 quantized; equivariance
  error on posterior modes, rotations 90/180/270 (R) and scales 0.25/0.5/0.75 (S); rFID and LPIPS
  left out (no Inception / VGG weights offline).

## Results (held-out split)
{results_table(final)}

PSNR D(tau(z)) s: PSNR of the decoded scaled latent against the scaled image (the paper's Fig. 3, as PSNR).

Equivariance error per transform, at the training resolution ({plan.resolution} px, latents
{plan.resolution // 8}x{plan.resolution // 8}):

{transform_table(final)}

The same models evaluated at {2 * plan.resolution} px (latents {plan.resolution // 4}x{plan.resolution // 4};
they were trained at {plan.resolution} px):

{transform_table(results['final_2x'])}

Over fine-tuning (step 0 = base):

{curve_table(results['finetune_curves'])}

![equivariance error and PSNR over fine-tuning](results/curves.png)

Reconstructions from transformed latents, four held-out images. Five blocks, left to right:
identity (plain reconstruction), scale 0.5, scale 0.25, rotation 90, scale 0.5 + rotation 180; in each
block the columns are
tau(x) | base D(tau(E(x))) | control | eq (smaller images shown at true size, top left).

![tau(x) and D(tau(E(x))) for base, control, eq](results/reconstructions.png)

Base training, held-out PSNR by step: {base_points}.

## Command and time
```
{command}
```
Time, on a 2-core CPU shared with other jobs, 1 torch thread: **{total / 60:.1f} min** end to end
(training: base {minutes['base']:.1f} min, control {minutes['control']:.1f} min, eq {minutes['eq']:.1f} min,
as recorded when each stage ran; {results['num_evaluations']} evaluations {results['eval_seconds'] / 60:.1f} min;
the last invocation, which wrote this file, took {seconds / 60:.1f} min).
The numbers are also in `results/results.json`.

{NOTES_MARKER}{notes if notes else chr(10)}"""
    with open(path, 'w') as f:
        f.write(text)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--data', default='mds', help='MDS root with train/ and val/ (default: mds)')
    parser.add_argument('--out', default=None, help='runs folder (default: runs/replicate, or runs/replicate-quick)')
    parser.add_argument('--docs', default=None, help='where RESULTS.md and results/ go (default: docs, or OUT/docs)')
    parser.add_argument('--quick', action='store_true', help='tiny step counts: a smoke run of a few minutes')
    parser.add_argument('--base-steps', type=int, default=None)
    parser.add_argument('--finetune-steps', type=int, default=None)
    parser.add_argument('--finetune-lr', type=float, default=None)
    parser.add_argument(
        '--threads',
        type=int,
        default=1,
        help='torch threads (default 1: on a shared 2-core CPU, 2 threads ran up to 10x slower)',
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    plan = QUICK if args.quick else FULL
    overrides = {'base_steps': args.base_steps, 'finetune_steps': args.finetune_steps, 'finetune_lr': args.finetune_lr}
    plan = replace(plan, **{k: v for k, v in overrides.items() if v is not None})
    out = args.out or ('runs/replicate-quick' if args.quick else 'runs/replicate')
    docs = args.docs or (os.path.join(out, 'docs') if args.quick else 'docs')
    for split in ('train', 'val'):
        if not os.path.isfile(os.path.join(args.data, split, 'index.json')):
            print(
                f'error: no MDS dataset at {args.data}/{split}; run `python convert_dataset.py --out {args.data}`',
                file=sys.stderr,
            )
            return 1
    os.makedirs(os.path.join(docs, 'results'), exist_ok=True)

    exports, stage_seconds = {}, {}
    exports['base'], stage_seconds['base'] = run_stage(plan, 'base', args.data, out)
    for name in FINETUNES:
        exports[name], stage_seconds[name] = run_stage(plan, name, args.data, out, base_vae=exports['base'])

    print('[eval] evaluating the three models and the intermediate checkpoints', flush=True)
    results = evaluate_all(plan, args.data, out, exports)
    plot_curves(results, os.path.join(docs, 'results', 'curves.png'))
    plot_reconstructions(plan, args.data, exports, os.path.join(docs, 'results', 'reconstructions.png'))
    seconds = time.perf_counter() - start
    command = shlex.join(['python', 'scripts/replicate.py', *(sys.argv[1:] if argv is None else argv)])
    results.update(
        {
            'data': args.data,
            'plan': copy.deepcopy(plan.__dict__),
            'stage_seconds': stage_seconds,
            'seconds': seconds,
            'command': command,
        }
    )
    with open(os.path.join(docs, 'results', 'results.json'), 'w') as f:
        json.dump(results, f, indent=2, default=str)
    write_markdown(os.path.join(docs, 'RESULTS.md'), plan, results, command, seconds)
    print(results_table(results['final']))
    print(f'Total wall time: {seconds:.0f} s ({seconds / 60:.1f} min). Wrote {docs}/RESULTS.md', flush=True)
    return 0


if __name__ == '__main__':
    run_cli(main)
