"""scripts/gpu_check.sh --dry: every step of the GPU check runs on the CPU and lands in the report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

#: What the lent machine sends back: eight files at most.
OUTPUTS = {
    'gpu_check.json',
    'gpu_check.md',
    'tests.xml',
    'tests.log',
    'flops.log',
    'bench_train.json',
    'bench_train.log',
    'bench_compile.log',
}


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_the_report(tmp_path):
    # no wheels: this interpreter's packages (a checkout may hold .whl/ for the GPU machine's Python)
    env = {**os.environ, 'OUT': str(tmp_path / 'out'), 'PYTHON': sys.executable, 'GPU_CHECK_WHEELS_DIR': str(tmp_path)}
    proc = subprocess.run(
        ['bash', str(REPO / 'scripts' / 'gpu_check.sh'), '--dry'],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert set(os.listdir(tmp_path / 'out')) == OUTPUTS
    report = json.loads((tmp_path / 'out' / 'gpu_check.json').read_text())
    assert report['mode'] == 'dry' and report['ok']
    assert {name: step['rc'] for name, step in report['steps'].items()} == {
        'flops': 0,
        'cuda_tests': 0,
        'bench_train': 0,
        'bench_compile': 0,
    }

    tests = report['cuda_tests']
    assert tests['collected'] >= 10 and tests['failed'] == tests['errors'] == 0
    if not torch.cuda.is_available():
        assert tests['skipped'] == tests['collected']

    flops = report['flops_gflop_per_image']  # the real SD-VAE's, whatever the mode
    assert 0 < flops['ours_branch_mix'] < flops['ours_full_res'] < flops['reference_full_res']

    train = report['train']
    assert set(train['images_per_second']) == set(train['peak_mib']) == {'ours', 'reference', 'ours_eq_off'}
    assert all(v > 0 for v in train['images_per_second'].values()) and all(v > 0 for v in train['peak_mib'].values())
    assert train['adam_kernel'] == 'fused' and train['reference_bf16'] is True
    assert train['ours_over_reference']['value'] == train['ratios']['ours/reference'] > 0
    expected_tflops = train['images_per_second']['ours'] * flops['ours_branch_mix'] / 1e3
    assert train['ours_tflops'] == pytest.approx(expected_tflops)
    assert train['flop_fraction']['valid'] is False  # width 8: not the model the FLOPs were counted for

    compiled = report['compile']
    assert compiled['eager_step_s'] > 0 and compiled['compiled_step_s'] > 0 and len(compiled['recompiles']) == 1

    summary = (tmp_path / 'out' / 'gpu_check.md').read_text()
    assert summary.startswith('# gpu_check (dry): OK') and 'its figures measure nothing' in summary
    assert '| ours |' in summary and 'ours/reference' in summary and 'torch.compile' in summary
