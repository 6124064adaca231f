"""Every accepted input format, saved here with diffusers or plain torch, through the one loading function."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from eqvae_composer.checkpoints import (
    SD_VAE_CONFIG,
    AutoencoderLoadError,
    diffusers_to_ldm,
    export_diffusers,
    export_ldm,
    ldm_key_map,
    load_autoencoder,
)
from tests.conftest import tiny_vae, tiny_vae_config

IMAGES = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def reconstruct(vae: AutoencoderKL) -> torch.Tensor:
    with torch.no_grad():
        return vae.decode(vae.encode(IMAGES).latent_dist.mode()).sample


def assert_same_model(a: AutoencoderKL, b: AutoencoderKL) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert torch.equal(reconstruct(a), reconstruct(b))


def test_sd_vae_key_map_has_the_kl_f8_names():
    mapping = ldm_key_map(SD_VAE_CONFIG)
    assert len(mapping) == 248  # every tensor of the kl-f8 autoencoder
    assert mapping['encoder.down_blocks.0.resnets.0.conv1.weight'] == 'encoder.down.0.block.0.conv1.weight'
    assert mapping['decoder.up_blocks.0.resnets.2.conv2.bias'] == 'decoder.up.3.block.2.conv2.bias'
    shortcut = 'encoder.down_blocks.1.resnets.0.conv_shortcut.weight'
    assert mapping[shortcut] == 'encoder.down.1.block.0.nin_shortcut.weight'
    assert mapping['decoder.mid_block.attentions.0.to_out.0.weight'] == 'decoder.mid.attn_1.proj_out.weight'
    assert mapping['encoder.conv_norm_out.bias'] == 'encoder.norm_out.bias'


def test_ldm_attention_weights_are_1x1_convs():
    vae = tiny_vae()
    ldm = diffusers_to_ldm(vae.state_dict(), vae.config)
    for name in ('q', 'k', 'v', 'proj_out'):
        assert ldm[f'encoder.mid.attn_1.{name}.weight'].shape == (8, 8, 1, 1)
    assert ldm['encoder.mid.attn_1.q.bias'].shape == (8,)


@pytest.mark.parametrize('suffix,prefix', [('.ckpt', False), ('.ckpt', True), ('.safetensors', False)])
def test_diffusers_to_ldm_file_to_diffusers_round_trip(tmp_path, suffix, prefix):
    vae = tiny_vae(seed=3)
    path = export_ldm(vae, tmp_path / f'vae{suffix}', prefix=prefix)
    assert_same_model(vae, load_autoencoder(path, config=tiny_vae_config()))


def test_lightning_checkpoint_with_loss_keys(tmp_path):
    vae = tiny_vae(seed=4)
    state = diffusers_to_ldm(vae.state_dict(), vae.config)
    # An LDM autoencoder's own model.ckpt also holds its loss: LPIPS, discriminator, logvar.
    state.update({'loss.logvar': torch.zeros(()), 'loss.discriminator.main.0.weight': torch.ones(2, 3, 4, 4)})
    torch.save({'state_dict': state, 'epoch': 3, 'global_step': 10}, tmp_path / 'model.ckpt')
    assert_same_model(vae, load_autoencoder(tmp_path / 'model.ckpt', config=tiny_vae_config()))


def test_full_sd_checkpoint_reads_only_first_stage_model(tmp_path):
    vae = tiny_vae(seed=5)
    state = diffusers_to_ldm(vae.state_dict(), vae.config, prefix='first_stage_model.')
    state['model.diffusion_model.input_blocks.0.0.weight'] = torch.ones(3)
    torch.save({'state_dict': state}, tmp_path / 'sd.ckpt')
    assert_same_model(vae, load_autoencoder(tmp_path / 'sd.ckpt', config=tiny_vae_config()))


def test_bare_state_dicts(tmp_path):
    vae = tiny_vae(seed=6)
    torch.save(vae.state_dict(), tmp_path / 'diffusers.bin')  # diffusers names
    save_file(diffusers_to_ldm(vae.state_dict(), vae.config), str(tmp_path / 'ldm.safetensors'))
    for name in ('diffusers.bin', 'ldm.safetensors'):
        assert_same_model(vae, load_autoencoder(tmp_path / name, config=tiny_vae_config()))


def test_diffusers_folder_with_subfolder_and_config_from_folder(tmp_path):
    vae = tiny_vae(seed=7)
    export_diffusers(vae, tmp_path / 'repo' / 'vae')
    assert_same_model(vae, load_autoencoder(tmp_path / 'repo', subfolder='vae'))
    export_ldm(vae, tmp_path / 'vae.ckpt')
    # The architecture of a single file, read from a diffusers folder's config.json.
    assert_same_model(vae, load_autoencoder(tmp_path / 'vae.ckpt', config=tmp_path / 'repo' / 'vae'))


def test_wrong_architecture_lists_the_keys(tmp_path):
    export_ldm(tiny_vae(blocks=3), tmp_path / 'three_levels.ckpt')
    with pytest.raises(AutoencoderLoadError, match=r'missing keys \[.*encoder\.down\.3\.block\.0'):
        load_autoencoder(tmp_path / 'three_levels.ckpt', config=tiny_vae_config())
    export_ldm(tiny_vae(), tmp_path / 'four_levels.ckpt')
    with pytest.raises(AutoencoderLoadError, match=r'unexpected keys \[.*encoder\.down\.3\.'):
        load_autoencoder(tmp_path / 'four_levels.ckpt', config=tiny_vae_config(blocks=3))
    torch.save(tiny_vae(latent_channels=8).state_dict(), tmp_path / 'wide.bin')
    with pytest.raises(AutoencoderLoadError, match=r'wrong shapes \[.*quant_conv'):
        load_autoencoder(tmp_path / 'wide.bin', config=tiny_vae_config())
    with pytest.raises(AutoencoderLoadError, match='missing keys'):  # the SD-VAE default does not fit
        load_autoencoder(tmp_path / 'four_levels.ckpt')


@pytest.mark.parametrize('suffix', ['.ckpt', '.safetensors'])
def test_truncated_file_is_a_clear_file_error(tmp_path, suffix):
    path = export_ldm(tiny_vae(), tmp_path / f'vae{suffix}')
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(AutoencoderLoadError, match='not a readable checkpoint file: it may be truncated'):
        load_autoencoder(path, config=tiny_vae_config())


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_autoencoder(tmp_path / 'nope.ckpt')


def test_offline_uncached_hub_id_says_pass_a_local_path(monkeypatch, tmp_path):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path))  # an empty cache: nothing is cached
    with pytest.raises(AutoencoderLoadError, match='not in the Hugging Face cache.*Pass a local path'):
        load_autoencoder('eqvae-tests/not-a-real-vae', subfolder='vae')
