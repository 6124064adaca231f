"""Network names, the decoder of the latents' VAE, and the command line's one-line errors."""

import json

import pytest
import torch
from diffusers import AutoencoderKL

from eqvae_composer.diffusion.network import dit_config
from eqvae_composer.diffusion.vae import LatentDecoder
from eqvae_composer.padding import set_padding_mode
from tests.conftest import tiny_kl_config


@pytest.mark.parametrize(
    'name, depth, width, heads, patch',
    [
        ('DiT-S/2', 12, 384, 6, 2),
        ('DiT-B/4', 12, 768, 12, 4),
        ('SiT-L/8', 24, 1024, 16, 8),
        ('DiT-XL/2', 28, 1152, 16, 2),
    ],
)
def test_network_names_follow_dits_table(name, depth, width, heads, patch):
    config = dit_config(name, in_channels=16, sample_size=32, num_classes=10)
    assert config['num_layers'] == depth and config['num_attention_heads'] == heads and config['patch_size'] == patch
    assert config['num_attention_heads'] * config['attention_head_dim'] == width
    assert config['in_channels'] == config['out_channels'] == 16 and config['num_embeds_ada_norm'] == 10


def test_network_errors():
    with pytest.raises(ValueError, match="unknown network 'DiT-B/3'"):
        dit_config('DiT-B/3', 4, 32, 10)
    with pytest.raises(ValueError, match='latent side 30 is not divisible by the patch size 4'):
        dit_config('DiT-B/4', 4, 30, 10)


def _metadata(vae_dir, config):
    return {
        'vae': {
            'source': str(vae_dir),
            'class': 'AutoencoderKL',
            'scaling_factor': config['scaling_factor'],
            'shift_factor': config.get('shift_factor') or 0.0,
        }
    }


def test_the_decoder_undoes_the_datasets_scaling_and_shift(tmp_path):
    config = tiny_kl_config('sd3')  # scaling 1.5305, shift 0.0609
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(config)
    vae.save_pretrained(tmp_path / 'vae')
    decoder = LatentDecoder(_metadata(tmp_path / 'vae', config))
    z = torch.randn(2, 16, 4, 4)
    scaled = (z - 0.0609) * 1.5305  # what StreamingLatentDataset hands the diffusion model
    with torch.no_grad():
        expected = vae.decode(z).sample.clamp(-1, 1)
    assert torch.allclose(decoder(scaled), expected, atol=1e-5)


def test_the_decoder_pads_as_the_vae_was_trained(tmp_path):
    # A reflect-padded VAE's mode lives in an extra config.json key that plain diffusers ignores.
    config = tiny_kl_config('sd3')
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(config)
    set_padding_mode(vae, 'reflect')
    vae.save_pretrained(tmp_path / 'vae')
    z = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        reflected = vae.decode(z).sample.clamp(-1, 1)
        set_padding_mode(vae, 'zeros')
        zero_padded = vae.decode(z).sample.clamp(-1, 1)
    assert not torch.allclose(reflected, zero_padded, atol=1e-3)  # the borders tell them apart
    decoder = LatentDecoder(_metadata(tmp_path / 'vae', config))
    assert torch.allclose(decoder((z - 0.0609) * 1.5305), reflected, atol=1e-5)


def test_the_decoder_refuses_a_vae_with_other_factors_or_none(tmp_path):
    config = tiny_kl_config('sd3')
    AutoencoderKL.from_config(config).save_pretrained(tmp_path / 'vae')
    metadata = _metadata(tmp_path / 'vae', config)
    metadata['vae']['scaling_factor'] = 0.18215
    with pytest.raises(ValueError, match='it is not the VAE of these latents'):
        LatentDecoder(metadata)
    with pytest.raises(FileNotFoundError, match='cannot read the VAE of these latents from .*nowhere'):
        LatentDecoder(_metadata(tmp_path / 'nowhere', config))


def test_train_diffusion_stops_with_one_line_naming_the_key(tmp_path, capsys, monkeypatch):
    import train_diffusion

    path = tmp_path / 'run.yaml'
    path.write_text(json.dumps({'num_clases': 4}))
    monkeypatch.setattr('sys.argv', ['train_diffusion.py', str(path)])
    with pytest.raises(SystemExit) as exit_info:
        from eqvae_composer.cli import run_cli

        run_cli(train_diffusion.main)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config key 'num_clases'" in err[0]
