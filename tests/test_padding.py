"""Reflection padding (issue 26.2): which convolutions it changes, where it is recorded, who restores it."""

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL
from torch import nn

from eqvae_composer.checkpoints import load_autoencoder
from eqvae_composer.models import VAEGANLoss
from eqvae_composer.padding import apply_recorded_padding_mode, set_padding_mode
from eqvae_composer.train import ConfigError, train
from tests.conftest import tiny_vae
from tests.test_train import mds, run_config  # noqa: F401 (mds is a fixture)

README = Path(__file__).resolve().parents[1] / 'README.md'


def modes(vae: nn.Module) -> dict[str, str]:
    return {name: m.padding_mode for name, m in vae.named_modules() if isinstance(m, nn.Conv2d)}


def test_reflect_reaches_every_padded_conv_and_leaves_downsample2d_and_1x1_convs_alone():
    vae = tiny_vae()  # 4 blocks, 1 layer per block
    # Encoder: conv_in, 4 blocks x 1 resnet x 2 convs, mid 2 resnets x 2 convs, conv_out = 14.
    # Decoder: conv_in, mid 4, 4 blocks x 2 resnets x 2 convs, 3 upsamplers, conv_out = 25.
    assert set_padding_mode(vae, 'reflect') == 39
    zero_padded = sorted(name for name, mode in modes(vae).items() if mode == 'zeros')
    downsamplers = [f'encoder.down_blocks.{i}.downsamplers.0.conv' for i in range(3)]  # pad (0, 1, 0, 1) themselves
    assert zero_padded == sorted([*downsamplers, 'quant_conv', 'post_quant_conv'])
    assert vae.config.padding_mode == 'reflect'


def test_a_reflect_padded_conv_maps_a_constant_image_to_a_constant():
    # Reflection has no border: every window of a constant image is the same. Zeros darken the border.
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    nn.init.constant_(conv.weight, 1.0)
    image = torch.ones(1, 1, 5, 5)
    zero_padded = conv(image)[0, 0]
    assert (zero_padded[0, 0], zero_padded[0, 2], zero_padded[2, 2]) == (4.0, 6.0, 9.0)  # corner, edge, inside
    conv.padding_mode = 'reflect'
    assert torch.equal(conv(image), torch.full_like(image, 9.0))


def test_the_mode_travels_in_config_json_and_load_autoencoder_restores_it(tmp_path):
    vae = tiny_vae()
    set_padding_mode(vae, 'reflect')
    vae.save_pretrained(tmp_path / 'vae')
    assert json.loads((tmp_path / 'vae' / 'config.json').read_text())['padding_mode'] == 'reflect'

    plain = AutoencoderKL.from_pretrained(tmp_path / 'vae')  # diffusers tolerates the key, and ignores it
    assert set(modes(plain).values()) == {'zeros'}
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = vae.decode(vae.encode(x).latent_dist.mode()).sample
        for loaded in (load_autoencoder(tmp_path / 'vae'), apply_recorded_padding_mode(plain)):
            assert modes(loaded) == modes(vae)
            torch.testing.assert_close(loaded.decode(loaded.encode(x).latent_dist.mode()).sample, expected)
    # A config dict (model.vae.config, a Composer checkpoint's recorded config) restores it too.
    assert modes(load_autoencoder(dict(vae.config))) == modes(vae)


def test_adaptive_weight_differentiates_the_reflect_padded_last_layer():
    torch.manual_seed(0)
    last = nn.Conv2d(4, 3, 3, padding=1, padding_mode='reflect')
    h = torch.randn(2, 4, 6, 6)
    grad_nll, grad_g = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)

    def weight_grad(grad_output):
        return torch.autograd.grad((last(h) * grad_output).sum(), last.weight)[0]

    expected = weight_grad(grad_nll).norm() / (weight_grad(grad_g).norm() + 1e-4) * 0.5
    got = VAEGANLoss(lpips_weight=0.0, disc_weight=0.5)._adaptive_weight(grad_nll, grad_g, last, h)
    torch.testing.assert_close(got, expected)


def test_unknown_padding_mode_is_a_config_error(tmp_path, mds):  # noqa: F811
    cfg = run_config(tmp_path, *mds, model={'vae': {'padding_mode': 'mirror'}})
    with pytest.raises(ConfigError, match="model.vae.padding_mode: unknown mode 'mirror'"):
        train(cfg, fit=False)


def test_training_with_reflect_exports_and_checkpoints_the_mode(tmp_path, mds):  # noqa: F811
    # Scales of at least 0.5: at 32 px the grid's 8/32 gives 1-cell latents, which reflection cannot pad.
    two_cells = {'equivariance': {'scales': [0.5, 0.75]}}
    cfg = run_config(
        tmp_path,
        *mds,
        model={'vae': {'padding_mode': 'reflect'}},
        save_folder=str(tmp_path / 'ckpt'),
        algorithms=two_cells,
    )
    cfg.eval_loader = None
    trainer = train(cfg)
    assert set(modes(trainer.state.model.vae.decoder).values()) == {'reflect'}
    for source in (tmp_path / 'run' / 'vae', tmp_path / 'ckpt' / 'latest-rank0.pt'):
        assert modes(load_autoencoder(source)) == modes(trainer.state.model.vae)

    # A resumed run that does not set the mode takes the checkpoint's; one that sets another is stopped.
    resumed = run_config(
        tmp_path, *mds, load_path=str(tmp_path / 'ckpt' / 'latest-rank0.pt'), max_duration='3ba', algorithms=two_cells
    )
    resumed.eval_loader, resumed.export_folder = None, None
    assert modes(train(resumed).state.model.vae) == modes(trainer.state.model.vae)
    resumed.model.vae.padding_mode = 'zeros'
    with pytest.raises(ValueError, match="trained with model.vae.padding_mode 'reflect' and this run sets 'zeros'"):
        train(resumed)


def test_readme_blocks_restore_the_mode_with_and_without_this_package(tmp_path, monkeypatch):
    section = README.read_text().split('### Reflection padding')[1].split('\n## ')[0].split('\n### ')[0]
    with_package, without = re.findall(r'```python\n(.*?)```', section, flags=re.S)
    trained = tiny_vae()
    set_padding_mode(trained, 'reflect')
    trained.save_pretrained(tmp_path / 'runs' / 'pad' / 'vae')
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(with_package, str(README), 'exec'), namespace)
    assert modes(namespace['vae']) == modes(trained)
    namespace['vae'] = AutoencoderKL.from_pretrained('runs/pad/vae')  # zero padding, as elsewhere
    exec(compile(without, str(README), 'exec'), namespace)
    assert modes(namespace['vae']) == modes(trained)
