"""scripts/bench_latents.py runs end to end (tiny VAE) and its contenders store the same values."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_run_prints_every_row_and_equal_values():
    result = subprocess.run(
        [sys.executable, str(REPO / 'scripts' / 'bench_latents.py'), '--smoke'],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (
        'plain loop (DataLoader',
        'ours (scripts/encode_latents.py)',
        'ours --channels-last',
        'bfloat16',
        'workers=1',
    )
    for row in rows:
        assert row in result.stdout
    assert 'max |mean_plain - mean_ours| = 0.00e+00' in result.stdout  # the same work, the same fp16 values
