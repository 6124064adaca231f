"""The diffusability proxies on inputs whose spectrum is known by hand; the report script end to end."""

import json
import math

import pytest
import torch

from eqvae_composer.diffusion.proxies import channel_statistics, high_frequency_share, radial_power_spectrum


def test_a_constant_has_only_the_dc_ring_and_no_high_frequency_share():
    freqs, power = radial_power_spectrum(torch.full((2, 3, 8, 8), 2.0))
    assert freqs.tolist() == [0, 0.25, 0.5, 0.75, 1.0]
    # |FFT|^2 at DC = (64 * 2)^2, divided by 64 pixels; every other frequency 0
    assert power[0] == pytest.approx(256.0) and power[1:].abs().max() < 1e-12
    assert high_frequency_share(torch.full((1, 1, 8, 8), 2.0)) == 0.0


def test_a_checkerboard_is_all_high_frequency_and_a_slow_wave_none():
    i = torch.arange(16)
    checker = ((-1.0) ** (i[:, None] + i[None, :]))[None, None]  # (Nyquist, Nyquist): radius sqrt(2) > 1
    nyquist_rows = ((-1.0) ** i[:, None]).expand(16, 16)[None, None].clone()  # radius exactly 1
    slow = torch.cos(2 * math.pi * i / 16)[None, :].expand(16, 16)[None, None].clone()  # one cycle: 1/8 Nyquist
    assert high_frequency_share(nyquist_rows) == 1.0
    assert high_frequency_share(slow) < 1e-12
    assert high_frequency_share(checker) == 0.0  # outside the Nyquist disc: not counted
    freqs, power = radial_power_spectrum(slow)
    assert power.argmax() == 1 and freqs[1] == 0.125


def test_channel_statistics_per_channel():
    latents = torch.stack([torch.full((4, 4), 1.0), torch.arange(16.0).reshape(4, 4)])[None].repeat(2, 1, 1, 1)
    stats = channel_statistics(latents)
    assert stats['mean'] == pytest.approx([1.0, 7.5])
    assert stats['std'][0] == 0 and stats['std'][1] == pytest.approx(torch.arange(16.0).repeat(2).std().item())
    assert stats['beyond_3_std'] == [0.0, 0.0]


def test_the_report_script_writes_json_and_png(tmp_path):
    from diffusers import AutoencoderKL

    import scripts.diffusability_report as script
    from tests.conftest import tiny_kl_config
    from tests.data_fixtures import photo, write_image

    torch.manual_seed(0)
    AutoencoderKL.from_config(tiny_kl_config('sd')).save_pretrained(tmp_path / 'vae')
    for i in range(6):
        write_image(tmp_path / 'images' / f'{i}.png', photo(40, 40, seed=i))
    out = tmp_path / 'report'
    script.main(
        ['--vae', str(tmp_path / 'vae'), '--data', str(tmp_path / 'images'), '--resolution', '32']
        + ['--num-images', '6', '--out', str(out)]
    )
    report = json.loads((out / 'report.json').read_text())
    assert report['num_images'] == 6 and len(report['channels']['std']) == 4
    assert 0 <= report['spectrum']['latents']['high_frequency_share'] <= 1
    assert set(report['equivariance']) == {'rotation', 'scale'} and report['intrinsic_dimension'] > 0
    assert (out / 'report.png').stat().st_size > 1000
