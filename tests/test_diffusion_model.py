"""The ComposerModel wires the network to the objectives as SiT and DiT do; the train command runs, resumes exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from eqvae_composer.config import ConfigError
from eqvae_composer.diffusion.model import ComposerLatentDiffusion
from eqvae_composer.diffusion.network import build_dit, dit_config
from eqvae_composer.diffusion.train import load_config, train
from tests.diffusion_fixtures import NUM_CLASSES, latents  # noqa: F401  (fixture, used by name)
from tests.diffusion_references import DiTGaussianDiffusion, sit_training_loss

REPO = Path(__file__).resolve().parents[1]
TINY = dict(num_layers=1, num_attention_heads=2, attention_head_dim=8)


def _model(objective='flow', learn_sigma=False, label_dropout=0.1):
    torch.manual_seed(0)
    config = dit_config('DiT-S/2', 4, 4, NUM_CLASSES, learn_sigma=learn_sigma, **TINY)
    return ComposerLatentDiffusion(build_dit(config), objective=objective, label_dropout=label_dropout)


def _batch():
    g = torch.Generator().manual_seed(1)
    return {'latent': torch.randn(6, 4, 4, 4, generator=g), 'label': torch.tensor([0, 1, 2, 3, 0, 1])}


def test_flow_loss_of_the_model_equals_sits_training_loss():
    model, batch = _model('flow', label_dropout=0.5), _batch()
    torch.manual_seed(0)
    ours = model.loss(model(batch), batch)['total']
    torch.manual_seed(0)
    dropped = torch.rand(6) < 0.5
    x0 = torch.randn_like(batch['latent'])
    t = torch.rand(6)
    labels = torch.where(dropped, NUM_CLASSES, batch['label'])
    assert dropped.any() and not dropped.all()
    reference = sit_training_loss(lambda x, tt: model.network(x, tt, labels), batch['latent'], t, x0).mean()
    assert torch.allclose(ours, reference, atol=1e-6)


def test_ddpm_loss_of_the_model_equals_dits_training_loss():
    model, batch = _model('ddpm', learn_sigma=True, label_dropout=0.0), _batch()
    torch.manual_seed(4)
    terms = model.loss(model(batch), batch)
    torch.manual_seed(4)
    torch.rand(6)  # the (empty) label dropout draw
    noise = torch.randn_like(batch['latent'])
    t = torch.randint(0, 1000, (6,))
    reference = DiTGaussianDiffusion().training_losses(
        lambda x, tt: model.network(x, tt, batch['label']), batch['latent'], t, noise
    )
    assert set(terms) == {'total', 'mse', 'vb'}
    assert torch.allclose(terms['total'], reference['loss'].mean(), rtol=1e-5)
    assert torch.allclose(terms['vb'], reference['vb'].mean(), rtol=1e-5)


def test_label_dropout_is_ours_alone_and_one_draw_per_sample():
    model, batch = _model('flow', label_dropout=0.0), _batch()
    x, t = batch['latent'], torch.rand(6)
    model.train()
    # diffusers' per-block label dropout is off: in training mode the same inputs give the same output.
    assert torch.equal(model.network(x, t, batch['label']), model.network(x, t, batch['label']))
    model.eval()
    assert torch.equal(model.network(x, t, batch['label']), model.network(x, t, batch['label']))
    always = _model('flow', label_dropout=1.0)
    always.train()
    torch.manual_seed(5)
    out = always(batch)['prediction']
    torch.manual_seed(5)
    torch.rand(6)
    x0 = torch.randn_like(x)
    tt = torch.rand(6)
    xt = tt.reshape(-1, 1, 1, 1) * x + (1 - tt.reshape(-1, 1, 1, 1)) * x0
    assert torch.equal(out, always.network(xt, tt, torch.full((6,), NUM_CLASSES)))


def test_eval_loss_is_fixed_by_the_seed_and_the_weights():
    model, batch = _model('flow'), _batch()
    model.eval()
    first, second = model.eval_forward(batch)['losses'], model.eval_forward(batch)['losses']
    assert first.shape == (6, 5) and torch.equal(first, second)


def _cfg(folder, tmp_path, **overrides):
    cfg = {
        'num_classes': NUM_CLASSES,
        'network': {'name': 'DiT-S/2', 'overrides': TINY},
        'train_loader': {'dataset': {'local': str(folder)}},
        'eval_loader': {'dataset': {'local': str(folder)}},
        'max_duration': '4ba',
        'global_train_batch_size': 4,
        'device_eval_batch_size': 8,
        'eval_interval': '2ba',
        'progress_bar': False,
        'console_log_interval': '100ba',
    }
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def test_training_evaluates_and_writes_a_sample_grid(latents, tmp_path):  # noqa: F811
    folder, vae_dir = latents
    grid = {'classes': [0, 1], 'per_class': 2, 'num_steps': 2, 'folder': str(tmp_path / 'grids')}
    trainer = train(_cfg(folder, tmp_path, callbacks={'sample_grid': grid}, algorithms={'ema': {'half_life': '2ba'}}))
    metrics = trainer.state.eval_metric_values
    assert {'ValLoss', 'ValLoss/level_0.1', 'ValLoss/level_0.9'} <= set(metrics)
    assert all(torch.isfinite(torch.as_tensor(v)) for v in metrics.values())
    assert sorted(p.name for p in (tmp_path / 'grids').iterdir()) == ['samples_ba2.png', 'samples_ba4.png']


def test_ddpm_training_runs(latents, tmp_path):  # noqa: F811
    folder, _ = latents
    trainer = train(_cfg(folder, tmp_path, objective={'kind': 'ddpm'}, max_duration='2ba', eval_loader=None))
    assert int(trainer.state.timestamp.batch) == 2


def _weights(trainer):
    return {k: v.clone() for k, v in trainer.state.model.transformer.state_dict().items()}


def test_a_run_resumed_mid_epoch_ends_with_the_uninterrupted_runs_weights(latents, tmp_path):  # noqa: F811
    folder, _ = latents
    common = dict(eval_loader=None, save_interval='2ba', run_name='r')
    straight = _weights(train(_cfg(folder, tmp_path, save_folder=str(tmp_path / 'a'), **common)))
    train(_cfg(folder, tmp_path, save_folder=str(tmp_path / 'b'), **{**common, 'max_duration': '2ba'}))
    resumed = train(_cfg(folder, tmp_path, save_folder=str(tmp_path / 'b'), autoresume=True, **common), fit=False)
    assert int(resumed.state.timestamp.batch) == 2  # it did resume, mid-epoch (4 batches an epoch)
    resumed.fit()
    assert int(resumed.state.timestamp.batch) == 4
    assert all(torch.equal(straight[k], v) for k, v in _weights(resumed).items())


@pytest.mark.parametrize(
    'overrides, message',
    [
        ({'netwrk': {}}, "unknown config key 'netwrk'"),
        ({'network': {'name': 'DiT-M/2'}}, "network: unknown network 'DiT-M/2'"),
        ({'objective': {'learn_sigma': False}}, 'objective.learn_sigma applies to objective.kind ddpm only'),
        ({'callbacks': {'sample_grids': {}}}, "unknown callbacks 'sample_grids'"),
        ({'train_loader': {'dataset': {'local': '/nonexistent/latents'}}}, 'train_loader.dataset: '),
    ],
)
def test_config_errors_name_the_key(latents, tmp_path, overrides, message, monkeypatch):  # noqa: F811
    monkeypatch.setenv('FSDP_VERSION', '2')
    folder, _ = latents
    with pytest.raises(ConfigError, match=message):
        train(_cfg(folder, tmp_path, **overrides), fit=False)


def test_every_diffusion_yaml_is_checked():
    assert sorted(path.name for path in (REPO / 'yamls' / 'diffusion').glob('*.yaml')) == ['dit-b2.yaml', 'sit-b2.yaml']


@pytest.mark.parametrize('name, objective, depth, width', [('sit-b2', 'flow', 12, 768), ('dit-b2', 'ddpm', 12, 768)])
def test_the_reference_yamls_are_valid_b2_recipes(name, objective, depth, width):
    cfg = load_config(REPO / 'yamls' / 'diffusion' / f'{name}.yaml')
    assert cfg.objective.kind == objective and cfg.global_train_batch_size == 256 and cfg.max_duration == '400000ba'
    config = dit_config(cfg.network.name, 4, 32, cfg.num_classes, learn_sigma=objective == 'ddpm')
    assert (config['num_layers'], config['num_attention_heads'] * config['attention_head_dim']) == (depth, width)
    assert config['patch_size'] == 2 and config['out_channels'] == (8 if objective == 'ddpm' else 4)
    # Every algorithm and callback it names builds.
    from eqvae_composer.config import instantiate
    from eqvae_composer.diffusion.train import ALGORITHMS, DIFFUSION_CALLBACKS

    assert len(instantiate(ALGORITHMS, 'algorithms', cfg.algorithms)) == 1
    assert len(instantiate(DIFFUSION_CALLBACKS, 'callbacks', cfg.callbacks)) == 3


def test_the_readme_example_trains_on_encoded_latents(latents, tmp_path, monkeypatch):  # noqa: F811
    import re

    folder, _ = latents
    (tmp_path / 'mds').mkdir()
    (tmp_path / 'mds' / 'latents-train').symlink_to(folder)
    monkeypatch.chdir(tmp_path)
    text = (REPO / 'README.md').read_text()
    start = text.index('## The diffusion probe')
    block = re.findall(r'```python\n(.*?)```', text[start : text.index('\n## ', start + 1)], flags=re.S)[0]
    namespace: dict = {}
    exec(compile(block, 'README.md', 'exec'), namespace)
    assert int(namespace['trainer'].state.timestamp.batch) == 2
    assert namespace['trainer'].state.eval_metric_values['ValLoss'] > 0
