"""scripts/downstream.py: the --quick experiment on a replication's folder, its report, and its cache."""

import dataclasses
import json
import os

import pytest
import torch
from diffusers import AutoencoderKL
from streaming.base.util import clean_stale_shared_memory

from scripts import downstream, downstream_report, replicate
from scripts.replicate_report import NOTES_MARKER


def fake_replication(out: str) -> None:
    """What a finished `scripts/replicate.py --quick` leaves that downstream reads: plan, data, exported VAEs."""
    plan = replicate.QUICK
    replicate._write_json(os.path.join(out, 'plan.json'), dataclasses.asdict(plan))
    replicate.prepare_data(plan, out)
    for i, stage in enumerate(f'{arm}-s{seed}' for seed in plan.seeds for arm in downstream.ARMS):
        torch.manual_seed(i)  # a different VAE per stage, as fine-tuning leaves them
        AutoencoderKL(**replicate.vae_config(plan)).save_pretrained(os.path.join(out, stage, 'vae'))


def test_section_replaces_only_its_own_block_and_keeps_the_notes(tmp_path):
    path = str(tmp_path / 'RESULTS.md')
    (tmp_path / 'RESULTS.md').write_text(f'# generated\n{NOTES_MARKER}\nhand notes\n')
    downstream_report.write_section(path, 'first')
    downstream_report.write_section(path, 'second')
    text = (tmp_path / 'RESULTS.md').read_text()
    assert text.startswith(f'# generated\n{NOTES_MARKER}\n') and text.endswith('hand notes\n')
    assert 'second' in text and 'first' not in text and text.count(downstream_report.BEGIN) == 1


def test_compare_finds_when_eq_reaches_controls_final_loss():
    def run(arm, losses):
        curve = {str(step): {'val_loss': v, 'swd_avg': 1.0} for step, v in zip((2, 4, 6), losses)}
        return {'arm': arm, 'seed': 1, 'curve': curve}

    result = downstream_report.compare({'control-s1': run('control', [3, 2, 1.5]), 'eq-s1': run('eq', [2.5, 1.4, 1.2])})
    assert result[1]['eq_reaches_control_final_at'] == 4 and result[1]['eq_lower_at'] == 3
    assert result[1]['val_loss_gap'][6] == pytest.approx(-0.3)


def test_a_missing_or_unfinished_replication_is_one_line_naming_the_fix(tmp_path):
    with pytest.raises(SystemExit, match=r'no replication there \(no plan.json\); run scripts/replicate.py first'):
        downstream.main(['--quick', '--runs', str(tmp_path / 'nothing')])
    replicate._write_json(str(tmp_path / 'plan.json'), dataclasses.asdict(replicate.QUICK))
    with pytest.raises(SystemExit, match=r'not finished \(.*data/train/index.json is missing\); run the same'):
        downstream.main(['--quick', '--runs', str(tmp_path)])


@pytest.mark.slow
def test_quick_run_writes_the_section_and_the_figure_and_reuses_its_cache(tmp_path, capsys):
    clean_stale_shared_memory()
    runs, out, docs = str(tmp_path / 'rep'), str(tmp_path / 'down'), tmp_path / 'docs'
    fake_replication(runs)
    (docs).mkdir()
    (docs / 'RESULTS.md').write_text(f'# replication\n{NOTES_MARKER}\nkept\n')
    args = ['--quick', '--runs', runs, '--out', out, '--docs', str(docs)]
    assert downstream.main(args) == 0
    first = capsys.readouterr().out
    assert 'control-s17: training 4 steps' in first and 'eq-s18: evaluating steps [2, 4]' in first
    text = (docs / 'RESULTS.md').read_text()
    assert text.startswith(f'# replication\n{NOTES_MARKER}') and text.endswith('kept\n')
    assert '## Downstream' in text and '| eq s18 |' in text and 'seed 17: eq has the lower validation loss' in text
    assert (docs / 'results' / 'downstream.png').stat().st_size > 0
    report = json.loads((docs / 'results' / 'downstream.json').read_text())
    for name, run in report['runs'].items():
        assert sorted(run['curve'], key=int) == ['2', '4'], name
        assert all(v['val_loss'] > 0 and v['swd_avg'] > 0 for v in run['curve'].values())
        # the latents were made with the copy that carries this VAE's own factors; the replication's VAE is untouched
        recorded = json.loads(open(os.path.join(out, name, 'latents', 'train', 'latents.json')).read())['vae']
        assert recorded['scaling_factor'] == pytest.approx(run['factors']['scaling_factor'])
        assert recorded['shift_factor'] == pytest.approx(run['factors']['shift_factor'])
        original = json.loads(open(os.path.join(runs, name, 'vae', 'config.json')).read())
        assert original['scaling_factor'] != pytest.approx(run['factors']['scaling_factor'])

    assert downstream.main(args) == 0  # everything cached: no stage runs again
    assert '[downstream]' not in capsys.readouterr().out
    assert json.loads((docs / 'results' / 'downstream.json').read_text())['runs'] == report['runs']
