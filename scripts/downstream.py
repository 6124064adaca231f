"""EQ-VAE's downstream claim at small scale: does a diffusion model learn the eq VAE's latents faster?

    python scripts/replicate.py --photos testbed --out runs/replicate-testbed    # first: the VAEs
    python scripts/downstream.py --runs runs/replicate-testbed                   # then this (make downstream)
    python scripts/downstream.py --quick --runs /tmp/rep --out /tmp/down        # a smoke run of a minute

It reads a runs folder of ``scripts/replicate.py`` (its ``plan.json``, held-out and training shards in
``data/`` and the exported VAE of every fine-tune, ``<arm>-s<seed>/vae``) and, for the arms ``control``
and ``eq`` and every seed, with each stage cached under ``--out`` (the same command resumes after a kill):

1. factors: the latents' mean and std over the training images (posterior samples), written as
   ``shift_factor`` / ``scaling_factor`` into a copy of the VAE, so each VAE's latents reach the diffusion
   model with unit variance, as a user would set them up (``scripts/latent_stats.py --write-config``);
2. latents: both splits encoded with that copy at the replication's resolution (``encode_latents``);
3. proxies: ``scripts/diffusability_report.py`` on the held-out images (spectra, equivariance, TwoNN);
4. training: the same small SiT (flow objective, unconditional: the photographs have no classes) with the
   same seed, batch and steps on every VAE's latents, checkpointed every ``eval_every`` steps;
5. evaluation of every checkpoint: the validation loss at fixed noise levels and noise (posterior means of
   the held-out latents) and the SWD of decoded samples (fixed noise, Euler) against the held-out images;
   gFID too where the Inception weights are on the machine.

Then ``docs/RESULTS.md`` gets its "Downstream" section (between markers below the notes marker, so
``scripts/replicate.py``'s rewrites keep it) and ``docs/results/downstream.png`` the curves.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

if __package__ in (None, ''):  # run as a file: make `scripts.*` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from eqvae_composer.checkpoints import image_loader, latent_statistics, load_autoencoder, set_latent_factors
from eqvae_composer.cli import run_cli
from eqvae_composer.config import validate_structured
from eqvae_composer.diffusion.quality import sample_quality
from eqvae_composer.diffusion.swd import swd
from eqvae_composer.diffusion.train import DiffusionTrainConfig, build_model, train
from eqvae_composer.diffusion.vae import LatentDecoder, latent_metadata
from eqvae_composer.evaluation.fid import load_inception
from eqvae_composer.latents import StreamingLatentDataset
from eqvae_composer.latents.encode import EncodeOptions, encode_latents
from eqvae_composer.weights import MissingWeightsError
from scripts import diffusability_report, downstream_report
from scripts.replicate import checkpoints  # the same run-folder layout

#: The VAEs compared: the replication's control (fine-tuned without the regularizer) and eq.
ARMS = ('control', 'eq')


@dataclass(frozen=True)
class DownstreamPlan:
    """The diffusion model, its budget and its evaluation; the same for every VAE."""

    network: str = 'DiT-S/2'  # the patch size follows the latent side (see network_name): 64 tokens
    # DiT-S/2 at half width and a third of the depth (3.1M parameters): about 1 s per step of 32 on two busy
    # cores (0.35 s estimated on idle ones), so that the four runs fit the hour the experiment may take.
    network_overrides: dict[str, Any] = field(
        default_factory=lambda: {'num_layers': 4, 'num_attention_heads': 4, 'attention_head_dim': 48}
    )
    batch_size: int = 32
    steps: int = 1200
    eval_every: int = 200
    lr: float = 2e-4
    seed: int = 0
    eval_levels: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    sample_steps: int = 25  # Euler steps of the samples scored by SWD
    swd_images: int = 96  # samples and held-out images per SWD (at most the held-out split)
    proxy_images: int = 96
    stats_images: int = 512
    gfid: bool = True  # where the Inception weights are on the machine


FULL = DownstreamPlan()
QUICK = DownstreamPlan(
    network_overrides={'num_layers': 1, 'num_attention_heads': 2, 'attention_head_dim': 8},
    batch_size=4,
    steps=4,
    eval_every=2,
    sample_steps=2,
    swd_images=6,
    proxy_images=6,
    stats_images=8,
    gfid=False,
)


def network_name(plan: DownstreamPlan, latent_side: int) -> str:
    """``plan.network`` with the patch size (2, 4 or 8) that gives 8x8 tokens where it can: f8 (16x16) and f4
    (32x32) latents then cost the same to learn."""
    size = plan.network.split('/')[0]
    return f'{size}/{max(2, min(8, latent_side // 8))}'


def _write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(path + '.tmp', path)  # a killed write leaves the old file or none


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _say(stage: str, what: str) -> None:
    print(f'[downstream] {stage}: {what}', flush=True)


def replication(runs: str) -> dict[str, Any]:
    """The replication's plan, checked to have what this experiment reads; a one-line error otherwise."""
    plan_file = os.path.join(runs, 'plan.json')
    if not os.path.isfile(plan_file):
        raise SystemExit(f'error: --runs {runs}: no replication there (no plan.json); run scripts/replicate.py first.')
    plan = _read_json(plan_file)
    missing = [
        path
        for path in [os.path.join(runs, 'data', split, 'index.json') for split in ('train', 'val')]
        + [os.path.join(runs, f'{arm}-s{seed}', 'vae', 'config.json') for arm in ARMS for seed in plan['seeds']]
        if not os.path.isfile(path)
    ]
    if missing:
        raise SystemExit(
            f'error: --runs {runs}: the replication is not finished ({missing[0]} is missing); '
            f'run the same scripts/replicate.py command again to finish it.'
        )
    return plan


