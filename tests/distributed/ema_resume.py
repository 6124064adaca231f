"""Launched by tests/test_ema_resume.py under `composer -n N`: EMA runs with FSDP2, stopped or killed, resumed.

Usage: FSDP_VERSION=2 composer -n N tests/distributed/ema_resume.py RUN_DIR PHASE KILLED [KIND ...]

RUN_DIR holds the MDS folder `train/`. A KIND is a checkpoint kind: `sharded` or `full` (FSDP2's
`state_dict_type`) or `ddp` (no `fsdp` section), or `old-sharded` / `old-full`: checkpoints saved by
Composer's own EMA, or `decoder-<kind>`: a decoder-only stage (`model.trainable: decoder`, EMA without
equivariance) from the VAE folder `RUN_DIR/stage1/`. Every run trains 4 batches with `algorithms.ema`
and `autoresume`, checkpointing every 2 into `RUN_DIR/checkpoints/<case>/`. At its end each rank saves
its own shards of the raw weights, of EMA's copy and of the Adam moments to
`RUN_DIR/snapshots/<case>-rank<r>.pt`; the batch a run started from goes to `RUN_DIR/started-at/<case>`.

PHASE `run`: for each KIND, an uninterrupted run (case `<kind>`), with its gathered EMA and raw VAE
weights in `RUN_DIR/weights/<kind>-{EMA,raw}.pt`, and a run stopped after its first checkpoint, then
started again in this process (case `<kind>-stopped`). An `old-<kind>` KIND instead saves one checkpoint
with Composer's EMA, then tries to resume it and writes the error to `RUN_DIR/errors/old-<kind>`. Last,
the case `<KILLED>-killed` starts and every rank SIGKILLs itself right after the first checkpoint.
PHASE `resume`: the killed run's command again.
"""

import gc
import os
import signal
import sys
from pathlib import Path

import torch
from composer import Callback, State, Trainer
from composer.algorithms import EMA as ComposerEMA
from composer.loggers import Logger
from composer.utils import dist
from torch.distributed.tensor import DTensor

from eqvae_composer import train as train_module
from eqvae_composer.checkpoints import trained_autoencoder
from eqvae_composer.ema import EMA, UnresumableEMACheckpointError
from eqvae_composer.train import train
from tests.test_train import run_config

MAX_BATCHES, SAVE_EVERY = 4, 2


class KillAfterFirstCheckpoint(Callback):
    """SIGKILLs this rank as the batch after the first checkpoint starts, as a preempted node would die."""

    def batch_start(self, state: State, logger: Logger) -> None:
        if int(state.timestamp.batch) == SAVE_EVERY:
            os.kill(os.getpid(), signal.SIGKILL)


def config(run_dir: Path, kind: str, case: str, max_batches: int = MAX_BATCHES):
    checkpoint_kind = kind.removeprefix('old-').removeprefix('decoder-')
    cfg = run_config(
        run_dir,
        run_dir / 'train',
        None,
        run_name=case,
        fsdp=None if checkpoint_kind == 'ddp' else {'state_dict_type': checkpoint_kind},
        algorithms={'equivariance': {}, 'ema': {'half_life': '1ba'}},
        global_train_batch_size=2 * dist.get_world_size(),
        eval_loader=None,
        metrics_file=None,
        export_folder=None,
        save_folder=str(run_dir / 'checkpoints' / case),
        save_interval=f'{SAVE_EVERY}ba',
        max_duration=f'{max_batches}ba',
        autoresume=True,
    )
    if kind.startswith('decoder-'):
        # The staged recipe's second stage: the encoder side frozen (under FSDP2 in one unit with the trained decoder:
        # Composer wraps the model's children, the VAE whole), without equivariance (which trains the encoder).
        cfg.model.trainable = 'decoder'
        cfg.model.vae = {'config': None, 'pretrained': str(run_dir / 'stage1')}
        cfg.algorithms = {'ema': {'half_life': '1ba'}}
    return cfg


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.to_local() if isinstance(tensor, DTensor) else tensor).detach().cpu().clone()


