"""train.py: config validation (named errors), a short run end to end, and the exported diffusers folder."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from composer.distributed.dist_strategy import DDPSyncStrategy
from diffusers import AutoencoderKL, VQModel
from omegaconf import OmegaConf
from PIL import Image
from streaming import MDSWriter
from streaming.base.util import clean_stale_shared_memory

from eqvae_composer import train as train_module
from eqvae_composer.algorithms.equivariance import check_target_size
from eqvae_composer.introspection import autoencoder_class, vae_downsample_factor
from eqvae_composer.models import AlternatingAdam, ComposerAutoencoderKL, PatchGANDiscriminator
from eqvae_composer.train import ConfigError, OptimizerConfig, build_optimizer, load_config, train
from tests.conftest import tiny_vae, tiny_vae_config

REPO = Path(__file__).resolve().parents[1]


def write_mds(folder: Path, count: int, size: int = 48, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with MDSWriter(out=str(folder), columns={'image': 'bytes', 'key': 'str'}, size_limit=1 << 14) as writer:
        for i in range(count):
            pixels = rng.integers(0, 256, size=(size, size + 8, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format='PNG')
            writer.write({'image': buf.getvalue(), 'key': f'{i}.png'})
    return folder


@pytest.fixture
def mds(tmp_path):
    clean_stale_shared_memory()
    yield write_mds(tmp_path / 'train', 16), write_mds(tmp_path / 'val', 4, seed=1)
    clean_stale_shared_memory()


def run_config(tmp_path, train_dir, val_dir, **overrides):
    cfg = {
        'run_name': 'unit',
        'seed': 5,
        'model': {
            'vae': {'config': tiny_vae_config()},
            'loss': {'lpips_weight': 0.0, 'disc_num_filters': 8, 'disc_num_layers': 1},
        },
        'algorithms': {'equivariance': {}},
        'train_loader': {'dataset': {'local': str(train_dir), 'resolution': 32}},
        'eval_loader': {'dataset': {'local': str(val_dir), 'resolution': 32}},
        'global_train_batch_size': 4,
        'device_eval_batch_size': 4,
        'max_duration': '2ba',
        'eval_interval': '2ba',
        'precision': 'fp32',
        'export_folder': str(tmp_path / 'run' / 'vae'),
        'metrics_file': str(tmp_path / 'run' / 'metrics.json'),
    }
    return OmegaConf.merge(cfg, OmegaConf.create(overrides))


#: The recipe yamls and the autoencoder each starts from: (model.kind, hub id, subfolder).
RECIPE_AUTOENCODERS = {
    'eqvae.yaml': ('kl', 'CompVis/stable-diffusion-v1-4', 'vae'),
    'eqvae-fsdp.yaml': ('kl', 'CompVis/stable-diffusion-v1-4', 'vae'),
    'eqvae-reference.yaml': ('kl', 'CompVis/stable-diffusion-v1-4', 'vae'),
    'eqvae-sdxl.yaml': ('kl', 'stabilityai/sdxl-vae', None),
    'eqvae-sd3.yaml': ('kl', 'stabilityai/stable-diffusion-3-medium-diffusers', 'vae'),
    'eqvae-flux.yaml': ('kl', 'black-forest-labs/FLUX.1-dev', 'vae'),
    'eqvqgan.yaml': ('vq', None, None),  # built from its config, or fine-tuned from model.vae.pretrained=<folder>
}


#: Recipes beyond the paper, checked in their own test files.
BEYOND_THE_PAPER_YAMLS = ['eqvae-sdxl-decoder-stage.yaml']  # tests/test_trainable.py


def test_every_shipped_yaml_is_checked():
    shipped = sorted(path.name for path in (REPO / 'yamls').glob('*.yaml'))
    assert shipped == sorted(['demo.yaml', *RECIPE_AUTOENCODERS, *BEYOND_THE_PAPER_YAMLS])


@pytest.mark.parametrize('name', ['demo.yaml', *RECIPE_AUTOENCODERS])
def test_shipped_yamls_are_valid(name):
    cfg = load_config(REPO / 'yamls' / name)
    assert 'equivariance' in cfg.algorithms
    if name != 'demo.yaml':  # the paper's recipe
        assert cfg.global_train_batch_size == 160 and cfg.device_train_microbatch_size == 10
        assert cfg.optimizer.lr == pytest.approx(7.2e-4) and cfg.optimizer.betas == [0.5, 0.9]
        assert cfg.max_duration == '5ep' and cfg.precision == 'amp_bf16' and cfg.autoresume
        vae = cfg.model.vae
        assert (cfg.model.kind, vae.pretrained, vae.subfolder) == RECIPE_AUTOENCODERS[name]


@pytest.mark.parametrize('name', ['eqvae-sdxl.yaml', 'eqvae-sd3.yaml', 'eqvae-flux.yaml'])
def test_kl_vae_yamls_are_the_recipe_on_another_vae(name):
    _, hub_id, subfolder = RECIPE_AUTOENCODERS[name]
    run = name.removesuffix('.yaml')
    recipe_on_it = load_config(
        REPO / 'yamls' / 'eqvae.yaml',
        [
            f'run_name={run}',
            f'variables.run_dir=runs/{run}',
            f'model.vae.pretrained={hub_id}',
            f'model.vae.subfolder={subfolder or "null"}',
        ],
    )
    assert load_config(REPO / 'yamls' / name) == recipe_on_it


def test_vqgan_yaml_builds_taming_f16_vqgan_and_its_targets_fit_the_discriminator():
    cfg = load_config(REPO / 'yamls' / 'eqvqgan.yaml')
    config = {'_class_name': 'VQModel', **cfg.model.vae.config}
    with torch.device('meta'):  # the architecture only: no memory, no initialisation
        vae = autoencoder_class(config).from_config(config)
    assert type(vae) is VQModel and vae_downsample_factor(vae) == 16
    assert (vae.config.num_vq_embeddings, vae.quantize.vq_embed_dim, vae.config.latent_channels) == (1024, 256, 256)
    assert 70e6 < sum(p.numel() for p in vae.parameters()) < 75e6  # taming's ImageNet f16 VQGAN: 72.1M
    resolution = cfg.train_loader.dataset['resolution']
    check_target_size((resolution, resolution), 16, 'grid', PatchGANDiscriminator(num_layers=3).min_input_size)


def test_reference_yaml_is_the_recipe_with_every_reference_option_on():
    reference = load_config(REPO / 'yamls' / 'eqvae-reference.yaml')
    recipe_with_options = load_config(
        REPO / 'yamls' / 'eqvae.yaml',
        [
            'run_name=eqvae-sdvae-reference',
            'variables.run_dir=runs/eqvae-sdvae-reference',
            'optimizer.gan_updates=alternating',
            'model.loss.lpips_dropout=true',
            'model.loss.always_train_discriminator=true',
            'algorithms.equivariance.shared_draws=true',
            'algorithms.equivariance.lowres_isotropic=true',
            'train_loader.dataset.resize_filter=area_cv2',
            'train_loader.dataset.draft=false',
        ],
    )
    assert reference == recipe_with_options


def test_alternating_updates_build_the_alternating_optimizer_and_ddp_forced_sync(tmp_path, mds):
    overrides = {
        'optimizer': {'gan_updates': 'alternating'},
        'model': {'loss': {'disc_weight': 0, 'always_train_discriminator': True}},
    }
    trainer = train(run_config(tmp_path, *mds, **overrides), fit=False)
    assert isinstance(trainer.state.optimizers[0], AlternatingAdam)
    assert trainer._ddp_sync_strategy == DDPSyncStrategy.FORCED_SYNC  # composer 0.32 internals
    assert trainer.state.model.loss_fn.discriminator is not None  # trained at disc_weight 0, as the reference
    joint = train(run_config(tmp_path, *mds), fit=False)
    assert type(joint.state.optimizers[0]) is torch.optim.Adam
    assert joint._ddp_sync_strategy == DDPSyncStrategy.SINGLE_AUTO_SYNC


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer.learning_rate'"):
        load_config(REPO / 'yamls' / 'demo.yaml', ['optimizer.learning_rate=0.1'])


def test_missing_required_value_is_named(tmp_path):
    path = tmp_path / 'cfg.yaml'
    path.write_text('train_loader: {dataset: {local: x}}\nglobal_train_batch_size: 4\n')
    with pytest.raises(ConfigError, match="missing required config value 'max_duration'"):
        load_config(path)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match='nope.yaml does not exist'):
        load_config(tmp_path / 'nope.yaml')


def test_missing_data_path_is_named(tmp_path, mds):
    cfg = run_config(tmp_path, tmp_path / 'missing', mds[1])
    with pytest.raises(FileNotFoundError, match=str(tmp_path / 'missing')):
        train(cfg, fit=False)


@pytest.mark.parametrize(
    'overrides, message',
    [
        ({'global_train_batch_size': 6, 'device_train_microbatch_size': 4}, 'not divisible by device_train_micro'),
        ({'precision': 'amp_fp16'}, 'fp16 VAEs overflow'),
        ({'algorithms': {'mixup': {}}}, "unknown algorithms 'mixup'"),
        ({'algorithms': {'equivariance': {'p_equivariance': 2}}}, 'p_equivariance must be in'),
        ({'model': {'eval_metrics': ['FID']}}, 'unknown eval_metrics'),
        ({'optimizer': {'gan_updates': 'alternate'}}, "'optimizer.gan_updates'.*expected one of"),
        # 32 px with the grid's 8/32 gives 8 px images; a 2-layer PatchGAN needs 12.
        ({'model': {'loss': {'disc_num_layers': 2}}}, r'8 px images.*at least 12 px.*64 px.*disc_num_layers'),
    ],
)
def test_invalid_settings_stop_before_training(tmp_path, mds, overrides, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        train(run_config(tmp_path, *mds, **overrides), fit=False)


@pytest.mark.parametrize('version', [None, '1'])
def test_fsdp_without_fsdp_version_2_stops_before_data_or_model_load(tmp_path, mds, monkeypatch, version):
    def not_yet(*args, **kwargs):
        raise AssertionError('data or model built before the FSDP_VERSION check')

    monkeypatch.setattr(train_module, 'build_image_dataloader', not_yet)
    monkeypatch.setattr(train_module, 'build_model', not_yet)
    if version is None:
        monkeypatch.delenv('FSDP_VERSION', raising=False)
    else:
        monkeypatch.setenv('FSDP_VERSION', version)
    cfg = run_config(tmp_path, *mds, fsdp={'state_dict_type': 'sharded'})
    with pytest.raises(
        ConfigError,
        match=r'`fsdp` section .* FSDP_VERSION=2 .*FSDP_VERSION=2 composer -n <processes> '
        r'train\.py',
    ):
        train(cfg, fit=False)
    monkeypatch.setenv('FSDP_VERSION', '2')  # the check passes: the data is built next
    with pytest.raises(AssertionError, match='before the FSDP_VERSION check'):
        train(cfg, fit=False)


@pytest.mark.slow
def test_train_runs_exports_and_writes_metrics(tmp_path, mds):
    trainer = train(run_config(tmp_path, *mds))
    assert int(trainer.state.timestamp.batch) == 2
    metrics = json.loads((tmp_path / 'run' / 'metrics.json').read_text())['metrics']
    assert {'PSNR', 'SSIM', 'EquivarianceErrorR', 'EquivarianceErrorS'} <= set(metrics)
    assert all(np.isfinite(v) for v in metrics.values())

    exported = AutoencoderKL.from_pretrained(tmp_path / 'run' / 'vae')
    trained = trainer.state.model.vae
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = trained.decode(trained.encode(x).latent_dist.mode()).sample
        got = exported.decode(exported.encode(x).latent_dist.mode()).sample
    torch.testing.assert_close(got, expected)
    # ... and it is the trained model, not the initial one.
    initial = AutoencoderKL.from_config(tiny_vae_config())
    assert not torch.equal(initial.decoder.conv_out.weight, exported.decoder.conv_out.weight)


def test_optimizer_is_one_fused_adam_over_two_groups_and_unfused_leaves_the_kernel_to_pytorch():
    model = ComposerAutoencoderKL(tiny_vae())
    fused = build_optimizer(model, OptimizerConfig(lr=1e-3, disc_lr=2e-3))
    assert fused.defaults['fused'] is True
    assert [g['lr'] for g in fused.param_groups] == [1e-3, 2e-3]
    default = build_optimizer(model, OptimizerConfig(fused=False))
    assert default.defaults['fused'] is None  # not False, which would also forbid foreach on CUDA
    # Same update either way: one step from the same gradients.
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    fused.step()
    after_fused = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    build_optimizer(model, OptimizerConfig(lr=1e-3, disc_lr=2e-3, fused=False)).step()
    for a, p in zip(after_fused, model.parameters()):
        torch.testing.assert_close(a, p.detach())
    assert any(not torch.equal(a, b) for a, b in zip(after_fused, before))
