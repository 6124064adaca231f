"""taming-transformers VQGAN checkpoints: loaded into a diffusers VQModel, exported back, against taming's own forward.

``tests/taming_vqgan.py`` transcribes taming's ``VQModel`` (its module names and forward); a tiny one
with attention inside its lowest-resolution level (as the ImageNet f16-16384 model has) is saved the
way Lightning saves it, ``{'state_dict': ...}`` with the loss's tensors beside the model's.
"""

import pytest
import torch
from diffusers import VQModel

from eqvae_composer.checkpoints import (
    AutoencoderLoadError,
    export_ldm,
    load_autoencoder,
    taming_key_map,
    taming_vq_config,
)
from eqvae_composer.introspection import adapter_for
from tests import taming_vqgan

N_EMBED, EMBED_DIM = 16, 3


@pytest.fixture(scope='module')
def taming(tmp_path_factory):
    """A tiny taming VQGAN (f4, attention at the 4 px level) and its Lightning-style .ckpt."""
    torch.manual_seed(0)
    model = taming_vqgan.VQModel(taming_vqgan.taming_ddconfig(), N_EMBED, EMBED_DIM).eval()
    with torch.no_grad():  # codes among the encoder's outputs, so that images pick many of them
        images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
        z_e = model.quant_conv(model.encoder(images)).permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)
        model.quantize.embedding.weight.copy_(z_e[torch.randperm(len(z_e))[:N_EMBED]])
    path = tmp_path_factory.mktemp('taming') / 'last.ckpt'
    loss = {'loss.discriminator.main.0.weight': torch.randn(4, 3, 4, 4), 'loss.logvar': torch.zeros(())}
    torch.save({'state_dict': {**model.state_dict(), **loss}, 'global_step': 7, 'epoch': 1}, path)
    return model, path


def test_a_taming_checkpoint_loads_and_reconstructs_as_taming_does(taming):
    model, path = taming
    vae = load_autoencoder(path).eval()
    assert isinstance(vae, VQModel)
    # The architecture, read from the tensors: 3 levels, attention in the lowest-resolution one.
    assert vae.config.block_out_channels == [32, 32, 64] and vae.config.layers_per_block == 1
    assert vae.config.down_block_types == ['DownEncoderBlock2D', 'DownEncoderBlock2D', 'AttnDownEncoderBlock2D']
    assert vae.config.up_block_types == ['AttnUpDecoderBlock2D', 'UpDecoderBlock2D', 'UpDecoderBlock2D']
    assert (vae.config.num_vq_embeddings, vae.config.vq_embed_dim, vae.config.latent_channels) == (N_EMBED, 3, 4)

    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected, expected_loss = model(x)
        _, _, (_, _, expected_codes) = model.encode(x)
        ours = vae(x)
        codes = adapter_for(vae).codes(vae, adapter_for(vae).encode(vae, x))
    assert len(expected_codes.unique()) > 4  # enough codes in play that a wrong mapping would show
    assert torch.equal(codes.flatten(), expected_codes)
    torch.testing.assert_close(ours.sample, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.commit_loss.reshape(()), expected_loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('prefix', [False, True])
def test_export_gives_back_tamings_keys_and_values(taming, tmp_path, prefix):
    model, path = taming
    exported = export_ldm(load_autoencoder(path), tmp_path / 'back.ckpt', prefix=prefix)
    state = torch.load(exported, map_location='cpu', weights_only=True)['state_dict']
    expected = {('first_stage_model.' if prefix else '') + k: v for k, v in model.state_dict().items()}
    assert sorted(state) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert state[('first_stage_model.' if prefix else '') + 'encoder.down.2.attn.0.q.weight'].shape == (64, 64, 1, 1)
    # ... and that file loads again (a full-model layout reads the first_stage_model.* keys only).
    reloaded = load_autoencoder(exported)
    for key, value in load_autoencoder(path).state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_a_taming_checkpoint_with_a_key_missing_names_it(taming, tmp_path):
    model, _ = taming
    state = model.state_dict()
    del state['decoder.up.2.attn.0.proj_out.bias']
    torch.save({'state_dict': state}, tmp_path / 'broken.ckpt')
    with pytest.raises(AutoencoderLoadError, match=r'missing keys \[.decoder\.up\.2\.attn\.0\.proj_out\.bias.\]'):
        load_autoencoder(tmp_path / 'broken.ckpt')


def test_export_script_converts_a_taming_checkpoint(taming, tmp_path):
    from scripts.export import main

    model, path = taming
    main(['--checkpoint', str(path), '--out', str(tmp_path / 'vqgan'), '--ldm', str(tmp_path / 'vqgan.safetensors')])
    folder = load_autoencoder(tmp_path / 'vqgan')
    assert isinstance(folder, VQModel) and folder.config.down_block_types[-1] == 'AttnDownEncoderBlock2D'
    from safetensors.torch import load_file

    assert sorted(load_file(str(tmp_path / 'vqgan.safetensors'))) == sorted(model.state_dict())


def test_a_config_given_for_a_taming_checkpoint_must_be_a_vq_models(taming):
    _, path = taming
    inferred = load_autoencoder(path).config
    vae = load_autoencoder(path, config={k: v for k, v in inferred.items() if not k.startswith('_')})
    assert isinstance(vae, VQModel)  # no class name: the VQModel the file holds
    with pytest.raises(AutoencoderLoadError, match='taming VQGAN, but the config given is for AutoencoderKL'):
        load_autoencoder(path, config={**inferred, '_class_name': 'AutoencoderKL'})


def test_the_imagenet_f16_16384_layout_maps_key_for_key_and_shape_for_shape():
    # taming's configs/imagenet_vqgan.yaml (vqgan_imagenet_f16_16384), built on the meta device: no memory.
    ddconfig = {**taming_vqgan.taming_ddconfig((1, 1, 2, 2, 4), (16,), 256, 256), 'ch': 128, 'num_res_blocks': 2}
    with torch.device('meta'):
        state = taming_vqgan.VQModel(ddconfig, 16384, 256).state_dict()
        config = taming_vq_config(state)
        ours = VQModel.from_config(config).state_dict()
    assert config['down_block_types'][-1] == 'AttnDownEncoderBlock2D' and config['block_out_channels'][-1] == 512
    mapping = taming_key_map(config)
    assert sorted(mapping) == sorted(ours) and sorted(mapping.values()) == sorted(state)
    for key, taming_key in mapping.items():
        assert ours[key].numel() == state[taming_key].numel(), key
        assert ours[key].shape == state[taming_key].shape or ours[key].ndim == 2, key  # attention: linear vs 1x1 conv
