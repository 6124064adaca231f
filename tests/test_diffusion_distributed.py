"""train_diffusion.py under the composer launcher: two CPU processes (gloo; DDP, or FSDP2 with EMA) train on one
latent dataset."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from tests.diffusion_fixtures import NUM_CLASSES, latents  # noqa: F401  (fixture, used by name)
from tests.test_diffusion_model import TINY

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


@pytest.mark.parametrize('mode', ['ddp', 'fsdp'])
def test_two_processes_train_evaluate_and_checkpoint(latents, tmp_path, mode):  # noqa: F811
    folder, _ = latents
    grid = {'classes': [0, 1], 'per_class': 1, 'num_steps': 2, 'folder': str(tmp_path / 'grid')}
    cfg = {
        'num_classes': NUM_CLASSES,
        'network': {'name': 'DiT-S/2', 'overrides': TINY},
        'train_loader': {'dataset': {'local': str(folder)}},
        'eval_loader': {'dataset': {'local': str(folder)}},
        'eval_interval': '2ba',
        'callbacks': {'sample_grid': grid},
        'fsdp': {} if mode == 'fsdp' else None,
        # Under FSDP2 the EMA's copy is sharded too: it must swap in for the evaluation and the grid, and be saved.
        'algorithms': {'ema': {'half_life': '1ba'}} if mode == 'fsdp' else {},
        'max_duration': '2ba',
        'global_train_batch_size': 4,
        'save_folder': str(tmp_path / 'ckpt'),
        'save_interval': '2ba',
        'console_log_interval': '1ba',
    }
    (tmp_path / 'run.yaml').write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, '-m', 'composer.cli.launcher', '-n', '2', 'train_diffusion.py', str(tmp_path / 'run.yaml')]
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1', 'FSDP_VERSION': '2'}
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'Eval metrics/eval/ValLoss: ' in result.stdout + result.stderr
    assert (tmp_path / 'grid' / 'samples_ba2.png').is_file()
    if mode == 'ddp':  # one monolithic checkpoint, written by rank 0
        state = torch.load(tmp_path / 'ckpt' / 'ep0-ba2-rank0.pt', weights_only=False)['state']
        assert any(k.startswith('transformer.') for k in state['model'])
    else:  # torch.distributed.checkpoint's folder of shards, with every rank's shard of the EMA's copy
        folder = tmp_path / 'ckpt' / 'ep0-ba2'
        assert sorted(p.name for p in folder.glob('*.distcp')) == ['__0_0.distcp', '__1_0.distcp']
        keys = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
        ema_keys = [k for k in keys if k.startswith('state.callbacks.EMACopy.named_parameters_dict.')]
        assert ema_keys and all(isinstance(keys[k], TensorStorageMetadata) for k in ema_keys)
