"""data/parts.py: the resume bookkeeping of convert_dataset.py and the latent encoder."""

from __future__ import annotations

import pytest

from eqvae_composer.data.parts import OutputExistsError, finished_parts, prepare_output

PLAN = {'input': 'x', 'size_limit': 1 << 20}


def test_finished_parts_reads_markers_and_ignores_other_names():
    names = ['plan.json', 'part_00000.json', 'part_00007.json', 'part_00003', 'part_foo.json', 'part_.json', 'x.tmp']
    assert finished_parts(names) == {0, 7}


def test_a_rerun_keeps_finished_parts_and_redoes_the_rest(tmp_path):
    out = tmp_path / 'out'
    assert prepare_output(str(out), PLAN, False, state_dir='.state', final_files=['index.json']) == set()
    for i in range(3):
        (out / f'part_{i:05d}').mkdir()
        (out / f'part_{i:05d}' / 'shard.00000.mds').write_bytes(b'data')
    (out / '.state' / 'part_00001.json').write_text('{}')
    (out / '.state' / 'part_notes.json').write_text('{}')  # a stray file a user left: no crash
    (out / 'part_notes').mkdir()
    (out / 'index.json').write_text('{}')
    assert prepare_output(str(out), PLAN, False, state_dir='.state', final_files=['index.json']) == {1}
    assert sorted(p.name for p in out.iterdir()) == ['.state', 'part_00001', 'part_notes']
    with pytest.raises(OutputExistsError, match='other inputs or with other options'):
        prepare_output(str(out), {**PLAN, 'size_limit': 1}, False, state_dir='.state', final_files=['index.json'])
