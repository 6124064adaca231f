"""Composer checkpoints of a real (2-batch) Trainer run -> export -> diffusers / LDM, with and without EMA."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from composer import Callback, Trainer
from composer.algorithms import EMA
from diffusers import AutoencoderKL

from eqvae_composer.checkpoints import (
    AutoencoderConfigRecorder,
    AutoencoderLoadError,
    composer_vae_state,
    load_autoencoder,
    load_composer_checkpoint,
    read_checkpoint_file,
    trained_autoencoder,
)
from eqvae_composer.models import ComposerAutoencoderKL, VAEGANLoss
from tests.conftest import tiny_vae, tiny_vae_config

IMAGES = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
VAE_PREFIX = 'autoencoder.vae.'


class RecordWeights(Callback):
    """The raw VAE weights after every optimizer step (EMA only swaps at checkpoint events, later)."""

    def __init__(self) -> None:
        self.after_step: list[dict[str, torch.Tensor]] = []

    def batch_end(self, state, logger) -> None:
        self.after_step.append(
            {
                k[len(VAE_PREFIX) :]: v.detach().clone()
                for k, v in state.model.state_dict().items()
                if k.startswith(VAE_PREFIX)
            }
        )


def fit_two_batches(folder: Path, ema: EMA) -> tuple[Trainer, RecordWeights]:
    """A 2-batch run with ``ema`` that saves its checkpoint at batch 2 in ``folder``."""
    torch.manual_seed(0)
    model = ComposerAutoencoderKL(
        tiny_vae(), VAEGANLoss(lpips_weight=0, disc_num_filters=8, disc_num_layers=1), eval_metrics=()
    )
    data = [{'image': torch.rand(3, 32, 32) * 2 - 1} for _ in range(4)]
    recorder = RecordWeights()
    trainer = Trainer(
        model=model,
        train_dataloader=torch.utils.data.DataLoader(data, batch_size=2),
        optimizers=torch.optim.Adam(model.param_groups(lr=1e-2)),
        max_duration='2ba',
        algorithms=[ema],
        callbacks=[recorder, AutoencoderConfigRecorder()],
        save_folder=str(folder),
        save_interval='2ba',
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    return trainer, recorder


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp('run')
    trainer, recorder = fit_two_batches(folder, EMA(half_life='1ba'))  # smoothing 0.5
    w1, w2 = recorder.after_step
    # EMA starts at the first update as a copy of the weights, then averages with smoothing 0.5.
    ema = {k: 0.5 * w1[k] + 0.5 * w2[k] for k in w2}
    return {'checkpoint': folder / 'latest-rank0.pt', 'raw': w2, 'ema': ema, 'trainer': trainer}


def vae_with(state: dict[str, torch.Tensor]) -> AutoencoderKL:
    vae = tiny_vae()
    vae.load_state_dict(state)
    return vae


def outputs(vae: AutoencoderKL) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(vae.encode(IMAGES).latent_dist.mode()).sample


def assert_weights(vae: AutoencoderKL, expected: dict[str, torch.Tensor], exact: bool = True) -> None:
    state = vae.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        if exact:
            assert torch.equal(state[key], value), key
        else:
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=key)


def run_export_script(argv: list[str]) -> None:
    spec = importlib.util.spec_from_file_location('export_script', Path(__file__).parents[1] / 'scripts' / 'export.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv)


def test_ema_and_raw_weights_differ(run):
    assert any(not torch.equal(run['ema'][k], run['raw'][k]) for k in run['raw'])


def test_export_script_writes_ema_weights_by_default(run, tmp_path, capsys):
    run_export_script(
        ['--checkpoint', str(run['checkpoint']), '--out', str(tmp_path / 'vae'), '--ldm', str(tmp_path / 'vae.ckpt')]
    )
    assert 'the EMA weights' in capsys.readouterr().out
    exported = AutoencoderKL.from_pretrained(tmp_path / 'vae')
    assert_weights(exported, run['ema'], exact=False)  # an average recomputed here: equal up to rounding
    assert torch.equal(outputs(exported), outputs(load_autoencoder(run['checkpoint'])))
    from_ldm = load_autoencoder(tmp_path / 'vae.ckpt', config=tiny_vae_config())
    assert_weights(from_ldm, exported.state_dict())


def test_export_script_raw_reproduces_the_trained_model(run, tmp_path, capsys):
    run_export_script(['--checkpoint', str(run['checkpoint']), '--out', str(tmp_path / 'raw'), '--raw'])
    assert 'the raw training weights' in capsys.readouterr().out
    exported = AutoencoderKL.from_pretrained(tmp_path / 'raw')
    assert_weights(exported, run['raw'])
    assert torch.equal(outputs(exported), outputs(vae_with(run['raw'])))


def test_end_of_training_export_is_ema_aware(run):
    ema_vae, which = trained_autoencoder(run['trainer'].state)
    assert which == 'EMA'
    assert_weights(ema_vae, run['ema'], exact=False)
    raw_vae, which = trained_autoencoder(run['trainer'].state, ema=False)
    assert which == 'raw'
    assert_weights(raw_vae, run['raw'])


def test_config_recorded_in_checkpoint_or_given(run):
    checkpoint = read_checkpoint_file(run['checkpoint'])
    assert checkpoint['state']['callbacks']['AutoencoderConfigRecorder']['vae_config']['block_out_channels'] == [8] * 4
    del checkpoint['state']['callbacks']['AutoencoderConfigRecorder']
    with pytest.raises(AutoencoderLoadError, match='missing keys'):  # falls back to the SD-VAE config
        load_composer_checkpoint(checkpoint)
    vae, which = load_composer_checkpoint(checkpoint, config=tiny_vae_config(), ema=False)
    assert which == 'raw'
    assert_weights(vae, run['raw'])


def test_checkpoint_without_ema_gives_the_model_weights(run):
    checkpoint = read_checkpoint_file(run['checkpoint'])
    checkpoint['state']['algorithms'] = []
    state, which = composer_vae_state(checkpoint, ema=True)
    assert which == 'raw'
    model_state = checkpoint['state']['model']
    assert all(torch.equal(v, model_state[VAE_PREFIX + k]) for k, v in state.items())


def test_ema_not_started_yet_gives_the_trained_weights(tmp_path):
    # Before `ema_start`, Composer's EMA holds a copy of the initial weights: not EMA weights.
    trainer, recorder = fit_two_batches(tmp_path, EMA(half_life='1ba', ema_start='3ba'))
    trained = recorder.after_step[-1]
    vae, which = load_composer_checkpoint(tmp_path / 'latest-rank0.pt')
    assert which == 'raw'
    assert_weights(vae, trained)
    vae, which = trained_autoencoder(trainer.state)
    assert which == 'raw'
    assert_weights(vae, trained)


def _fsdp1(name: str) -> str:  # FSDP1 wraps the model and, with auto-wrap, submodules anywhere in the tree
    return '_fsdp_wrapped_module.' + name.replace('vae.encoder.', 'vae.encoder._fsdp_wrapped_module.')


def _ddp_compiled_checkpointed(name: str) -> str:
    return 'module._orig_mod.' + name.replace('vae.decoder.', 'vae.decoder._checkpoint_wrapped_module.')


@pytest.mark.parametrize(
    'wrapped',
    [
        pytest.param(lambda name: f'module.{name}', id='DDP'),
        pytest.param(_fsdp1, id='FSDP1'),
        pytest.param(lambda name: f'_orig_mod.{name}', id='compiled'),
        pytest.param(_ddp_compiled_checkpointed, id='DDP-compiled-activation-checkpointed'),
    ],
)
def test_wrapper_components_are_removed_from_model_and_ema_names(run, wrapped):
    checkpoint = read_checkpoint_file(run['checkpoint'])
    state = checkpoint['state']
    state['model'] = {wrapped(k): v for k, v in state['model'].items()}
    ema_model = dict(state['algorithms'])['EMA']['ema_model']  # EMA names its copies by named_parameters()
    ema_model['named_parameters_dict'] = {wrapped(k): v for k, v in ema_model['named_parameters_dict'].items()}
    assert_weights(load_composer_checkpoint(checkpoint)[0], run['ema'], exact=False)
    assert_weights(load_composer_checkpoint(checkpoint, ema=False)[0], run['raw'])
