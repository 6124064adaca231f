"""Reliability: the NaN guard, gradient clipping, precision defaults, cheap config validation first,
and the checkpoint folder's protocol (staged writes, keep-N across restarts, cleanup after a kill)."""

import os
from pathlib import Path

import pytest
import torch
from composer.core import Callback
from composer.utils import checkpoint as composer_checkpoint
from streaming.base.util import clean_stale_shared_memory

from eqvae_composer import train as train_module
from eqvae_composer.callbacks import NonFiniteError
from eqvae_composer.models.loss import VAEGANLoss
from eqvae_composer.train import ConfigError, train
from tests.test_train import run_config, write_mds


@pytest.fixture
def data(tmp_path):
    clean_stale_shared_memory()
    yield write_mds(tmp_path / 'train', 16), write_mds(tmp_path / 'val', 4, seed=1)
    clean_stale_shared_memory()


def _config(tmp_path, data, **overrides):
    overrides = {'eval_loader': None, 'export_folder': None, 'metrics_file': None, **overrides}
    return run_config(tmp_path, *data, **overrides)


@pytest.fixture
def nan_kl_at_batch_1(monkeypatch):
    """The KL term (and through it the total and the encoder's gradients) is NaN at training batch 1."""
    original = VAEGANLoss._terms

    def terms(self, x, x_hat, posterior, last_layer, last_layer_input, global_step, *rest):
        values = original(self, x, x_hat, posterior, last_layer, last_layer_input, global_step, *rest)
        if self.training and global_step == 1:
            poisoned = values['kl'] * float('nan')
            values['total'] = values['total'] + self.kl_weight * poisoned
            values['kl'] = poisoned
        return values

    monkeypatch.setattr(VAEGANLoss, '_terms', terms)


class _Snapshots(Callback):
    """Weights before and after each batch; the Adam step count at the end."""

    def __init__(self):
        self.before, self.after = {}, {}

    def before_train_batch(self, state, logger):
        self.before[int(state.timestamp.batch)] = [p.detach().clone() for p in state.model.parameters()]

    def batch_end(self, state, logger):
        self.after[int(state.timestamp.batch) - 1] = [p.detach().clone() for p in state.model.parameters()]


class _GradNorm(Callback):
    """The gradient norm the optimizer is about to use (callbacks run after algorithms)."""

    norms: list[float] = []

    def after_train_batch(self, state, logger):
        grads = [p.grad for p in state.model.parameters() if p.grad is not None]
        _GradNorm.norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))


@pytest.mark.slow
def test_nan_guard_raises_naming_the_batch_and_the_loss_terms(tmp_path, data, nan_kl_at_batch_1):
    with pytest.raises(NonFiniteError) as error:
        train(_config(tmp_path, data, max_duration='3ba', algorithms={}))
    message = str(error.value)
    assert 'at batch 1 ' in message and "'kl'" in message and "'total'" in message
    assert "'l1'" not in message and "'nll'" not in message  # the finite terms are not blamed
    assert 'gradients of' in message and 'encoder' in message


@pytest.mark.slow
def test_nan_guard_skip_leaves_weights_and_optimizer_untouched(tmp_path, data, nan_kl_at_batch_1, monkeypatch):
    monkeypatch.setitem(train_module.CALLBACKS, 'snapshots', _Snapshots)
    cfg = _config(
        tmp_path,
        data,
        max_duration='3ba',
        algorithms={},
        callbacks={'snapshots': {}},
        nan_guard={'on_nonfinite': 'skip', 'max_skipped': 1},
    )
    trainer = train(cfg)
    snaps = next(cb for cb in trainer.state.callbacks if isinstance(cb, _Snapshots))
    for b in (0, 2):  # the other batches trained
        assert any(not torch.equal(x, y) for x, y in zip(snaps.before[b], snaps.after[b]))
    assert all(torch.equal(x, y) for x, y in zip(snaps.before[1], snaps.after[1]))  # batch 1: nothing moved
    optimizer = trainer.state.optimizers[0]
    assert {int(s['step']) for s in optimizer.state.values()} == {2}  # Adam stepped twice in three batches
    assert all(torch.isfinite(p).all() for p in trainer.state.model.parameters())
    guard = next(cb for cb in trainer.state.callbacks if type(cb).__name__ == 'NaNGuard')
    assert guard.skipped_batches == 1


@pytest.mark.slow
def test_nan_guard_stops_after_max_skipped(tmp_path, data, nan_kl_at_batch_1):
    cfg = _config(
        tmp_path, data, max_duration='3ba', algorithms={}, nan_guard={'on_nonfinite': 'skip', 'max_skipped': 0}
    )
    with pytest.raises(NonFiniteError, match='more than nan_guard.max_skipped=0'):
        train(cfg)


@pytest.mark.slow
def test_gradient_clipping_bounds_the_gradient_norm(tmp_path, data, monkeypatch):
    monkeypatch.setitem(train_module.CALLBACKS, 'grad_norm', _GradNorm)
    _GradNorm.norms = []
    train(_config(tmp_path, data, max_duration='1ba', callbacks={'grad_norm': {}}))
    unclipped = _GradNorm.norms[-1]
    assert unclipped > 1e-2  # so that the clipped run below has something to clip
    clip = {'gradient_clipping': {'clipping_type': 'norm', 'clipping_threshold': 1e-3}}
    train(_config(tmp_path, data, max_duration='1ba', callbacks={'grad_norm': {}}, algorithms=clip))
    assert _GradNorm.norms[-1] == pytest.approx(1e-3, rel=1e-3)


