"""Every supported autoencoder kind: the adapter registry, the algorithm's hook, training, evaluation and export.

KL autoencoders in the SD, SDXL, SD3 and FLUX config shapes (``tests.conftest.KL_SHAPES``: 16 latent
channels, ``shift_factor``, no quant convs, ``force_upcast``) and a VQGAN (diffusers ``VQModel``).
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from composer import Trainer
from composer.models import ComposerModel
from diffusers import AutoencoderKL, AutoencoderTiny, VQModel
from omegaconf import OmegaConf
from streaming.base.util import clean_stale_shared_memory
from torch.utils.data import DataLoader

from eqvae_composer import ComposerAutoencoderKL, EquivarianceAlgorithm, VAEGANLoss
from eqvae_composer.algorithms.equivariance import Branch, apply_to_latent
from eqvae_composer.checkpoints import (
    export_diffusers,
    export_ldm,
    latent_statistics,
    load_autoencoder,
    set_latent_factors,
)
from eqvae_composer.evaluation import evaluate
from eqvae_composer.introspection import (
    ADAPTERS,
    AutoencoderAdapter,
    adapter_for,
    autoencoder_class,
    find_autoencoder,
    latent_entry_point,
    register_adapter,
    vae_downsample_factor,
)
from eqvae_composer.train import ConfigError, train
from tests.conftest import KL_SHAPES, tiny_kl_config, tiny_vq, tiny_vq_config
from tests.test_algorithm import _attached, _run_microbatch
from tests.test_train import run_config, write_mds


def _kl(shape: str, seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL.from_config(tiny_kl_config(shape))


# --- the adapter registry -----------------------------------------------------------------------


def test_adapters_know_each_class_its_entry_point_and_factor():
    sd, flux, vq = _kl('sd'), _kl('flux'), tiny_vq(blocks=5)
    assert [adapter_for(m).kind for m in (sd, flux, vq)] == ['kl', 'kl', 'vq']
    assert latent_entry_point(sd) is sd.post_quant_conv
    assert flux.post_quant_conv is None and latent_entry_point(flux) is flux.decoder  # SD3/FLUX: straight in
    assert latent_entry_point(vq) is vq.quantize  # tau before quantization
    assert (vae_downsample_factor(sd), vae_downsample_factor(vq)) == (8, 16)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert adapter_for(flux).encode(flux, x).shape == (1, 16, 4, 4)
        torch.testing.assert_close(adapter_for(vq).encode(vq, x), vq.encode(x).latents)


def test_adapter_lookup_follows_subclasses_and_names_what_is_supported():
    class MyKL(AutoencoderKL):
        pass

    assert adapter_for(MyKL.from_config(tiny_kl_config('sd'))).kind == 'kl'
    with pytest.raises(
        TypeError,
        match=r'no autoencoder adapter for Linear; supported: AutoencoderKL \(kl\), '
        r'VQModel \(vq\)',
    ):
        adapter_for(torch.nn.Linear(1, 1))
    assert autoencoder_class({'_class_name': 'VQModel'}) is VQModel and autoencoder_class({}) is AutoencoderKL
    with pytest.raises(ValueError, match='describes a UNet2DModel'):
        autoencoder_class({'_class_name': 'UNet2DModel'})
    with pytest.raises(ValueError, match='already registered'):
        register_adapter(AutoencoderAdapter('kl2', AutoencoderKL, ADAPTERS['kl'].latent_entry, ADAPTERS['kl'].encode))


class _TinyAutoencoderModel(ComposerModel):
    """A user's model around diffusers' AutoencoderTiny (TAESD): encode, decode, L1."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.vae = AutoencoderTiny(
            encoder_block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            num_encoder_blocks=(1, 1, 1, 1),
            num_decoder_blocks=(1, 1, 1, 1),
        )

    def forward(self, batch):
        return self.vae.decode(self.vae.encode(batch['image']).latents).sample

    def loss(self, outputs, batch):
        return F.l1_loss(outputs, batch['image'])


@pytest.fixture
def tiny_adapter():
    adapter = AutoencoderAdapter(
        'tiny',
        AutoencoderTiny,
        latent_entry=lambda vae: vae.decoder,
        encode=lambda vae, x: vae.encode(x).latents,
        downsample_factor=lambda vae: 2 ** (len(vae.config.encoder_block_out_channels) - 1),
    )
    yield adapter
    ADAPTERS.pop(adapter.kind, None)