def prepare_vae(runs: str, out: str, stage: str, resolution: int, plan: DownstreamPlan) -> str:
    """The VAE's copy with the factors that give its training latents zero mean and unit variance."""
    vae_dir, record = os.path.join(out, stage, 'vae'), os.path.join(out, stage, 'factors.json')
    if os.path.isfile(record):
        return vae_dir
    _say(stage, 'latent statistics')
    shutil.rmtree(vae_dir, ignore_errors=True)
    shutil.copytree(os.path.join(runs, stage, 'vae'), vae_dir)
    stats = latent_statistics(
        load_autoencoder(vae_dir),
        image_loader(os.path.join(runs, 'data', 'train'), resolution, 16),
        num_images=plan.stats_images,
        generator=torch.Generator().manual_seed(0),
    )
    set_latent_factors(vae_dir, stats.scaling_factor, stats.shift_factor)
    _write_json(record, {**asdict(stats), 'scaling_factor': stats.scaling_factor, 'shift_factor': stats.shift_factor})
    return vae_dir


def encode(runs: str, out: str, stage: str, vae_dir: str, resolution: int) -> str:
    """Both splits' latents (posterior mean and std), in ``OUT/<stage>/latents/<split>``."""
    latents = os.path.join(out, stage, 'latents')
    for split in ('train', 'val'):
        if not os.path.isfile(os.path.join(latents, split, 'index.json')):  # encode_latents resumes a partial one
            _say(stage, f'encoding {split}')
            options = EncodeOptions(resolution=resolution, dtype='float32', batch_size=16, progress=False)
            encode_latents(vae_dir, os.path.join(runs, 'data', split), os.path.join(latents, split), options)
    return latents


def proxies(runs: str, out: str, stage: str, vae_dir: str, resolution: int, plan: DownstreamPlan) -> dict[str, Any]:
    """``diffusability_report``'s measures on the held-out images (cached as its report.json)."""
    folder = os.path.join(out, stage, 'proxies')
    if not os.path.isfile(os.path.join(folder, 'report.json')):
        _say(stage, 'proxies')
        val = os.path.join(runs, 'data', 'val')
        args = ['--vae', vae_dir, '--data', val, '--resolution', str(resolution), '--out', folder]
        diffusability_report.main([*args, '--num-images', str(plan.proxy_images)])
    report = _read_json(os.path.join(folder, 'report.json'))
    return {
        'latent_high_frequency_share': report['spectrum']['latents']['high_frequency_share'],
        'equivariance_error/R': report['equivariance']['rotation'],
        'equivariance_error/S': report['equivariance']['scale'],
        'intrinsic_dimension': report['intrinsic_dimension'],
    }


