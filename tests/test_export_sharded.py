"""Export from FSDP sharded checkpoints: a real 2-process FSDP2 run (gloo) saves one, one process exports it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from streaming.base.util import clean_stale_shared_memory

from eqvae_composer.checkpoints import AutoencoderLoadError, load_autoencoder
from tests.test_checkpoints_composer import run_export_script
from tests.test_train import write_mds

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'tests' / 'distributed' / 'train_sharded.py'
WEIGHTS = 'diffusion_pytorch_model.safetensors'

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """Checkpoints of the run, its end-of-training export (EMA, gathered in the run) and its gathered raw weights."""
    run_dir = tmp_path_factory.mktemp('fsdp')
    clean_stale_shared_memory()
    write_mds(run_dir / 'train', 16)
    write_mds(run_dir / 'val', 4, seed=1)
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'FSDP_VERSION': '2', 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'composer.cli.launcher', '-n', '2', str(SCRIPT), str(run_dir)]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    clean_stale_shared_memory()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {
        'checkpoints': run_dir / 'checkpoints',
        'ema': load_file(run_dir / 'run' / 'vae' / WEIGHTS),
        'raw': torch.load(run_dir / 'raw.pt'),
    }


def assert_same_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def test_run_wrote_a_sharded_checkpoint_folder(run):
    folder = run['checkpoints'] / 'ep0-ba2'
    assert {p.name for p in folder.iterdir()} == {'__0_0.distcp', '__1_0.distcp', '.metadata'}
    assert (run['checkpoints'] / 'latest-rank0.pt').resolve() == folder.resolve()
    # The export below must be EMA-aware: the run's EMA and raw weights differ.
    assert any(not torch.equal(run['ema'][k], run['raw'][k]) for k in run['raw'])


@pytest.mark.parametrize('name', ['latest-rank0.pt', 'ep0-ba2'])
def test_export_script_writes_the_runs_ema_weights(run, name, tmp_path, capsys):
    run_export_script(['--checkpoint', str(run['checkpoints'] / name), '--out', str(tmp_path / 'vae')])
    assert 'the EMA weights' in capsys.readouterr().out
    assert_same_weights(load_file(tmp_path / 'vae' / WEIGHTS), run['ema'])


def test_load_autoencoder_reads_a_sharded_checkpoint(run):
    assert_same_weights(load_autoencoder(run['checkpoints'] / 'ep0-ba2').state_dict(), run['ema'])


def test_raw_weights_of_a_sharded_ema_run_come_from_every_ranks_shard(run, tmp_path, capsys):
    # EMA's copy (here: the raw weights) is saved as every rank's shard (eqvae_composer.algorithms.EMA); the
    # refusal of checkpoints that hold rank 0's shard only is in tests/test_ema_resume.py.
    run_export_script(['--checkpoint', str(run['checkpoints'] / 'ep0-ba2'), '--out', str(tmp_path), '--raw'])
    assert 'the raw training weights' in capsys.readouterr().out
    assert_same_weights(load_file(tmp_path / WEIGHTS), run['raw'])


@pytest.mark.parametrize('lost', ['.metadata', '__1_0.distcp'])
def test_a_folder_left_by_a_killed_save_is_named(run, lost, tmp_path):
    folder = shutil.copytree(run['checkpoints'] / 'ep0-ba2', tmp_path / 'ep0-ba2')
    (folder / lost).unlink()
    with pytest.raises(AutoencoderLoadError, match='incomplete or unreadable FSDP sharded checkpoint'):
        load_autoencoder(folder)
