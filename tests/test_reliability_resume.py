"""Autoresume, end to end: SIGKILL ``train.py`` mid-epoch, start the same command again, and reach the
same weights and optimizer state as a run that was never interrupted."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from streaming.base.util import clean_stale_shared_memory

from tests.test_train import run_config, write_mds

REPO = Path(__file__).resolve().parents[1]
MAX_BATCHES, SAVE_EVERY = 6, 2


def _command(config: Path, save_folder: Path) -> list[str]:
    return [
        sys.executable,
        str(REPO / 'train.py'),
        str(config),
        f'save_folder={save_folder}',
        f'max_duration={MAX_BATCHES}ba',
        f'save_interval={SAVE_EVERY}ba',
    ]


def _run(cmd: list[str]) -> str:
    result = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _env() -> dict[str, str]:
    return {**os.environ, 'PYTHONPATH': str(REPO), 'PYTHONUNBUFFERED': '1'}


def _final_state(save_folder: Path) -> dict:
    checkpoint = torch.load(save_folder / 'latest-rank0.pt', weights_only=False)
    assert int(checkpoint['state']['timestamp']['Timestamp']['batch']) == MAX_BATCHES
    return checkpoint['state']


def _flatten(tree, prefix=''):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _flatten(value, f'{prefix}{key}.')
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _flatten(value, f'{prefix}{i}.')
    elif isinstance(tree, torch.Tensor):
        yield prefix.rstrip('.'), tree


@pytest.mark.slow
def test_sigkill_mid_epoch_then_same_command_resumes_exactly(tmp_path):
    clean_stale_shared_memory()
    train_dir = write_mds(tmp_path / 'train', 48)  # 12 batches of 4: the kill lands mid-epoch
    val_dir = write_mds(tmp_path / 'val', 4, seed=1)
    cfg = run_config(
        tmp_path,
        train_dir,
        val_dir,
        run_name='resume',
        autoresume=True,
        eval_interval='4ba',
        console_log_interval='1ba',
        model={'eval_metrics': ['PSNR']},
        export_folder=None,
        metrics_file=None,
    )
    config = tmp_path / 'resume.yaml'
    config.write_text(yaml.safe_dump(OmegaConf.to_container(cfg)))

    _run(_command(config, tmp_path / 'uninterrupted'))
    reference = _final_state(tmp_path / 'uninterrupted')

    folder = tmp_path / 'killed'
    cmd = _command(config, folder)
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    latest = folder / 'latest-rank0.pt'
    deadline = time.monotonic() + 240
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole process group, as a preempted node would
    out = proc.communicate()[0].decode()
    assert proc.returncode == -signal.SIGKILL, f'the run ended before it could be killed:\n{out[-3000:]}'
    killed_at = torch.load(latest, weights_only=False)['state']['timestamp']['Timestamp']['batch']
    assert 0 < killed_at < MAX_BATCHES

    resumed_out = _run(cmd)  # the same command again
    first_logged = int(resumed_out.split('[batch=')[1].split('/')[0])
    assert first_logged == killed_at + 1, 'the second start did not resume from the checkpoint'
    resumed = _final_state(folder)

    ref_tensors, got_tensors = dict(_flatten(reference['model'])), dict(_flatten(resumed['model']))
    ref_tensors.update(_flatten(reference['optimizers'], 'optim.'))
    got_tensors.update(_flatten(resumed['optimizers'], 'optim.'))
    assert set(ref_tensors) == set(got_tensors)
    diffs = {k: (ref_tensors[k].double() - got_tensors[k].double()).abs().max().item() for k in ref_tensors}
    print(f'resume check: killed at batch {killed_at}, {len(diffs)} tensors, max |diff| = {max(diffs.values())}')
    assert max(diffs.values()) == 0.0, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
    clean_stale_shared_memory()
