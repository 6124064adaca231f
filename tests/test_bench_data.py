"""scripts/bench_data.py runs end to end (``--smoke``: tiny sizes, numbers meaningless)."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_run_prints_every_measure(tmp_path):
    result = subprocess.run(
        [sys.executable, 'scripts/bench_data.py', '--smoke', '--reps', '2', '--workdir', str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for heading in ('conversion (images/s', 'loader, 1 process', 'conversion peak RSS'):
        assert heading in out
    assert out.count(' x') >= 8  # a ratio for every contender