def train_config(plan: DownstreamPlan, out: str, stage: str, latents: str) -> dict[str, Any]:
    """``train_diffusion.py``'s configuration of one VAE's run: only the paths differ between VAEs."""
    metadata = latent_metadata(os.path.join(latents, 'train'))
    if metadata['labelled']:
        raise SystemExit(f'error: {latents}/train has labels; this experiment trains unconditionally on photographs.')
    return {
        'num_classes': 1,  # no classes: every sample gets the null label, as an unlabelled dataset does
        'network': {'name': network_name(plan, metadata['latent_shape'][-1]), 'overrides': plan.network_overrides},
        'objective': {'kind': 'flow', 'eval_levels': list(plan.eval_levels)},
        'train_loader': {'dataset': {'local': os.path.join(latents, 'train')}},
        'optimizer': {'lr': plan.lr},
        'max_duration': f'{plan.steps}ba',
        'global_train_batch_size': plan.batch_size,
        'precision': 'fp32',
        'seed': plan.seed,  # the same initialisation, data order and noise for every VAE
        'run_name': f'downstream-{stage}',
        'save_folder': os.path.join(out, stage, 'checkpoints'),
        'save_interval': f'{plan.eval_every}ba',
        'autoresume': True,
        'console_log_interval': f'{max(1, plan.steps // 10)}ba',
    }


def run_training(plan: DownstreamPlan, out: str, stage: str, latents: str) -> tuple[dict[str, Any], float]:
    """Train unless done (resuming from the checkpoints); return the config and the training seconds."""
    cfg = train_config(plan, out, stage, latents)
    config_file, done = os.path.join(out, stage, 'config.json'), os.path.join(out, stage, 'train_seconds.json')
    if os.path.isfile(config_file) and _read_json(config_file) != cfg:
        raise SystemExit(f'error: {config_file} holds another configuration than this plan gives; use another --out.')
    _write_json(config_file, cfg)
    if not os.path.isfile(done):
        _say(stage, f'training {plan.steps} steps')
        start = time.perf_counter()
        train(cfg).close()
        _write_json(done, {'seconds': time.perf_counter() - start})  # after a kill: the resumed share only
    return cfg, _read_json(done)['seconds']


def held_out_latents(latents: str) -> torch.Tensor:
    """The held-out posterior means, scaled as the model sees them, in order."""
    dataset = StreamingLatentDataset(
        local=os.path.join(latents, 'val'), shuffle=False, sample_posterior=False, flip='never'
    )
    return torch.stack([dataset[i]['latent'] for i in range(len(dataset))])


def held_out_images(runs: str, resolution: int, count: int) -> torch.Tensor:
    """The first ``count`` held-out images with the eval transform, in [-1, 1]."""
    batches = [batch['image'] for batch in image_loader(os.path.join(runs, 'data', 'val'), resolution, 16)]
    return torch.cat(batches)[:count]


@torch.no_grad()
def evaluate_checkpoint(
    cfg: dict[str, Any],
    checkpoint: str,
    val_latents: torch.Tensor,
    references: torch.Tensor,
    decoder: LatentDecoder,
    plan: DownstreamPlan,
    inception: torch.nn.Module | None,
) -> dict[str, float]:
    """Validation loss per noise level (fixed noise) and sample quality of one checkpoint."""
    model = build_model(validate_structured(DiffusionTrainConfig, cfg), tuple(val_latents.shape[1:]))
    model.load_state_dict(torch.load(checkpoint, map_location='cpu', weights_only=False)['state']['model'])
    model.eval()
    losses = torch.cat([model.eval_forward({'latent': chunk})['losses'] for chunk in val_latents.split(32)])
    metrics = {'val_loss': float(losses.mean())}
    metrics.update({f'val_loss/{level:g}': float(losses[:, i].mean()) for i, level in enumerate(plan.eval_levels)})
    generator = torch.Generator().manual_seed(plan.seed)
    noise = torch.randn((len(references), *val_latents.shape[1:]), generator=generator)
    labels = torch.full((len(references),), model.null_label, dtype=torch.long)
    samples = torch.cat(
        [
            decoder(model.generate(lab, z, num_steps=plan.sample_steps, sampler='euler'))
            for lab, z in zip(labels.split(32), noise.split(32))
        ]
    )
    if inception is not None:
        quality = sample_quality([samples], [references], inception, swd_images=len(references))
        metrics.update({k: v for k, v in quality.items() if not k.startswith('num_')})
    else:
        metrics.update(swd(samples, references))
    return metrics