def test_another_diffusers_autoencoder_plugs_in_with_one_adapter(tiny_adapter):
    model = _TinyAutoencoderModel()
    with pytest.raises(ValueError, match='exactly one diffusers autoencoder'):
        find_autoencoder(model)
    register_adapter(tiny_adapter)
    images = [{'image': torch.rand(3, 64, 64) * 2 - 1} for _ in range(4)]
    algorithm = EquivarianceAlgorithm(p_equivariance=1.0)
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(images, batch_size=2),
        max_duration='2ba',
        optimizers=torch.optim.Adam(model.parameters(), lr=1e-4),
        algorithms=[algorithm],
        device='cpu',
        progress_bar=False,
        log_to_console=False,
    )
    decoder_inputs = []  # a pre-hook after the algorithm's (registered at INIT) sees what the decoder gets
    model.vae.decoder.register_forward_pre_hook(lambda m, a: decoder_inputs.append(tuple(a[0].shape[-2:])))
    trainer.fit()
    # Every microbatch decoded tau(z) of the 8x8 latent (scales below 1), and the loss compared it with tau(x).
    assert len(decoder_inputs) == 2 and all(max(size) < 8 for size in decoder_inputs)
    assert algorithm.branch == Branch.EQUIVARIANCE


# --- KL shapes: the hook, evaluation, latent statistics, export -----------------------------------


@pytest.mark.parametrize('shape', sorted(KL_SHAPES))
def test_equivariance_branch_transforms_the_latent_where_it_enters_the_decoder(shape):
    model = ComposerAutoencoderKL(
        _kl(shape), VAEGANLoss(lpips_weight=0, disc_num_filters=8, disc_num_layers=2), sample_posterior=False
    )
    algorithm, state, logger = _attached(model, torch.rand(2, 3, 64, 64) * 2 - 1, p_equivariance=1.0)
    entry_inputs = []
    latent_entry_point(model.vae).register_forward_pre_hook(lambda m, a: entry_inputs.append(a[0].detach()))
    _run_microbatch(algorithm, state, logger)
    latents = state.outputs['latents'].detach()
    assert latents.shape[1] == model.vae.config.latent_channels
    torch.testing.assert_close(entry_inputs[0], apply_to_latent(latents, algorithm.transform))


@pytest.mark.parametrize('shape', sorted(KL_SHAPES))
def test_eval_runner_measures_equivariance_of_each_kl_shape(shape):
    dataset = [{'image': torch.rand(3, 32, 32) * 2 - 1} for _ in range(3)]
    results = evaluate(_kl(shape), dataset, metrics=['psnr', 'equivariance'], batch_size=2, progress=False)
    metrics = results['metrics']
    assert results['num_images'] == 3
    assert {'psnr', 'equivariance_error/R', 'equivariance_error/S', 'equivariance_error/rot90'} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())


@pytest.mark.parametrize('shape', ['sd3', 'flux'])
def test_latent_statistics_of_16_channels_become_the_exported_shift_and_scale(shape, tmp_path):
    vae = _kl(shape)
    images = [torch.rand(2, 3, 32, 32) * 2 - 1 for _ in range(2)]
    stats = latent_statistics(vae, images, generator=torch.Generator().manual_seed(0))
    assert len(stats.channel_mean) == len(stats.channel_std) == 16 and stats.num_values == 4 * 16 * 4 * 4
    folder = export_diffusers(vae, tmp_path / 'vae')
    set_latent_factors(folder, stats.scaling_factor, stats.shift_factor)
    reloaded = load_autoencoder(folder)
    assert reloaded.config.scaling_factor == pytest.approx(1 / stats.std)
    assert reloaded.config.shift_factor == pytest.approx(stats.mean)
    assert reloaded.post_quant_conv is None and reloaded.config.latent_channels == 16


@pytest.mark.parametrize('shape', sorted(KL_SHAPES))
def test_export_keeps_each_kl_shape(shape, tmp_path):
    vae = _kl(shape, seed=1)
    diffusers_copy = load_autoencoder(export_diffusers(vae, tmp_path / 'vae'))
    ldm_copy = load_autoencoder(export_ldm(vae, tmp_path / 'vae.ckpt'), config=tiny_kl_config(shape))
    for copy in (diffusers_copy, ldm_copy):
        assert {k: copy.config[k] for k in KL_SHAPES[shape]} == KL_SHAPES[shape]
        for name, tensor in vae.state_dict().items():
            torch.testing.assert_close(copy.state_dict()[name], tensor, msg=name)


def test_ldm_export_of_another_class_is_refused(tmp_path):
    with pytest.raises(ValueError, match='LDM key names exist for AutoencoderKL and VQModel only, not Linear'):
        export_ldm(torch.nn.Linear(1, 1), tmp_path / 'linear.ckpt')


# --- train.py with every kind ----------------------------------------------------------------------


@pytest.fixture
def mds(tmp_path):
    clean_stale_shared_memory()
    yield write_mds(tmp_path / 'train', 8), write_mds(tmp_path / 'val', 4, seed=1)
    clean_stale_shared_memory()


