"""scripts/bench_data.py runs end to end (``--smoke``: numbers meaningless) and its contenders do the same job."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_run_prints_every_measure(tmp_path):
    result = subprocess.run(
        [sys.executable, 'scripts/bench_data.py', '--smoke', '--reps', '2', '--workdir', str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for heading in ('conversion (images/s', 'loader, 1 process', 'conversion peak RSS'):
        assert heading in out
    assert out.count(' x') >= 8  # a ratio for every contender


@pytest.mark.slow
@pytest.mark.parametrize(
    'mode, heading',
    [
        (['--profile'], 'conversion profile'),
        (['--part-sizes', '20', '40'], 'conversion by part size'),
        (['--resize'], 'crop resize to 256 px'),
    ],
)
def test_smoke_run_of_each_single_measurement(tmp_path, mode, heading):
    # The commands docs/BENCHMARKS.md cites for its profile, part-size and resize figures.
    result = subprocess.run(
        [sys.executable, 'scripts/bench_data.py', '--smoke', '--reps', '2', '--workdir', str(tmp_path), *mode],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert heading in result.stdout


def _load_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location('bench_data', REPO / 'scripts' / 'bench_data.py')
    module = importlib.util.module_from_spec(spec)
    sys.modules['bench_data'] = module  # the process pool pickles its functions by module name
    spec.loader.exec_module(module)
    return module


def _samples(folder) -> list[tuple[int, int, bytes]]:
    """Every sample's (i, y, decoded pixels) of an MDS dataset written by streaming's loop, sorted."""
    from streaming.base.format import reader_from_json

    index = json.loads((folder / 'index.json').read_text())
    readers = [reader_from_json(str(folder), None, shard) for shard in index['shards']]
    items = [reader.get_item(i) for reader in readers for i in range(reader.samples)]
    return sorted((item['i'], item['y'], item['x'].tobytes()) for item in items)


def test_streaming_in_parallel_writes_every_sample_once(tmp_path):
    # The equal-process-count contender must do streaming's whole job: every file, with its class,
    # in one merged dataset, like the one-process loop.
    bench = _load_bench()
    raw = tmp_path / 'raw'
    for i in range(23):
        folder = raw / 'train' / f'n{i % 3:08d}'
        folder.mkdir(parents=True, exist_ok=True)
        Image.new('RGB', (8, 8), (10 * i, 0, 0)).save(folder / f'{i:02d}.JPEG')
    bench.streaming_parallel(str(raw), str(tmp_path / 'parallel'), processes=2, part_size=5)
    bench.streaming_imagenet_style(str(raw), str(tmp_path / 'serial'))
    parallel, serial = _samples(tmp_path / 'parallel' / 'train'), _samples(tmp_path / 'serial' / 'train')
    assert len(json.loads((tmp_path / 'parallel' / 'train' / 'index.json').read_text())['shards']) == 5  # 1 per part
    assert [i for i, _, _ in parallel] == list(range(23))
    assert parallel == serial