def test_precision_defaults_to_bf16_on_gpu_and_fp32_on_cpu(monkeypatch, tmp_path):
    cfg = train_module._validate(run_config(tmp_path, 'x', 'y', precision=None))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    assert train_module._precision(cfg) == 'fp32'
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert train_module._precision(cfg) == 'amp_bf16'
    cfg.precision = 'amp_fp16'
    with pytest.raises(ConfigError, match='fp16 VAEs overflow'):
        train_module._precision(cfg)


@pytest.fixture
def model_must_not_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('the model was built before the configuration was validated')

    monkeypatch.setattr(train_module, 'build_model', refuse)


@pytest.mark.parametrize(
    'overrides, error, message',
    [
        (
            {'algorithms': {'equivariance': {'p_equivariance': 1.5}}},
            ConfigError,
            r'^algorithms\.equivariance\.p_equivariance: p_equivariance must be in \[0, 1\]',
        ),
        ({'algorithms': {'equivariance': {'p_lowres': -0.1}}}, ConfigError, r'^algorithms\.equivariance\.p_lowres'),
        ({'nan_guard': {'on_nonfinite': 'ignore'}}, ConfigError, r'^nan_guard\.on_nonfinite'),
        ({'save_folder': 'ftp://host/ckpt'}, ConfigError, 'cannot upload to ftp://'),
        ({'load_path': '/nonexistent/ep1.pt'}, ConfigError, 'load_path .* does not exist'),
        ({'load_path': 'ftp://host/ep1.pt'}, ConfigError, 'cannot download from ftp://'),
        ({'autoresume': True}, ConfigError, 'autoresume needs save_folder'),
        ({'save_num_checkpoints_to_keep': -2}, ConfigError, 'save_num_checkpoints_to_keep'),
        ({'global_train_batch_size': 6, 'device_train_microbatch_size': 4}, ConfigError, 'not divisible'),
    ],
)
def test_invalid_config_fails_before_the_model_is_built(tmp_path, data, model_must_not_load, overrides, error, message):
    with pytest.raises(error, match=message):
        train(_config(tmp_path, data, **overrides), fit=False)


def test_missing_data_fails_before_the_model_is_built(tmp_path, data, model_must_not_load):
    cfg = run_config(tmp_path, data[0], tmp_path / 'no-val')
    with pytest.raises(FileNotFoundError, match='no-val'):
        train(cfg, fit=False)


def test_save_folder_that_is_a_file_is_refused(tmp_path, data, model_must_not_load):
    (tmp_path / 'file').write_text('')
    with pytest.raises(ConfigError, match='is a file'):
        train(_config(tmp_path, data, save_folder=str(tmp_path / 'file')), fit=False)


def test_remote_save_folder_uploads_under_the_uri_path(tmp_path, data):
    cfg = train_module._validate(_config(tmp_path, data, save_folder='s3://bucket/runs/x', autoresume=True))
    train_module._check_paths(cfg)  # a remote URI is not a missing folder
    saver = train_module._checkpoint_saver(cfg)
    try:
        assert saver.folder.endswith('runs/x')  # a local staging copy (a temporary folder)
        assert saver.remote_uploader is not None and saver.remote_uploader.remote_backend_name == 's3'
        assert saver.remote_file_name.filename == 'runs/x/ep{epoch}-ba{batch}-rank{rank}.pt'
        assert saver.latest_remote_file_name.filename == 'runs/x/latest-rank{rank}.pt'
    finally:
        saver.remote_uploader.upload_executor.shutdown()
        saver.remote_uploader.check_remote_files_exist_executor.shutdown()


def _checkpoints(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.slow
def test_checkpoints_staged_rotated_across_restarts_and_orphans_cleaned(tmp_path, data, monkeypatch):
    folder = tmp_path / 'ckpt'
    written = []
    original = composer_checkpoint._write_checkpoint_file

    def spy(state_dict, filename):
        written.append(os.path.basename(filename))
        final = os.path.join(os.path.dirname(filename), os.path.basename(filename).removeprefix('.partial-'))
        assert not os.path.exists(final), 'the final name exists before the checkpoint is complete'
        original(state_dict, filename)

    monkeypatch.setattr(composer_checkpoint, '_write_checkpoint_file', spy)
    common = dict(
        save_folder=str(folder),
        save_interval='1ba',
        save_num_checkpoints_to_keep=2,
        autoresume=True,
        run_name='rot',
        algorithms={},
    )
    train(_config(tmp_path, data, max_duration='3ba', **common))
    assert written == ['.partial-ep0-ba1-rank0.pt', '.partial-ep0-ba2-rank0.pt', '.partial-ep0-ba3-rank0.pt']
    assert _checkpoints(folder) == ['ep0-ba2-rank0.pt', 'ep0-ba3-rank0.pt', 'latest-rank0.pt']
    assert os.readlink(folder / 'latest-rank0.pt') == 'ep0-ba3-rank0.pt'

    # A kill after batch 3's file was renamed but before `latest` moved, during batch 4's write:
    os.remove(folder / 'latest-rank0.pt')
    os.symlink('ep0-ba2-rank0.pt', folder / 'latest-rank0.pt')
    (folder / '.partial-ep0-ba4-rank0.pt').write_bytes(b'truncated')
    # Composer's own saver would refuse to start here (FileExistsError: ep0-ba3 "may conflict").
    trainer = train(_config(tmp_path, data, max_duration='5ba', **common))
    assert int(trainer.state.timestamp.batch) == 5
    # Resumed from batch 2, recomputed 3..5; keep-2 counts the checkpoints of the first process too.
    assert _checkpoints(folder) == ['ep0-ba4-rank0.pt', 'ep1-ba5-rank0.pt', 'latest-rank0.pt']  # 4 batches an epoch
    assert os.readlink(folder / 'latest-rank0.pt') == 'ep1-ba5-rank0.pt'