def _config(tmp_path, mds, kind, architecture, **overrides):
    cfg = run_config(
        tmp_path,
        *mds,
        algorithms={'equivariance': {'p_equivariance': 1.0}},
        callbacks={'image_grid': {'interval': '2ba', 'folder': str(tmp_path / 'grids')}},
        save_folder=str(tmp_path / 'checkpoints'),
        save_interval='2ba',
        **overrides,
    )
    cfg.model.vae.config = architecture  # replaced, not merged with the default tiny KL config
    cfg.model.kind = kind
    return cfg


def _fields(config):
    return {k: v for k, v in config.items() if not k.startswith('_')}  # not diffusers' own bookkeeping


KIND_RUNS = {
    **{shape: ('kl', AutoencoderKL) for shape in KL_SHAPES if shape != 'sd'},  # SD: tests/test_train.py
    'vq': ('vq', VQModel),
}


@pytest.mark.parametrize('name', sorted(KIND_RUNS))
def test_train_evaluates_and_exports_each_kind(name, tmp_path, mds):
    kind, cls = KIND_RUNS[name]
    architecture = tiny_vq_config() if kind == 'vq' else tiny_kl_config(name)
    trainer = train(_config(tmp_path, mds, kind, architecture))
    assert int(trainer.state.timestamp.batch) == 2
    assert trainer.state.algorithms[0].branch == Branch.EQUIVARIANCE  # every microbatch was transformed
    metrics = json.loads((tmp_path / 'run' / 'metrics.json').read_text())['metrics']
    expected = {'PSNR', 'SSIM', 'EquivarianceErrorR', 'EquivarianceErrorS'}
    expected |= {'CodebookPerplexity', 'DeadCodeFraction'} if kind == 'vq' else set()
    assert set(metrics) == expected and all(math.isfinite(v) for v in metrics.values())
    if kind == 'vq':
        assert 1 <= metrics['CodebookPerplexity'] <= 32 and 0 <= metrics['DeadCodeFraction'] < 1

    assert sorted(path.name for path in (tmp_path / 'grids').iterdir()) == [
        'latent_pca_ba000002.png',
        'reconstructions_ba000002.png',
    ]

    exported = load_autoencoder(tmp_path / 'run' / 'vae')
    config = json.loads((tmp_path / 'run' / 'vae' / 'config.json').read_text())
    assert type(exported) is cls and config['_class_name'] == cls.__name__
    # The Composer checkpoint records the class with the config: scripts/export.py rebuilds the same model.
    from_checkpoint = load_autoencoder(tmp_path / 'checkpoints' / 'latest-rank0.pt')
    assert type(from_checkpoint) is cls
    assert _fields(from_checkpoint.config) == _fields(exported.config)
    assert {k: config[k] for k in architecture if k in KL_SHAPES.get(name, {})} == KL_SHAPES.get(name, {})
    trained, x = trainer.state.model.vae, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        for name_, tensor in trained.state_dict().items():
            torch.testing.assert_close(exported.state_dict()[name_], tensor, msg=name_)
            torch.testing.assert_close(from_checkpoint.state_dict()[name_], tensor, msg=name_)
        torch.testing.assert_close(
            exported.decode(adapter_for(exported).encode(exported, x)).sample,
            trained.decode(adapter_for(trained).encode(trained, x)).sample,
        )


@pytest.mark.parametrize(
    'kind, overrides, message',
    [
        ('vq', {'model': {'loss': {'kl_weight': 1e-5}}}, 'model.loss.kl_weight applies to model.kind kl only'),
        ('vq', {'model': {'gradient_checkpointing': True}}, 'model.gradient_checkpointing applies to model.kind kl'),
        ('kl', {'model': {'loss': {'codebook_weight': 0.5}}}, 'model.loss.codebook_weight applies to model.kind vq'),
        ('vq', {'model': {'eval_metrics': ['PSNR', 'FID']}}, 'unknown eval_metrics'),
    ],
)
def test_settings_of_the_other_kind_are_an_error(tmp_path, mds, kind, overrides, message):
    architecture = tiny_vq_config() if kind == 'vq' else tiny_kl_config('sd')
    cfg = _config(tmp_path, mds, kind, architecture)
    with pytest.raises((ConfigError, ValueError), match=message):
        train(OmegaConf.merge(cfg, overrides), fit=False)


def test_model_kind_must_match_the_autoencoder(tmp_path, mds):
    folder = export_diffusers(tiny_vq(), tmp_path / 'vq')
    cfg = _config(tmp_path, mds, 'kl', None)
    cfg.model.vae.pretrained = str(folder)
    with pytest.raises(ConfigError, match=r'holds a VQModel \(kind vq\) but model.kind is kl: set model.kind: vq'):
        train(cfg, fit=False)
    cfg.model.kind = 'vqgan'
    with pytest.raises(ConfigError, match="'model.kind'"):
        train(cfg, fit=False)
    cfg.model.kind = 'vq'  # and the right kind loads it from the folder, as a VQModel
    assert type(train(cfg, fit=False).state.model.vae) is VQModel
