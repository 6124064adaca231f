"""Latents of VAEs that do not downsample by 8 (LDM's kl-f4 and kl-f16, a 2-block f2): the stored shape is the
VAE's own latent grid, and the resolution is checked against the VAE's own factor."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from eqvae_composer.latents import EncodeOptions, StreamingLatentDataset, encode_latents
from eqvae_composer.latents.preprocess import preprocess_image
from tests.conftest import tiny_vae
from tests.data_fixtures import photo, streaming_env, write_image  # noqa: F401  (fixture, used by name)

pytestmark = pytest.mark.usefixtures('streaming_env')
QUIET = dict(progress=False, dtype='float32')


@pytest.fixture
def photos(tmp_path) -> list[Path]:
    return [Path(write_image(tmp_path / 'images' / f'{i}.jpg', photo(45 + 10 * i, 40, seed=i))) for i in range(3)]


def _vae_dir(tmp_path: Path, blocks: int) -> Path:
    tiny_vae(blocks=blocks).save_pretrained(tmp_path / f'vae{blocks}')
    return tmp_path / f'vae{blocks}'


# diffusers' encoder halves the grid after every block but the last: f = 2 ** (blocks - 1).
@pytest.mark.parametrize('blocks, factor, resolution', [(2, 2, 32), (3, 4, 36), (5, 16, 32)])
def test_latents_of_an_f2_f4_f16_vae_have_its_grid_and_decode_as_the_direct_path(
    tmp_path, photos, blocks, factor, resolution
):
    vae_dir, out = _vae_dir(tmp_path, blocks), tmp_path / 'latents'
    summary = encode_latents(str(vae_dir), str(photos[0].parent), str(out), EncodeOptions(resolution, **QUIET))
    assert summary.written == 3
    side = resolution // factor  # 16, 9, 2 cells
    metadata = json.loads((out / 'latents.json').read_text())
    assert metadata['latent_shape'] == [4, side, side] and metadata['vae']['downsample_factor'] == factor
    dataset = StreamingLatentDataset(local=str(out), shuffle=False, sample_posterior=False)
    vae = tiny_vae(blocks=blocks).eval()
    with torch.no_grad():
        for i, path in enumerate(photos):
            pixels = preprocess_image(Image.open(path), resolution)[None]
            mean = vae.encode(pixels).latent_dist.mean
            latent = dataset.unscale(dataset[i]['latent'])
            assert latent.shape == (4, side, side)
            torch.testing.assert_close(latent, mean[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(vae.decode(latent[None]).sample, vae.decode(mean).sample, atol=1e-4, rtol=0)


def test_the_resolution_is_checked_against_the_vaes_factor(tmp_path, photos):
    vae_dir = _vae_dir(tmp_path, 5)
    # 40 is a multiple of 8 but not of this VAE's 16: the message names the factor and a resolution that works.
    with pytest.raises(ValueError, match=r'--resolution 40 must be a multiple of 16, the downsampling factor .* 32\.'):
        encode_latents(str(vae_dir), str(photos[0].parent), str(tmp_path / 'out'), EncodeOptions(40, **QUIET))
    assert not (tmp_path / 'out' / 'index.json').exists()


def test_a_reflect_padded_vaes_latents_record_the_mode_and_decode_with_it(tmp_path, photos):
    from eqvae_composer.diffusion.vae import LatentDecoder  # the probe's decoder reads what encoding records
    from eqvae_composer.padding import set_padding_mode

    vae = tiny_vae(blocks=2).eval()
    set_padding_mode(vae, 'reflect')
    vae.save_pretrained(tmp_path / 'vae')
    out = tmp_path / 'latents'
    encode_latents(str(tmp_path / 'vae'), str(photos[0].parent), str(out), EncodeOptions(32, **QUIET))
    metadata = json.loads((out / 'latents.json').read_text())
    assert metadata['vae']['padding_mode'] == 'reflect'
    dataset = StreamingLatentDataset(local=str(out), shuffle=False, sample_posterior=False)
    with torch.no_grad():
        pixels = preprocess_image(Image.open(photos[0]), 32)[None]
        mean = vae.encode(pixels).latent_dist.mean  # the reflect-padded encoder's, not a zero-padded one's
        torch.testing.assert_close(dataset.unscale(dataset[0]['latent']), mean[0], atol=1e-5, rtol=0)
        expected = vae.decode(mean).sample.clamp(-1, 1)
        torch.testing.assert_close(LatentDecoder(metadata)(dataset[0]['latent'][None]), expected, atol=1e-4, rtol=0)
