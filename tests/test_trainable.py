"""Staged training (issue 26.1): model.trainable freezes the rest of the VAE; a decoder-only stage keeps the latent."""

import pytest
import torch
from diffusers import AutoencoderKL
from omegaconf import OmegaConf

from eqvae_composer.models import ComposerAutoencoderKL
from eqvae_composer.models.trainable import freeze_except, trains_encoder
from eqvae_composer.train import ConfigError, load_config, train
from tests.conftest import tiny_kl_config, tiny_vae
from tests.test_train import REPO, mds, run_config  # noqa: F401 (mds is a fixture)

ENCODER_SIDE = ('encoder.', 'quant_conv.')  # what shapes an AutoencoderKL's latent


def test_decoder_freezes_exactly_the_encoder_side_and_all_freezes_nothing():
    vae = tiny_vae()
    names = [n for n, _ in vae.named_parameters()]
    frozen = freeze_except(vae, 'decoder')
    assert sorted(frozen) == sorted(n for n in names if n.startswith(ENCODER_SIDE))
    assert all(p.requires_grad == (not n.startswith(ENCODER_SIDE)) for n, p in vae.named_parameters())

    untouched = tiny_vae()
    assert freeze_except(untouched, 'all') == [] and all(p.requires_grad for p in untouched.parameters())


def test_prefix_list_trains_only_the_named_modules_and_a_typo_is_named():
    vae = tiny_vae()
    freeze_except(vae, ['decoder.conv_out', 'decoder.up_blocks.3'])
    trained = {n for n, p in vae.named_parameters() if p.requires_grad}
    assert trained == {'decoder.conv_out.weight', 'decoder.conv_out.bias'} | {
        n for n, _ in vae.named_parameters() if n.startswith('decoder.up_blocks.3.')
    }
    with pytest.raises(ValueError, match="'decoder.conv_ot'"):
        freeze_except(tiny_vae(), ['decoder.conv_ot'])
    with pytest.raises(ValueError, match="unknown part 'decodr'"):
        freeze_except(tiny_vae(), 'decodr')


def test_encoder_is_trained_by_all_encoder_and_encoder_prefixes_only():
    assert trains_encoder('all') and trains_encoder('encoder') and trains_encoder(['encoder.down_blocks.0'])
    assert not trains_encoder('decoder') and not trains_encoder(['quant_conv', 'decoder'])


def test_frozen_parameters_are_left_out_of_the_optimizer_groups():
    vae = tiny_vae()
    freeze_except(vae, 'decoder')
    model = ComposerAutoencoderKL(vae)
    autoencoder_group = {id(p) for p in model.param_groups(lr=1e-4)[0]['params']}
    assert autoencoder_group == {id(p) for n, p in vae.named_parameters() if not n.startswith(ENCODER_SIDE)}


def test_equivariance_with_the_encoder_frozen_is_a_config_error_before_any_load(tmp_path, mds):  # noqa: F811
    cfg = run_config(tmp_path, *mds, model={'trainable': 'decoder', 'vae': {'config': None, 'pretrained': '/nope'}})
    with pytest.raises(ConfigError, match='algorithms.equivariance needs a trainable encoder'):
        train(cfg, fit=False)


def test_decoder_stage_with_ema_exports_the_input_encoder_bit_for_bit(tmp_path, mds):  # noqa: F811
    torch.manual_seed(3)
    AutoencoderKL.from_config(tiny_kl_config('sdxl')).save_pretrained(tmp_path / 'stage1')
    cfg = run_config(
        tmp_path, *mds, model={'trainable': 'decoder', 'vae': {'config': None, 'pretrained': str(tmp_path / 'stage1')}}
    )
    cfg.algorithms = OmegaConf.create({'ema': {'half_life': '1ba'}})  # the adversarial stage: no equivariance
    cfg.eval_loader = None
    trainer = train(cfg)

    optimizer = trainer.state.optimizers[0]
    encoder_side = [p for n, p in trainer.state.model.vae.named_parameters() if n.startswith(ENCODER_SIDE)]
    assert all(p.grad is None and p not in optimizer.state for p in encoder_side)
    before = AutoencoderKL.from_pretrained(tmp_path / 'stage1').state_dict()
    after = AutoencoderKL.from_pretrained(tmp_path / 'run' / 'vae').state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(ENCODER_SIDE))
    assert not torch.equal(before['decoder.conv_out.weight'], after['decoder.conv_out.weight'])


def test_decoder_stage_yaml_is_stage_one_on_its_export_with_the_decoder_alone():
    stage1 = load_config(REPO / 'yamls' / 'eqvae-sdxl.yaml')
    stage2 = load_config(REPO / 'yamls' / 'eqvae-sdxl-decoder-stage.yaml')
    assert stage2.model.vae.pretrained == stage1.export_folder and stage2.model.trainable == 'decoder'
    assert stage2.algorithms == {} and stage2.max_duration == '1ep'
    # Nothing else differs: the same loss, optimizer, batch and data as stage 1.
    stage2.model.vae, stage2.model.trainable, stage2.algorithms = stage1.model.vae, 'all', stage1.algorithms
    assert stage2.model == stage1.model and stage2.optimizer == stage1.optimizer
    assert stage2.train_loader == stage1.train_loader and stage2.global_train_batch_size == 160
