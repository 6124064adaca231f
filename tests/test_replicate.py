"""scripts/replicate.py: the --quick experiment end to end, its restartability, and the generated markdown."""

import io
import json
import os
import time

import numpy as np
import pytest
from PIL import Image
from streaming import MDSWriter
from streaming.base.util import clean_stale_shared_memory

from scripts import replicate


def write_photos(folder, count: int, seed: int) -> None:
    """Smooth random images (low-frequency noise upsampled), so a few steps of training can reconstruct them."""
    rng = np.random.default_rng(seed)
    with MDSWriter(out=str(folder), columns={'image': 'bytes', 'key': 'str'}, size_limit=1 << 15) as writer:
        for i in range(count):
            small = rng.integers(0, 256, size=(6, 7, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(small).resize((84, 72), Image.BICUBIC).save(buf, format='PNG')
            writer.write({'image': buf.getvalue(), 'key': f'{i}.png'})


@pytest.fixture
def data(tmp_path):
    clean_stale_shared_memory()
    write_photos(tmp_path / 'mds' / 'train', 24, seed=0)
    write_photos(tmp_path / 'mds' / 'val', 8, seed=1)
    yield tmp_path / 'mds'
    clean_stale_shared_memory()


def fake_metrics(r: float, s: float, psnr: float) -> dict[str, float]:
    metrics = {'equivariance_error/R': r, 'equivariance_error/S': s, 'psnr': psnr, 'ssim': 0.5, 'intrinsic_dim': 7.0}
    metrics.update({f'scaled_psnr/{scale}': psnr - 1 for scale in ('0.25', '0.5', '0.75')})
    return metrics


def test_results_table_has_one_row_per_model():
    final = {
        'base': fake_metrics(0.9, 0.8, 25.0),
        'control': fake_metrics(0.9, 0.79, 25.1),
        'eq': fake_metrics(0.5, 0.15, 25.2),
    }
    lines = replicate.results_table(final).splitlines()
    assert len(lines) == 2 + 3
    assert lines[0].count('PSNR D(tau(z))') == 3
    assert lines[4].startswith('| eq | 0.500 | 0.150 | 25.20 |')


def test_stage_configs_differ_only_by_the_algorithm(tmp_path):
    plan = replicate.QUICK
    eq = replicate.stage_config(plan, 'eq', 'mds', str(tmp_path), base_vae='base/vae')
    control = replicate.stage_config(plan, 'control', 'mds', str(tmp_path), base_vae='base/vae')
    assert eq['algorithms'] == {'equivariance': {}} and control['algorithms'] == {}
    different = {k for k in eq if eq[k] != control[k]}
    assert different == {'algorithms', 'run_name', 'save_folder', 'export_folder', 'metrics_file'}
    assert eq['model']['loss']['lpips_weight'] == 0.0 and eq['autoresume']
    base = replicate.stage_config(plan, 'base', 'mds', str(tmp_path))
    assert base['algorithms'] == {} and 'config' in base['model']['vae']


@pytest.mark.slow
def test_quick_experiment_end_to_end_and_restart(data, tmp_path):
    out, docs = tmp_path / 'runs', tmp_path / 'docs'
    argv = ['--quick', '--data', str(data), '--out', str(out), '--docs', str(docs)]
    assert replicate.main(argv) == 0

    for name in ('RESULTS.md', 'results/curves.png', 'results/reconstructions.png', 'results/results.json'):
        assert (docs / name).is_file(), name
    results = json.loads((docs / 'results' / 'results.json').read_text())
    for model in ('base', 'control', 'eq'):
        metrics = results['final'][model]
        for key in (
            'equivariance_error/R',
            'equivariance_error/S',
            'psnr',
            'ssim',
            'scaled_psnr/0.25',
            'intrinsic_dim',
        ):
            assert np.isfinite(metrics[key]), (model, key)
    assert np.isfinite(results['final_2x']['eq']['equivariance_error/S'])
    plan = replicate.QUICK
    steps = plan.finetune_steps // plan.finetune_evals
    for model in ('control', 'eq'):
        assert sorted(map(int, results['finetune_curves'][model])) == list(range(0, plan.finetune_steps + 1, steps))
    markdown = (docs / 'RESULTS.md').read_text()
    assert '| eq |' in markdown and 'python scripts/replicate.py --quick' in markdown
    assert replicate.NOTES_MARKER in markdown

    # Restart: every stage and every evaluation is found done; hand-written notes survive the rewrite.
    (docs / 'RESULTS.md').write_text(markdown + 'kept by hand\n')
    os.remove(docs / 'results' / 'curves.png')
    start = time.perf_counter()
    assert replicate.main(argv) == 0
    assert time.perf_counter() - start < 30
    again = json.loads((docs / 'results' / 'results.json').read_text())
    assert again['stage_seconds'] == pytest.approx(results['stage_seconds'], abs=0.1)  # recorded, not re-run
    assert all(seconds > 0 for seconds in again['stage_seconds'].values())
    assert again['final'] == results['final']
    assert (docs / 'results' / 'curves.png').is_file()
    assert (docs / 'RESULTS.md').read_text().endswith('kept by hand\n')
