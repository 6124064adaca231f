"""Reproduce EQ-VAE's claim at small scale on CPU: base -> fine-tunes (arms x seeds) -> evaluation -> docs.

    python scripts/replicate.py                 # the whole experiment (docs/RESULTS.md, docs/results/)
    python scripts/replicate.py --quick --out /tmp/rep --docs /tmp/rep/docs   # a smoke run of a few minutes
    python scripts/photo_testbed.py && python scripts/replicate.py --photos testbed --out runs/replicate-testbed

Stages, each cached under ``--out``; the same command started again after a kill resumes where it stopped:

1. data: crops of the demo photographs that are larger than the training resolution, so every training
   and held-out image is downsampled and has detail down to the pixel (``OUT/data``); with ``--photos
   testbed`` (or ``--photos DIR``) the photograph testbed that ``scripts/photo_testbed.py`` built instead:
   37 photographs from Debian's wallpaper packages, 6 of them held out;
2. base: a small f8 AutoencoderKL trained from scratch at 128 px (16x16 latents; ``--downsampling 4``: f4,
   32x32 latents, the paper's grid), checkpointed along the way so its held-out PSNR curve shows where it
   plateaus;
3. fine-tunes from the base, one per arm and seed (``ARMS``): ``control`` (the same fine-tuning without
   the regularizer), ``eq`` (``EquivarianceAlgorithm()``), ``eq-alternating`` (eq with the reference's
   alternating GAN updates), ``eq-discrete`` (eq drawing the evaluation scales), and investigation arms
   on request (``--arms``: ``lowres-only``, ``eq-no-lowres``);
4. evaluation of every checkpoint on the held-out split, then tables, plots and ``RESULTS.md``
   (``replicate_report``).

Up to ``--jobs`` stages run at once, each in its own process with one torch thread (a single stage
runs alone with all of them) and its own copy of the data: two StreamingDatasets reading one local
folder at once collide in streaming's shared memory. A stage's process dies with this one.

LPIPS needs VGG16 weights an offline machine lacks, so every stage trains with ``lpips_weight: 0``
(L1 + KL + adaptive PatchGAN); evaluation leaves out rFID and LPIPS for the same reason.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

if __package__ in (None, ''):  # run as a file: make `scripts.replicate_report` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from eqvae_composer.checkpoints import load_autoencoder
from eqvae_composer.cli import run_cli
from eqvae_composer.data.convert import ConvertOptions, convert_split
from eqvae_composer.data.demo import write_demo_folders
from eqvae_composer.data.sources import list_folder
from eqvae_composer.evaluation import EvalProtocol, build_eval_dataset, evaluate
from eqvae_composer.train import train
from scripts import replicate_report
from scripts.photo_testbed import DEFAULT_OUT as DEFAULT_TESTBED

#: The fine-tuning arms: TrainConfig sections merged over the shared fine-tuning config, and what each shows.
ARMS: dict[str, tuple[dict[str, Any], str]] = {
    'control': ({}, 'the same fine-tuning without the regularizer'),
    'eq': ({'algorithms': {'equivariance': {}}}, '`EquivarianceAlgorithm()`, the reference defaults'),
    'eq-alternating': (
        {'algorithms': {'equivariance': {}}, 'optimizer': {'gan_updates': 'alternating'}},
        "eq with the reference's GAN schedule: alternating autoencoder and discriminator updates, two passes",
    ),
    'eq-discrete': (
        {'algorithms': {'equivariance': {'scales': 'discrete'}}},
        'eq drawing scales from {0.25, 0.5, 0.75} (`scales: discrete`, the evaluation scales) instead of the s/32 grid',
    ),
    # Investigation arms (--arms): which part of the algorithm moves which error.
    'lowres-only': (
        {'algorithms': {'equivariance': {'p_equivariance': 0.0}}},
        'the low-resolution prior branch alone (p_equivariance 0, p_lowres 0.25): no transformed latents',
    ),
    'eq-no-lowres': (
        {'algorithms': {'equivariance': {'p_lowres': 0.0}}},
        'eq without the low-resolution prior branch (p_lowres 0)',
    ),
}
DEFAULT_ARMS = ('control', 'eq', 'eq-alternating', 'eq-discrete')

#: block_out_channels per downsampling factor: SD-VAE's layout at reduced width; f4 has one block fewer, as
#: LDM's kl-f4 (3 levels) has against kl-f8 (4).
BLOCKS_BY_DOWNSAMPLING: dict[int, tuple[int, ...]] = {8: (16, 32, 32, 32), 4: (16, 32, 32)}


@dataclass(frozen=True)
class Plan:
    """Sizes and schedules of one experiment."""

    resolution: int = 128
    block_out_channels: tuple[int, ...] = (16, 32, 32, 32)
    norm_num_groups: int = 8
    batch_size: int = 8
    base_steps: int = 1400
    base_lr: float = 5e-4
    base_lr_final: float = 0.1  # cosine decay of the base's lr to this fraction, so that it settles
    # Share of the base's steps before its discriminator joins (LDM's autoencoders start it late): L1 alone
    # first, which reaches a given PSNR in fewer steps. The fine-tunes always start theirs at step 0.
    base_gan_start: float = 0.0
    base_checkpoint_every: int = 200
    finetune_steps: int = 400
    finetune_lr: float = 2e-4  # constant, as the reference fine-tunes
    finetune_evals: int = 4  # checkpoints evaluated along fine-tuning (every M / finetune_evals steps)
    seeds: tuple[int, ...] = (17, 18)
    arms: tuple[str, ...] = DEFAULT_ARMS
    eval_resolutions: tuple[int, ...] = (128, 256)  # the first is where curves and intrinsic dimension are taken
    eval_images: int | None = None  # None: the whole held-out split
    # The demo photographs' crops (a testbed brings its own, see photo_testbed.CropSpec):
    crop_sides: tuple[int, int] = (160, 300)  # sides above 128 px, at most chelsea.png's 300
    train_per_photo: int = 48
    eval_per_photo: int = 24
    base_seed: int = 17
    photos: str = 'demo'  # 'demo' (scikit-image's photographs) or the folder of a photo_testbed.py testbed

    def __post_init__(self) -> None:
        unknown = [arm for arm in self.arms if arm not in ARMS]
        if unknown:
            raise ValueError(f'unknown arms {unknown}; choose from {list(ARMS)}.')
        if 'control' not in self.arms:
            raise ValueError('the arms must include control: every other arm is compared with it.')

    @property
    def downsampling(self) -> int:
        """Pixels per latent cell: diffusers' Encoder halves the size after every block but the last."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def stages(self) -> list[str]:
        """The fine-tuning stages, ``<arm>-s<seed>``, seed by seed."""
        return [f'{arm}-s{seed}' for seed in self.seeds for arm in self.arms]


