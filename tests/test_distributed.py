"""DDP and FSDP2 on two CPU processes (gloo) under the composer launcher: the same weights on every
rank, and the same weights as one process training the same global batch as two microbatches."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'tests' / 'distributed' / 'train_ranks.py'
# BatchNorm running statistics are per process by design (each rank normalises its own
# microbatch); training uses batch statistics, so they are not part of the comparison.
_PER_RANK_BUFFERS = ('running_mean', 'running_var', 'num_batches_tracked')
# torch 2.7's FSDP2 *sums* gradients over gloo ranks instead of averaging them
# (pytorch/pytorch#162338; NCCL averages correctly). On CPU it therefore equals a single
# process whose learning rate is multiplied by the world size. torch 2.11's averages (measured,
# docs/OPERATIONS.md "Running on a newer torch"); the versions in between were not tried.
_GLOO_FSDP2_GRAD_SCALE = 2 if Version(torch.__version__).release < (2, 11) else 1

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def _launch(out: Path, mode: str, nproc: int, lr_scale: int = 1, gan_updates: str = 'joint') -> dict[str, torch.Tensor]:
    env = {
        **os.environ,
        'PYTHONPATH': str(REPO),
        'FSDP_VERSION': '2',
        'LR_SCALE': str(lr_scale),
        'GAN_UPDATES': gan_updates,
    }
    cmd = [sys.executable, '-m', 'composer.cli.launcher', '-n', str(nproc), str(SCRIPT), str(out), mode, '4']
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {r: _params(out / f'{mode}_w{nproc}_lr{lr_scale}_rank{r}.pt') for r in range(nproc)}


def _params(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in torch.load(path).items() if not k.endswith(_PER_RANK_BUFFERS)}


@pytest.mark.parametrize('mode', ['ddp', 'fsdp'])
@pytest.mark.parametrize('gan_updates', ['joint', 'alternating'])
def test_two_processes_match_each_other_and_one_process(mode, gan_updates, tmp_path):
    ranks = _launch(tmp_path, mode, 2, gan_updates=gan_updates)
    scale = _GLOO_FSDP2_GRAD_SCALE if mode == 'fsdp' else 1
    single = _launch(tmp_path, 'ddp', 1, lr_scale=scale, gan_updates=gan_updates)[0]
    init = _params(tmp_path / f'{mode}_w2_init.pt')
    moved = [n for n in init if not torch.equal(init[n], ranks[0][n])]
    assert any('decoder' in n for n in moved) and any('discriminator' in n for n in moved)  # it trained
    assert set(ranks[0]) == set(ranks[1]) == set(single)
    for name in ranks[0]:
        torch.testing.assert_close(ranks[0][name], ranks[1][name], rtol=0, atol=0, msg=name)
        # Averaged across ranks vs. accumulated over microbatches: equal up to float rounding.
        torch.testing.assert_close(ranks[0][name], single[name], rtol=1e-4, atol=1e-6, msg=name)
