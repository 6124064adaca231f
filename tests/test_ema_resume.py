"""EMA + FSDP2 + autoresume, end to end under `composer -n 2` and `-n 3` (gloo): runs stopped after a checkpoint
or SIGKILLed right after one, started again, end bit-identical to uninterrupted runs on every rank.

Composer's own EMA keeps its copy of the weights in the algorithms' state, which checkpoints hold from
rank 0 only: resumed, rank 1 crashed in its first batch (``RuntimeError: output with shape [1, 8, 3, 3]
doesn't match the broadcast shape [2, 8, 3, 3]``). Two launches per world size; what each does is in
tests/distributed/ema_resume.py. The 2-rank launch also runs a decoder-only stage (``model.trainable: decoder``)
under FSDP2 and DDP: its frozen encoder shares an FSDP2 unit (the VAE) with the trained decoder.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file
from streaming.base.util import clean_stale_shared_memory

from eqvae_composer.checkpoints import EMA_COPY_CALLBACK, AutoencoderLoadError
from eqvae_composer.cli import USER_ERRORS
from eqvae_composer.ema import EMA, EMACopy, UnresumableEMACheckpointError
from tests.conftest import tiny_vae_config
from tests.test_checkpoints_composer import run_export_script
from tests.test_train import write_mds

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'tests' / 'distributed' / 'ema_resume.py'
WEIGHTS = 'diffusion_pytorch_model.safetensors'
# Per world size: the checkpoint kinds run uninterrupted and stopped, and the kind whose run is SIGKILLed.
PLANS = {
    2: (['sharded', 'full', 'ddp', 'old-sharded', 'old-full', 'decoder-sharded', 'decoder-ddp'], 'full'),
    3: (['sharded', 'full'], 'sharded'),
}
# BatchNorm's running statistics differ between ranks by design (DDP broadcasts rank 0's before each forward, then
# each rank updates its own; FSDP2 never syncs them) and checkpoints hold rank 0's, so a resumed rank above 0
# continues from rank 0's. Training uses batch statistics: the weights do not depend on them.
_PER_RANK_BUFFERS = ('running_mean', 'running_var')
# What a decoder-only stage keeps frozen: everything that shapes an AutoencoderKL's latent.
ENCODER_SIDE = ('encoder.', 'quant_conv.')

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def _launch(run_dir: Path, world: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'FSDP_VERSION': '2', 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'composer.cli.launcher', '-n', str(world), str(SCRIPT), str(run_dir), *args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def _runs(world: int, tmp_path_factory) -> dict:
    kinds, killed = PLANS[world]
    run_dir = tmp_path_factory.mktemp(f'ema{world}')
    clean_stale_shared_memory()
    write_mds(run_dir / 'train', 8 * world)  # 4 batches of 2 samples per rank
    torch.manual_seed(3)
    AutoencoderKL.from_config(tiny_vae_config()).save_pretrained(run_dir / 'stage1')  # the decoder stage's input
    first = _launch(run_dir, world, 'run', killed, *kinds)
    assert (run_dir / 'checkpoints' / f'{killed}-killed').is_dir(), first.stdout[-3000:] + first.stderr[-3000:]
    assert first.returncode != 0 and 'exited with code -9' in first.stdout + first.stderr, 'not killed'
    second = _launch(run_dir, world, 'resume', killed)
    clean_stale_shared_memory()
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return {'dir': run_dir, 'world': world, 'kinds': kinds, 'killed': killed}


@pytest.fixture(scope='module')
def two_ranks(tmp_path_factory):
    return _runs(2, tmp_path_factory)


@pytest.fixture(scope='module')
def three_ranks(tmp_path_factory):
    return _runs(3, tmp_path_factory)


@pytest.fixture(params=['two_ranks', 'three_ranks'])
def runs(request):
    return request.getfixturevalue(request.param)


def _snapshots(run_dir: Path, case: str, world: int) -> list[dict[str, torch.Tensor]]:
    return [torch.load(run_dir / 'snapshots' / f'{case}-rank{rank}.pt') for rank in range(world)]


def _started_at(run_dir: Path, case: str) -> int:
    return int((run_dir / 'started-at' / case).read_text())


def test_resumed_runs_end_bit_identical_on_every_rank(runs):
    run_dir, world = runs['dir'], runs['world']
    resumed = {f'{kind}-stopped': kind for kind in runs['kinds'] if not kind.startswith('old-')}
    resumed[f'{runs["killed"]}-killed'] = runs['killed']
    for case, kind in resumed.items():
        assert _started_at(run_dir, kind) == 0 and _started_at(run_dir, case) == 2, f'{case} did not resume'
        for rank, (expected, got) in enumerate(zip(_snapshots(run_dir, kind, world), _snapshots(run_dir, case, world))):
            assert int(got['batch']) == 4 and got.keys() == expected.keys()
            differ = [
                k
                for k in expected
                if not (rank > 0 and k.endswith(_PER_RANK_BUFFERS)) and not torch.equal(expected[k], got[k])
            ]
            assert not differ, f'{case}, rank {rank}: {differ[:5]}'


def test_each_rank_held_its_own_uneven_shards_and_ema_differs_from_the_raw_weights(runs):
    ranks = _snapshots(runs['dir'], 'sharded', runs['world'])
    assert any(ranks[0][k].shape != ranks[-1][k].shape for k in ranks[0] if k.startswith('ema.'))
    # The checkpoint swaps the averages into the model: the model holds EMA weights, EMA's copy the raw ones.
    assert all(bool(r['ema.weights_active']) for r in ranks)
    raw = {k.removeprefix('ema.named_parameters_dict.'): v for k, v in ranks[0].items() if 'parameters_dict' in k}
    assert any(not torch.equal(ranks[0][f'model.{k}'], v) for k, v in raw.items())


@pytest.mark.parametrize('kind', ['sharded', 'full'])
@pytest.mark.parametrize('weights', ['EMA', 'raw'])
def test_export_reads_every_ranks_weights_from_the_new_checkpoints(three_ranks, kind, weights, tmp_path, capsys):
    runs = three_ranks
    folder = runs['dir'] / 'checkpoints' / kind
    checkpoint = folder / ('ep0-ba4' if kind == 'sharded' else 'ep0-ba4-rank0.pt')
    run_export_script(
        ['--checkpoint', str(checkpoint), '--out', str(tmp_path), *(['--raw'] if weights == 'raw' else [])]
    )
    assert {'EMA': 'the EMA weights', 'raw': 'the raw training weights'}[weights] in capsys.readouterr().out
    got, expected = load_file(tmp_path / WEIGHTS), torch.load(runs['dir'] / 'weights' / f'{kind}-{weights}.pt')
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def _encoder_side(names) -> list[str]:
    return [n for n in names if n.split('vae.', 1)[-1].startswith(ENCODER_SIDE)]


@pytest.mark.parametrize('kind', ['decoder-sharded', 'decoder-ddp'])
def test_decoder_stage_keeps_the_input_encoder_bit_for_bit_and_ema_copies_trained_parameters_only(two_ranks, kind):
    run_dir = two_ranks['dir']
    stage1 = AutoencoderKL.from_pretrained(run_dir / 'stage1').state_dict()
    frozen = _encoder_side(stage1)
    assert len(frozen) > 10
    for rank in _snapshots(run_dir, kind, 2):
        copied = [k.removeprefix('ema.named_parameters_dict.') for k in rank if k.startswith('ema.named_parameters')]
        assert copied and not _encoder_side(copied)  # Composer's EMA averages what requires grad only
        assert any('vae.decoder.' in k for k in copied) and any('vae.post_quant_conv.' in k for k in copied)
    for weights in ('EMA', 'raw'):  # gathered at the end of the uninterrupted run, as train.py exports
        got = torch.load(run_dir / 'weights' / f'{kind}-{weights}.pt')
        assert all(torch.equal(got[k], stage1[k]) for k in frozen), weights
        assert not torch.equal(got['decoder.conv_out.weight'], stage1['decoder.conv_out.weight']), weights
    ema, raw = (torch.load(run_dir / 'weights' / f'{kind}-{w}.pt') for w in ('EMA', 'raw'))
    assert any(not torch.equal(ema[k], raw[k]) for k in raw)


@pytest.mark.parametrize('weights', ['EMA', 'raw'])
def test_export_of_a_sharded_decoder_stage_checkpoint_has_the_input_encoder(two_ranks, weights, tmp_path):
    run_dir = two_ranks['dir']
    checkpoint = run_dir / 'checkpoints' / 'decoder-sharded' / 'ep0-ba4'
    run_export_script(
        ['--checkpoint', str(checkpoint), '--out', str(tmp_path), *(['--raw'] if weights == 'raw' else [])]
    )
    got = load_file(tmp_path / WEIGHTS)
    expected = torch.load(run_dir / 'weights' / f'decoder-sharded-{weights}.pt')
    stage1 = AutoencoderKL.from_pretrained(run_dir / 'stage1').state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], v) for k, v in expected.items())
    assert all(torch.equal(got[k], stage1[k]) for k in _encoder_side(stage1))


def test_ddp_checkpoints_keep_composers_layout(two_ranks):
    state = torch.load(two_ranks['dir'] / 'checkpoints' / 'ddp' / 'latest-rank0.pt', weights_only=False)['state']
    assert dict(state['algorithms'])['EMA']['ema_model']['named_parameters_dict']
    assert state['callbacks'][EMA_COPY_CALLBACK] == {}


@pytest.mark.parametrize('kind', ['old-sharded', 'old-full'])
def test_a_checkpoint_of_composers_own_ema_is_refused_with_what_to_do(two_ranks, kind):
    checkpoint = two_ranks['dir'] / 'checkpoints' / kind / 'latest-rank0.pt'
    message = (two_ranks['dir'] / 'errors' / kind).read_text()
    assert message.startswith(f'{checkpoint} cannot be resumed with algorithms.ema under FSDP')
    assert "saved by Composer's own EMA" in message
    assert f'scripts/export.py --checkpoint {checkpoint} --out' in message and 'model.vae.pretrained' in message


def test_export_of_an_old_sharded_checkpoint_gives_its_ema_weights_and_refuses_its_partial_raw_ones(
    two_ranks, tmp_path
):
    checkpoint = str(two_ranks['dir'] / 'checkpoints' / 'old-sharded' / 'ep0-ba2')
    run_export_script(['--checkpoint', checkpoint, '--out', str(tmp_path / 'ema')])
    assert (tmp_path / 'ema' / WEIGHTS).is_file()
    with pytest.raises(AutoencoderLoadError, match=r'raw weights are incomplete.*ema=True \(scripts/export.py without'):
        run_export_script(['--checkpoint', checkpoint, '--out', str(tmp_path / 'raw'), '--raw'])
    assert not (tmp_path / 'raw' / WEIGHTS).exists()


def test_names_that_checkpoints_depend_on():
    # Composer files algorithms' and callbacks' state under their class names: the same name as Composer's EMA
    # lets old checkpoints reach EMA.load_state_dict; export finds the copy under EMA_COPY_CALLBACK.
    assert EMA.__qualname__ == 'EMA' and EMACopy.__qualname__ == EMA_COPY_CALLBACK
    assert UnresumableEMACheckpointError in USER_ERRORS  # train.py prints it as one line
