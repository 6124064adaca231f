"""scripts/bench_diffusion.py runs both contenders on the same model and reports their ratio."""

import importlib


def test_the_smoke_benchmark_times_both_loops(tmp_path):
    script = importlib.import_module('scripts.bench_diffusion')
    result = script.main(['--smoke', '--out', str(tmp_path / 'bench.json')])
    assert result['plain_s_per_step'] > 0 and result['trainer_s_per_step'] > 0
    assert len(result['ratios']) == 2 and result['ratio_plain_over_trainer'] > 0
    assert (tmp_path / 'bench.json').is_file()