def _write(run_dir: Path, folder: str, name: str, text: str) -> None:
    if dist.get_global_rank() == 0:
        (run_dir / folder).mkdir(exist_ok=True)
        (run_dir / folder / name).write_text(text)


def snapshot(run_dir: Path, case: str, trainer: Trainer) -> None:
    """This rank's shards of everything a resumed run must restore exactly."""
    state = trainer.state
    tensors = {f'model.{k}': _local(v) for k, v in state.model.state_dict().items()}
    optimizer = state.optimizers[0]
    params = [p for group in optimizer.param_groups for p in group['params']]
    for i, param in enumerate(params):
        tensors.update({f'optim.{i}.{k}': _local(v) for k, v in optimizer.state[param].items()})
    ema = next(a for a in state.algorithms if isinstance(a, EMA))
    for kind in ('named_parameters_dict', 'named_buffers_dict'):
        tensors.update({f'ema.{kind}.{k}': _local(v) for k, v in getattr(ema.ema_model, kind).items()})
    tensors['ema.weights_active'] = torch.tensor(ema.ema_weights_active)
    tensors['batch'] = torch.tensor(int(state.timestamp.batch))
    (run_dir / 'snapshots').mkdir(exist_ok=True)
    torch.save(tensors, run_dir / 'snapshots' / f'{case}-rank{dist.get_global_rank()}.pt')


def release() -> None:
    # Every rank drops the last run's dataset before the next one registers its shared memory.
    gc.collect()
    dist.barrier()


def run(run_dir: Path, kind: str, case: str, max_batches: int = MAX_BATCHES) -> Trainer:
    trainer = train(config(run_dir, kind, case, max_batches), fit=False)
    _write(run_dir, 'started-at', case, str(int(trainer.state.timestamp.batch)))
    trainer.fit()
    if max_batches == MAX_BATCHES:
        snapshot(run_dir, case, trainer)
    trainer.close()
    return trainer


def save_weights(run_dir: Path, kind: str, trainer: Trainer) -> None:
    for ema in (True, False):
        vae, which = trained_autoencoder(trainer.state, ema=ema)  # a collective: every rank
        if dist.get_global_rank() == 0:
            (run_dir / 'weights').mkdir(exist_ok=True)
            torch.save(vae.state_dict(), run_dir / 'weights' / f'{kind}-{which}.pt')


def old_checkpoint_refused(run_dir: Path, kind: str) -> None:
    train_module.ALGORITHMS['ema'] = ComposerEMA
    run(run_dir, kind, kind, max_batches=SAVE_EVERY)
    train_module.ALGORITHMS['ema'] = EMA
    release()
    try:
        run(run_dir, kind, kind)
    except UnresumableEMACheckpointError as error:
        _write(run_dir, 'errors', kind, str(error))
    else:
        raise AssertionError(f'{kind}: resumed from a checkpoint of Composer EMA')


def main(run_dir: Path, phase: str, killed: str, kinds: list[str]) -> None:
    if phase == 'resume':
        run(run_dir, killed, f'{killed}-killed')
        return
    for kind in kinds:
        if kind.startswith('old-'):
            old_checkpoint_refused(run_dir, kind)
        else:
            save_weights(run_dir, kind, run(run_dir, kind, kind))
            release()
            run(run_dir, kind, f'{kind}-stopped', max_batches=SAVE_EVERY)
            release()
            run(run_dir, kind, f'{kind}-stopped')
        release()
    trainer = train(config(run_dir, killed, f'{killed}-killed'), fit=False)
    trainer.state.callbacks.append(KillAfterFirstCheckpoint())
    trainer.fit()
    raise AssertionError('the run was not killed')


if __name__ == '__main__':
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4:])