def evaluate_run(
    runs: str, out: str, stage: str, cfg: dict[str, Any], latents: str, resolution: int, plan: DownstreamPlan
) -> dict[int, dict[str, float]]:
    """Every checkpoint's numbers, each cached in ``OUT/<stage>/evals/ba<step>.json``."""
    curve, todo = {}, {}
    for step, path in checkpoints(out, stage).items():
        cache = os.path.join(out, stage, 'evals', f'ba{step}.json')
        if os.path.isfile(cache):
            curve[step] = _read_json(cache)
        else:
            todo[step] = (path, cache)
    if todo:
        _say(stage, f'evaluating steps {sorted(todo)}')
        val_latents = held_out_latents(latents)
        count = min(plan.swd_images, len(val_latents))
        references = held_out_images(runs, resolution, count)
        decoder = LatentDecoder(latent_metadata(os.path.join(latents, 'val'))).eval()
        inception = None
        if plan.gfid:
            try:
                inception = load_inception(allow_download=False)
            except MissingWeightsError:
                pass  # gFID only where the weights exist; SWD needs none
        for step, (path, cache) in todo.items():
            curve[step] = evaluate_checkpoint(cfg, path, val_latents, references, decoder, plan, inception)
            _write_json(cache, curve[step])
    return dict(sorted(curve.items()))


def run_vae(runs: str, out: str, stage: str, resolution: int, plan: DownstreamPlan) -> dict[str, Any]:
    """Every stage of one VAE; what the report needs of it."""
    vae_dir = prepare_vae(runs, out, stage, resolution, plan)
    latents = encode(runs, out, stage, vae_dir, resolution)
    proxy = proxies(runs, out, stage, vae_dir, resolution, plan)
    cfg, seconds = run_training(plan, out, stage, latents)
    return {
        'factors': {k: v for k, v in _read_json(os.path.join(out, stage, 'factors.json')).items() if 'factor' in k},
        'proxies': proxy,
        'curve': evaluate_run(runs, out, stage, cfg, latents, resolution, plan),
        'train_seconds': seconds,
        'network': cfg['network']['name'],
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--runs', default=None, help='the replication (default: runs/replicate-testbed)')
    parser.add_argument('--out', default=None, help='runs folder of this experiment (default: RUNS/downstream)')
    parser.add_argument('--docs', default=None, help='where RESULTS.md and results/ are (default: docs, or OUT/docs)')
    parser.add_argument('--quick', action='store_true', help='a tiny network and budget: a smoke run')
    parser.add_argument('--steps', type=int, default=None, help=f'training steps per VAE (default: {FULL.steps})')
    parser.add_argument('--eval-every', type=int, default=None, help=f'default: {FULL.eval_every}')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: every core)')
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    runs = os.path.normpath(args.runs or 'runs/replicate-testbed')
    out = os.path.normpath(args.out or os.path.join(runs, 'downstream'))
    docs = args.docs or (os.path.join(out, 'docs') if args.quick else 'docs')
    overrides = {'steps': args.steps, 'eval_every': args.eval_every}
    plan = replace(QUICK if args.quick else FULL, **{k: v for k, v in overrides.items() if v is not None})
    replicated = replication(runs)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    resolution = int(replicated['resolution'])
    os.makedirs(out, exist_ok=True)
    plan_file = os.path.join(out, 'plan.json')
    if os.path.isfile(plan_file) and _read_json(plan_file) != json.loads(json.dumps(asdict(plan))):
        raise SystemExit(f'error: {out} was run with another plan ({plan_file}); use another --out.')
    _write_json(plan_file, asdict(plan))
    results = {
        f'{arm}-s{seed}': {'arm': arm, 'seed': seed, **run_vae(runs, out, f'{arm}-s{seed}', resolution, plan)}
        for seed in replicated['seeds']
        for arm in ARMS
    }
    report = {
        'plan': asdict(plan),
        'replication': {'runs': runs, 'resolution': resolution, 'seeds': replicated['seeds']},
        'runs': results,
        'comparison': downstream_report.compare(results),
        'command': shlex.join(['python', 'scripts/downstream.py', *(sys.argv[1:] if argv is None else argv)]),
        'seconds': time.perf_counter() - start,
    }
    os.makedirs(os.path.join(docs, 'results'), exist_ok=True)
    downstream_report.plot_curves(report, os.path.join(docs, 'results', 'downstream.png'))
    _write_json(os.path.join(docs, 'results', 'downstream.json'), report)
    downstream_report.write_section(os.path.join(docs, 'RESULTS.md'), downstream_report.section(report))
    print(f'Wrote the Downstream section of {docs}/RESULTS.md ({report["seconds"] / 60:.1f} min)', flush=True)
    return 0


if __name__ == '__main__':
    run_cli(main)
