"""The adaptive GAN weight under FSDP1 FULL_SHARD, where the loss sees the last layer's weight as a flat shard.

Composer's FSDP1 needs CUDA; ``tests/distributed/fsdp1_loss.py`` wraps the same units with PyTorch's
FSDP1 on two CPU processes (gloo). The CUDA run through Composer is in ``tests/test_cuda.py``.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'tests' / 'distributed' / 'fsdp1_loss.py'

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def test_adaptive_weight_under_fsdp1_full_shard_equals_the_unsharded_models(tmp_path):
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')]))}
    cmd = [sys.executable, '-m', 'composer.cli.launcher', '-n', '2', str(SCRIPT), str(tmp_path)]
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in range(2):
        seen = json.loads((tmp_path / f'rank{rank}.json').read_text())
        # The loss really was handed a sharded weight (on one rank a 1-D shard, on the other an empty one) ...
        assert len(seen['weight_shape_outside_forward']) == 1 and len(seen['full_weight_shape']) == 4
        # ... and each rank still gets the adaptive weight of its own microbatch, as without FSDP.
        assert seen['expected_disc_weight'] > 0
        assert seen['disc_weight'] == pytest.approx(seen['expected_disc_weight'], rel=1e-5)
        assert seen['total'] == pytest.approx(seen['expected_total'], rel=1e-5)
