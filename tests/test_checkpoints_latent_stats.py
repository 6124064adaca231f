"""Latent statistics on autoencoders whose latent distribution is known by construction."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from eqvae_composer.checkpoints import export_diffusers, latent_statistics, set_latent_factors
from tests.conftest import tiny_vae


def constant_posterior_vae(channel_means: list[float], sigma: float) -> AutoencoderKL:
    """A VAE whose posterior is N(channel_means[c], sigma^2) for every image and position."""
    vae = tiny_vae()
    with torch.no_grad():
        vae.quant_conv.weight.zero_()  # the moments no longer depend on the image
        vae.quant_conv.bias.copy_(torch.tensor([*channel_means, *[math.log(sigma**2)] * len(channel_means)]))
    return vae


def batches(count: int, size: int = 32, batch_size: int = 32):
    generator = torch.Generator().manual_seed(1)
    return [torch.rand(batch_size, 3, size, size, generator=generator) * 2 - 1 for _ in range(count)]


def test_posterior_samples_of_a_known_gaussian():
    vae = constant_posterior_vae([0.7] * 4, sigma=2.5)
    stats = latent_statistics(vae, batches(4), generator=torch.Generator().manual_seed(0))
    assert stats.num_images == 128 and stats.num_values == 128 * 4 * 4 * 4 and stats.sample_posterior
    # 8192 draws: the std of the sample mean is 0.03 and of the sample std about 0.8%.
    assert stats.shift_factor == pytest.approx(0.7, abs=0.1)
    assert stats.scaling_factor == pytest.approx(1 / 2.5, rel=0.03)


def test_posterior_means_pool_the_channels():
    means = [-1.0, 0.0, 1.0, 2.0]
    stats = latent_statistics(constant_posterior_vae(means, sigma=1.0), batches(1), sample_posterior=False)
    assert stats.channel_mean == pytest.approx(means)
    assert stats.channel_std == pytest.approx([0.0] * 4, abs=1e-6)
    values = torch.tensor(means).repeat_interleave(32 * 16)  # every latent value of the 32 images
    assert stats.mean == pytest.approx(values.mean().item())
    assert stats.std == pytest.approx(values.std().item())


def test_matches_a_direct_computation_and_respects_num_images():
    vae = tiny_vae(seed=2)
    data = batches(3, batch_size=4)
    stats = latent_statistics(
        vae, ({'image': x} for x in data), num_images=10, generator=torch.Generator().manual_seed(5)
    )
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        latents = torch.cat([vae.encode(x).latent_dist.sample(generator) for x in (data[0], data[1], data[2][:2])])
    assert stats.num_images == 10
    assert stats.mean == pytest.approx(latents.double().mean().item(), rel=1e-9, abs=1e-12)
    assert stats.std == pytest.approx(latents.double().std().item(), rel=1e-9)
    assert vae.training  # the caller's mode is restored


def test_written_factors_are_what_from_pretrained_reads(tmp_path):
    export_diffusers(tiny_vae(), tmp_path)
    set_latent_factors(tmp_path, 0.25, -0.5)
    vae = AutoencoderKL.from_pretrained(tmp_path)
    assert (vae.config.scaling_factor, vae.config.shift_factor) == (0.25, -0.5)


def test_script_on_an_image_folder(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / f'{i}.png')
    export_diffusers(constant_posterior_vae([0.1, 0.2, 0.3, 0.6], sigma=2.0), tmp_path / 'vae')
    spec = importlib.util.spec_from_file_location(
        'latent_stats_script', Path(__file__).parents[1] / 'scripts' / 'latent_stats.py'
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(
        [
            '--vae',
            str(tmp_path / 'vae'),
            '--data',
            str(tmp_path),
            '--resolution',
            '32',
            '--mode',
            '--write-config',
            str(tmp_path / 'vae'),
        ]
    )
    assert 'posterior means' in capsys.readouterr().out
    config = json.loads((tmp_path / 'vae' / 'config.json').read_text())
    assert config['shift_factor'] == pytest.approx(0.3, abs=1e-6)


def test_image_loader_reads_mds(tmp_path):
    from streaming import MDSWriter

    from eqvae_composer.checkpoints import image_loader

    with MDSWriter(out=str(tmp_path / 'mds'), columns={'image': 'bytes'}) as writer:
        for i in range(3):
            Image.new('RGB', (40, 30), (10 * i, 0, 0)).save(tmp_path / 'x.png')
            writer.write({'image': (tmp_path / 'x.png').read_bytes()})
    images = torch.cat([batch['image'] for batch in image_loader(tmp_path / 'mds', resolution=16, batch_size=2)])
    assert images.shape == (3, 3, 16, 16)
    assert images[:, 0, 0, 0].tolist() == pytest.approx([-1.0, -1 + 20 / 255, -1 + 40 / 255], abs=1e-6)