FULL = Plan()
#: The photo testbed's defaults (--photos testbed or DIR): its 1488 crops of 31 photographs need a longer base,
#: and one trained on L1 + KL alone (the discriminator never joins it; the fine-tunes bring theirs) reaches
#: 21.4 dB on the held-out photographs in 800 steps where the base with its GAN from step 0 reached 20.3.
TESTBED_BASE = {'base_steps': 2400, 'base_gan_start': 1.0}
QUICK = Plan(
    resolution=64,
    crop_sides=(96, 192),
    base_steps=16,
    base_checkpoint_every=8,
    finetune_steps=4,
    finetune_evals=2,
    eval_resolutions=(64, 128),
    eval_images=6,
    train_per_photo=4,
    eval_per_photo=3,
    arms=('control', 'eq', 'eq-alternating'),  # the report's every path, in fewer stages
)


def parse_stage(stage: str) -> tuple[str, int]:
    """``'eq-alternating-s17'`` -> ``('eq-alternating', 17)``."""
    arm, seed = stage.rsplit('-s', 1)
    return arm, int(seed)


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


def _merge(into: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
    return into


def stage_config(plan: Plan, stage: str, data: str, out: str, base_vae: str | None = None) -> dict[str, Any]:
    """The ``TrainConfig`` dict of one stage (``base`` or ``<arm>-s<seed>``); ``data`` holds ``train/``."""
    run_dir = os.path.join(out, stage)
    finetune = stage != 'base'
    arm, seed = parse_stage(stage) if finetune else ('base', plan.base_seed)
    steps = plan.finetune_steps if finetune else plan.base_steps
    every = max(1, plan.finetune_steps // plan.finetune_evals) if finetune else plan.base_checkpoint_every
    config = {
        'run_name': f'replicate-{stage}',
        'seed': seed,  # the arms of one seed share it: same discriminator init, data order and noise
        'model': {
            'vae': {'pretrained': base_vae} if finetune else {'config': vae_config(plan)},
            'loss': {
                'lpips_weight': 0.0,  # VGG16 weights are not available offline
                'kl_weight': 1e-6,
                'disc_weight': 0.5,
                'disc_start': 0 if finetune else round(plan.base_gan_start * plan.base_steps),
                'disc_num_filters': 32,
                # the smallest scale (0.25) gives res/4 px images: a 3-layer PatchGAN needs 24
                'disc_num_layers': 2 if plan.resolution < 128 else 3,
            },
            'eval_metrics': ['PSNR'],
        },
        'train_loader': {'dataset': {'local': os.path.join(data, 'train'), 'resolution': plan.resolution}},
        'optimizer': {'lr': plan.finetune_lr if finetune else plan.base_lr, 'betas': [0.5, 0.9]},
        'algorithms': {},
        'schedulers': {} if finetune else {'cosine_annealing': {'alpha_f': plan.base_lr_final}},
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
    return _merge(config, json.loads(json.dumps(ARMS[arm][0])) if finetune else {})


# ---------------------------------------------------------------------------------------------------------
# Stages


def _write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(path + '.tmp', path)  # a killed write leaves the old file or none, never half of one


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def testbed_manifest(folder: str) -> dict[str, Any]:
    """The manifest of the photo testbed in ``folder`` (``scripts/photo_testbed.py``); a clear error without one."""
    manifest = os.path.join(folder, 'manifest.json')
    if not os.path.isfile(manifest):
        raise SystemExit(
            f'error: --photos {folder}: no photo testbed there (no {manifest}); '
            f'build it with: python scripts/photo_testbed.py --out {folder}'
        )
    return _read_json(manifest)


def data_spec(plan: Plan) -> dict[str, Any]:
    """What ``OUT/data`` was written from; a run folder's data is reused only for the same spec."""
    if plan.photos == 'demo':
        return {'crop_sides': list(plan.crop_sides), 'train': plan.train_per_photo, 'val': plan.eval_per_photo}
    manifest = testbed_manifest(plan.photos)
    return {'photos': 'testbed', 'testbed': manifest['spec'], 'splits': manifest['splits']}


def data_line(plan: Plan) -> str | None:
    """RESULTS.md's description of a testbed's data (``None`` for the demo photographs, which it describes itself)."""
    if plan.photos == 'demo':
        return None
    manifest = testbed_manifest(plan.photos)
    spec, splits, images = manifest['spec'], manifest['splits'], manifest['images']
    low, high = spec['crop_sides']
    return (
        f"crops of real photographs from Debian's wallpaper packages (`scripts/photo_testbed.py`; licences in its\n"
        f'  manifest.json), each shrunk to {spec["work_side"]} px on its shorter side, crop sides {low}-{high} px:\n'
        f'  {images["train"]} crops of {len(splits["train"])} photographs for training, {images["val"]} crops of '
        f'{len(splits["val"])} other photographs held out ({", ".join(splits["val"])}).'
    )


def prepare_data(plan: Plan, out: str) -> str:
    """Write the experiment's train / val MDS datasets once (``OUT/data``); return that folder."""
    data = os.path.join(out, 'data')
    spec = data_spec(plan)
    spec_file = os.path.join(data, 'spec.json')
    if os.path.isfile(spec_file):
        if _read_json(spec_file) != spec:
            raise SystemExit(f'error: {data} was written for {_read_json(spec_file)}, not {spec}; use another --out.')
        return data
    shutil.rmtree(data, ignore_errors=True)
    if plan.photos != 'demo':  # the testbed's shards as they are: photo_testbed.py wrote them with the converter
        for split in ('train', 'val'):
            shutil.copytree(os.path.join(plan.photos, split), os.path.join(data, split))
        _write_json(spec_file, spec)
        return data
    staging = os.path.join(out, 'data-raw')
    shutil.rmtree(staging, ignore_errors=True)
    folders = write_demo_folders(
        staging,
        train_per_photo=plan.train_per_photo,
        eval_per_photo=plan.eval_per_photo,
        crop_sides=plan.crop_sides,
    )
    for split, folder in folders.items():
        convert_split(list_folder(folder, split)[0], os.path.join(data, split), ConvertOptions(workers=1))
    shutil.rmtree(staging)
    _write_json(spec_file, spec)
    return data


def stage_data(out: str, stage: str) -> str:
    """The stage's own copy of ``OUT/data`` (see the module docstring for why each stage has one)."""
    copy = os.path.join(out, stage, 'data')
    if not os.path.isfile(os.path.join(copy, 'spec.json')):
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(os.path.join(out, 'data'), copy + '.tmp')
        os.replace(copy + '.tmp', copy)
    return copy


def export_folder(out: str, stage: str) -> str:
    return os.path.join(out, stage, 'vae')


def reconstructions_file(out: str) -> str:
    """Where a testbed run keeps its reconstructions figure (never in the docs: it shows the photographs)."""
    return os.path.join(out, 'reconstructions.png')


def checkpoints(out: str, stage: str) -> dict[int, str]:
    """A stage's Composer checkpoints by batch count (Composer's default ``ep{e}-ba{b}-rank0.pt`` names)."""
    found = {}
    for path in glob.glob(os.path.join(out, stage, 'checkpoints', 'ep*-ba*-rank0.pt')):
        match = re.search(r'-ba(\d+)-rank0\.pt$', path)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def _relocate(value: Any, source: str, out: str) -> Any:
    """``value`` with every path under the run folder ``source`` moved under ``out``."""
    if isinstance(value, dict):
        return {key: _relocate(item, source, out) for key, item in value.items()}
    if isinstance(value, list):
        return [_relocate(item, source, out) for item in value]
    if isinstance(value, str) and (value == source or value.startswith(source + os.sep)):
        return out + value[len(source) :]
    return value


def adopt_base(plan: Plan, out: str, source: str) -> None:
    """Start ``out`` from the data and trained base of the run folder ``source`` (``--base-from``).

    A fine-tuning variant (longer fine-tuning, another lr) then skips the base's 18 minutes. Refused unless
    the base was trained as this plan would train it.
    """
    if os.path.isfile(done_marker(out, 'base')):
        return
    if not os.path.isfile(done_marker(source, 'base')):
        raise SystemExit(f'error: --base-from {source} has no finished base ({done_marker(source, "base")}).')
    theirs = _relocate(_read_json(os.path.join(source, 'base', 'config.json')), source, out)
    mine = stage_config(plan, 'base', os.path.join(out, 'base', 'data'), out)
    if theirs != mine or _read_json(os.path.join(source, 'data', 'spec.json')) != data_spec(plan):
        raise SystemExit(f'error: the base in {source} was trained with another plan than this one; drop --base-from.')
    for folder in ('data', 'base'):
        shutil.rmtree(os.path.join(out, folder), ignore_errors=True)
        shutil.copytree(os.path.join(source, folder), os.path.join(out, folder))
    _write_json(os.path.join(out, 'base', 'config.json'), mine)
    _write_json(done_marker(out, 'base'), _read_json(done_marker(source, 'base')))


def run_training(plan: Plan, stage: str, out: str) -> float:
    """Train one stage unless its export exists (resuming from its checkpoints); return its training seconds."""
    seconds_file = os.path.join(out, stage, 'train_seconds.json')
    base_vae = export_folder(out, 'base') if stage != 'base' else None
    cfg = stage_config(plan, stage, stage_data(out, stage), out, base_vae)
    config_file = os.path.join(out, stage, 'config.json')
    if os.path.isfile(config_file) and _read_json(config_file) != cfg:
        raise RuntimeError(
            f'{config_file} holds another configuration for stage {stage} than this plan gives; '
            'use another --out (or delete the stage folder to retrain it).'
        )
    _write_json(config_file, cfg)
    if os.path.isfile(os.path.join(cfg['export_folder'], 'config.json')) and os.path.isfile(seconds_file):
        return _read_json(seconds_file)['seconds']
    start = time.perf_counter()
    train(cfg).close()
    seconds = time.perf_counter() - start  # after a kill: the resumed invocation's share only
    _write_json(seconds_file, {'seconds': seconds})
    return seconds


@dataclass(frozen=True)
class EvalSpec:
    """One cached evaluation: what is measured, of which weights, where the numbers go."""

    cache: str
    source: str
    resolution: int
    metrics: tuple[str, ...]


_FINAL_METRICS = ('psnr', 'ssim', 'equivariance')
_CURVE_METRICS = ('psnr', 'ssim', 'equivariance')


def stage_evals(plan: Plan, out: str, stage: str) -> list[EvalSpec]:
    """The evaluations that belong to ``stage``: its curve's checkpoints and its final weights."""
    evals = os.path.join(out, 'evals')
    train_res = plan.eval_resolutions[0]
    specs = []
    if stage == 'base':
        for step, path in checkpoints(out, 'base').items():
            specs.append(EvalSpec(os.path.join(evals, f'base-ba{step}.json'), path, train_res, ('psnr',)))
    else:
        for step, path in checkpoints(out, stage).items():
            if step < plan.finetune_steps:  # the last checkpoint is the final export, measured below
                specs.append(EvalSpec(os.path.join(evals, f'{stage}-ba{step}.json'), path, train_res, _CURVE_METRICS))
    for res in plan.eval_resolutions:
        metrics = _FINAL_METRICS + (('intrinsic_dim',) if res == train_res else ())
        specs.append(EvalSpec(os.path.join(evals, f'{stage}-{res}px.json'), export_folder(out, stage), res, metrics))
    return specs


def cached_eval(plan: Plan, spec: EvalSpec, val: str) -> dict[str, float]:
    """``evaluate`` once per spec; the numbers, the protocol and the time are kept in ``spec.cache``."""
    protocol = EvalProtocol(resolution=spec.resolution, sample_posterior=True, seed=0)
    key = {'source': os.path.abspath(spec.source), 'metrics': list(spec.metrics), 'num_images': plan.eval_images}
    if os.path.isfile(spec.cache):
        record = _read_json(spec.cache)
        if record.get('key') == key:
            return record['metrics']
    start = time.perf_counter()
    dataset = build_eval_dataset(val, spec.resolution)
    results = evaluate(
        load_autoencoder(spec.source),
        dataset,
        spec.metrics,
        protocol,
        num_images=plan.eval_images,
        batch_size=24,
        progress=False,
    )
    _write_json(spec.cache, {'key': key, **results, 'total_seconds': time.perf_counter() - start})
    return results['metrics']


def run_stage_job(plan: Plan, out: str, job: str) -> None:
    """One job of the schedule, in its own process: ``base`` trains; ``base-eval`` and each fine-tune evaluate."""
    if job == 'base':
        run_training(plan, 'base', out)
        return
    stage = 'base' if job == 'base-eval' else job
    if stage != 'base':
        run_training(plan, stage, out)
    val = os.path.join(stage_data(out, job), 'val')
    for spec in stage_evals(plan, out, stage):
        cached_eval(plan, spec, val)


# ---------------------------------------------------------------------------------------------------------
# The schedule: jobs as processes, at most --jobs at once


@dataclass
class Job:
    name: str
    after: tuple[str, ...] = ()
    process: subprocess.Popen | None = field(default=None, repr=False)
    started: float = 0.0


def _die_with_parent() -> None:
    """In the child, before exec: be killed when the scheduler dies, so a restart never finds it still running."""
    if sys.platform.startswith('linux'):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def done_marker(out: str, job: str) -> str:
    return os.path.join(out, 'done', f'{job}.json')


def job_threads(job: str, max_jobs: int) -> int:
    """Torch threads of a job: the base, which every other job waits for, gets every core; the others one each,
    even one that happens to start alone. A stage's numbers must not depend on when its neighbours finished,
    and a convolution's sums differ in their last bits between thread counts."""
    return max_jobs if job == 'base' else 1


def schedule(plan: Plan, out: str, max_jobs: int) -> dict[str, float]:
    """Run every job not yet done, dependencies first; return each job's wall seconds (as recorded)."""
    jobs = [Job('base'), Job('base-eval', after=('base',))] + [Job(s, after=('base',)) for s in plan.stages]
    is_done = lambda name: os.path.isfile(done_marker(out, name))  # noqa: E731
    pending = [job for job in jobs if not is_done(job.name)]
    running: list[Job] = []
    failed: list[str] = []
    os.makedirs(os.path.join(out, 'logs'), exist_ok=True)
    while (pending and not failed) or running:
        ready = [job for job in pending if all(is_done(dep) for dep in job.after)]
        while ready and len(running) < max_jobs and not failed:
            job = ready.pop(0)
            pending.remove(job)
            threads = job_threads(job.name, max_jobs)
            log = os.path.join(out, 'logs', f'{job.name}.log')
            command = [sys.executable, os.path.abspath(__file__), '--out', out, '--job', job.name]
            command += ['--threads', str(threads)]
            env = {**os.environ, 'OMP_NUM_THREADS': str(threads), 'PYTHONUNBUFFERED': '1'}
            with open(log, 'a') as f:
                job.process = subprocess.Popen(
                    command, stdout=f, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent
                )
            job.started = time.perf_counter()
            running.append(job)
            print(f'[replicate] {job.name}: started ({threads} thread(s); log {log})', flush=True)
        time.sleep(1.0)
        for job in list(running):
            code = job.process.poll()
            if code is None:
                continue
            running.remove(job)
            seconds = time.perf_counter() - job.started
            if code == 0:
                _write_json(done_marker(out, job.name), {'seconds': seconds})
                print(f'[replicate] {job.name}: done in {seconds / 60:.1f} min', flush=True)
            else:
                failed.append(job.name)
                print(f'[replicate] {job.name}: FAILED (exit {code}); see {out}/logs/{job.name}.log', flush=True)
    if failed:
        raise RuntimeError(f'stages failed: {failed}; their logs are in {out}/logs/. Fix and run the same command.')
    return {job.name: _read_json(done_marker(out, job.name))['seconds'] for job in jobs}


# ---------------------------------------------------------------------------------------------------------
# Collecting the numbers


def collect(plan: Plan, out: str) -> dict[str, Any]:
    """Every evaluation's numbers, arranged for the report (all cached by the jobs; computed here if missing)."""
    val = os.path.join(out, 'data', 'val')
    train_res = plan.eval_resolutions[0]

    def finals(stage: str) -> dict[int, dict[str, float]]:
        specs = [s for s in stage_evals(plan, out, stage) if s.source == export_folder(out, stage)]
        return {spec.resolution: cached_eval(plan, spec, val) for spec in specs}

    base = finals('base')
    by_seed: dict[int, dict[str, dict[int, dict[str, float]]]] = {}
    curves: dict[str, dict[int, dict[int, dict[str, float]]]] = {arm: {} for arm in plan.arms}
    for stage in plan.stages:
        arm, seed = parse_stage(stage)
        stage_finals = finals(stage)
        for res, metrics in stage_finals.items():
            by_seed.setdefault(res, {}).setdefault(arm, {})[seed] = metrics
        curve = {0: base[train_res]}
        for spec in stage_evals(plan, out, stage):
            match = re.search(r'-ba(\d+)\.json$', spec.cache)
            if match:
                curve[int(match.group(1))] = cached_eval(plan, spec, val)
        curve[plan.finetune_steps] = stage_finals[train_res]
        curves[arm][seed] = dict(sorted(curve.items()))
    base_curve = {
        int(re.search(r'-ba(\d+)\.json$', spec.cache).group(1)): cached_eval(plan, spec, val)['psnr']
        for spec in stage_evals(plan, out, 'base')
        if spec.source != export_folder(out, 'base')
    }
    final_at = {
        res: {'base': base[res], **{arm: replicate_report.mean_metrics(seeds) for arm, seeds in by_arm.items()}}
        for res, by_arm in by_seed.items()
    }
    eval_files = glob.glob(os.path.join(out, 'evals', '*.json'))
    return {
        'final': final_at[train_res],
        'final_by_seed': by_seed[train_res],
        'final_at': final_at,
        'final_at_by_seed': by_seed,
        'base_psnr_curve': dict(sorted(base_curve.items())),
        'finetune_curves': curves,
        'comparisons': {
            res: replicate_report.compare_with_control(by_arm, plan.seeds) for res, by_arm in by_seed.items()
        },
        'eval_seconds': sum(_read_json(path).get('total_seconds', 0.0) for path in eval_files),
        'num_evaluations': len(eval_files),
        'protocol': EvalProtocol(resolution=train_res, sample_posterior=True, seed=0).describe(),
        'num_eval_images': plan.eval_images or 'all',
    }


# ---------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=None, help='runs folder (default: runs/replicate, or runs/replicate-quick)')
    parser.add_argument('--docs', default=None, help='where RESULTS.md and results/ go (default: docs, or OUT/docs)')
    parser.add_argument('--quick', action='store_true', help='tiny step counts: a smoke run of a few minutes')
    parser.add_argument(
        '--photos',
        default='demo',
        metavar='demo|testbed|DIR',
        help="the photographs: demo (scikit-image's, the default), testbed (the one scripts/photo_testbed.py "
        f'built in {DEFAULT_TESTBED}) or the folder of another',
    )
    parser.add_argument(
        '--downsampling',
        type=int,
        choices=sorted(BLOCKS_BY_DOWNSAMPLING),
        default=None,
        help="the base VAE's factor: 8 (default; 16x16 latents at 128 px) or 4 (32x32, the paper's grid)",
    )
    parser.add_argument('--arms', nargs='+', choices=list(ARMS), help=f'arms (default: {" ".join(DEFAULT_ARMS)})')
    parser.add_argument('--seeds', nargs='+', type=int, help='fine-tuning seeds (default: 17 18)')
    parser.add_argument('--base-steps', type=int, default=None)
    parser.add_argument(
        '--base-gan-start',
        type=float,
        default=None,
        help="share of the base's steps before its discriminator joins (default: 0; 1: never, the testbed's)",
    )
    parser.add_argument('--finetune-steps', type=int, default=None)
    parser.add_argument('--finetune-lr', type=float, default=None)
    parser.add_argument(
        '--base-from', metavar='RUNS', help='start from the data and trained base of another runs folder of this plan'
    )
    parser.add_argument('--jobs', type=int, default=2, help='stages run at once (default: 2, one per core)')
    parser.add_argument('--job', help=argparse.SUPPRESS)  # internal: run one stage (the scheduler's child)
    parser.add_argument('--threads', type=int, default=1, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    overrides = {
        'base_steps': args.base_steps,
        'base_gan_start': args.base_gan_start,
        'finetune_steps': args.finetune_steps,
        'finetune_lr': args.finetune_lr,
        'arms': tuple(args.arms) if args.arms else None,
        'seeds': tuple(args.seeds) if args.seeds else None,
        'block_out_channels': BLOCKS_BY_DOWNSAMPLING[args.downsampling] if args.downsampling else None,
        'photos': None
        if args.photos == 'demo'
        else os.path.abspath(DEFAULT_TESTBED if args.photos == 'testbed' else args.photos),
    }
    plan = QUICK if args.quick else FULL
    if overrides['photos'] and not args.quick:
        plan = replace(plan, **TESTBED_BASE)
    return replace(plan, **{k: v for k, v in overrides.items() if v is not None})


def _plan_from_json(values: dict[str, Any]) -> Plan:
    return Plan(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = os.path.normpath(args.out or ('runs/replicate-quick' if args.quick else 'runs/replicate'))
    if args.job:  # a stage of the schedule, in its own process
        torch.set_num_threads(args.threads)
        run_stage_job(_plan_from_json(_read_json(os.path.join(out, 'plan.json'))), out, args.job)
        return 0
    start = time.perf_counter()
    plan = make_plan(args)
    docs = args.docs or (os.path.join(out, 'docs') if args.quick else 'docs')
    if plan.photos != 'demo':
        testbed_manifest(plan.photos)  # before anything is written: a missing testbed is one line
    os.makedirs(out, exist_ok=True)
    _write_json(os.path.join(out, 'plan.json'), asdict(plan))
    if args.base_from:
        adopt_base(plan, out, os.path.normpath(args.base_from))
    prepare_data(plan, out)
    job_seconds = schedule(plan, out, max(1, args.jobs))
    print('[replicate] collecting the evaluations and writing the report', flush=True)
    results = collect(plan, out)
    command = shlex.join(['python', 'scripts/replicate.py', *(sys.argv[1:] if argv is None else argv)])
    results.update(
        {
            'plan': asdict(plan),
            'arms': {arm: ARMS[arm][1] for arm in plan.arms},
            'job_seconds': job_seconds,
            'train_seconds': {
                stage: _read_json(os.path.join(out, stage, 'train_seconds.json'))['seconds']
                for stage in ['base', *plan.stages]
            },
            'command': command,
            'jobs': args.jobs,
            'data_line': data_line(plan),
        }
    )
    os.makedirs(os.path.join(docs, 'results'), exist_ok=True)
    exports = {'base': export_folder(out, 'base')}
    exports.update({arm: export_folder(out, f'{arm}-s{plan.seeds[0]}') for arm in plan.arms})
    replicate_report.plot_curves(results, os.path.join(docs, 'results', 'curves.png'))
    # The testbed's photographs are not ours to commit (nor crops of them): their figure stays in the run folder.
    figure = (
        os.path.join(docs, 'results', 'reconstructions.png') if plan.photos == 'demo' else reconstructions_file(out)
    )
    replicate_report.plot_reconstructions(os.path.join(out, 'data', 'val'), plan.resolution, exports, figure)
    results['reconstructions'] = None if plan.photos == 'demo' else figure
    results['report_seconds'] = time.perf_counter() - start
    _write_json(os.path.join(docs, 'results', 'results.json'), results)
    replicate_report.write_markdown(os.path.join(docs, 'RESULTS.md'), results)
    print(replicate_report.summary_table(results['final_at_by_seed'][plan.eval_resolutions[0]], plan), flush=True)
    print(f'Wrote {docs}/RESULTS.md ({(time.perf_counter() - start) / 60:.1f} min in this invocation)', flush=True)
    return 0


if __name__ == '__main__':
    run_cli(main)
