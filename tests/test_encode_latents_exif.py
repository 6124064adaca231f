"""What the README says of EXIF-rotated photos in latents: an image folder is encoded as DiT's ImageFolder loader
reads it (the stored pixel grid, tag ignored), convert_dataset.py's MDS as the upright photo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from eqvae_composer.data.convert import ConvertOptions, convert
from eqvae_composer.data.transforms import to_tensor
from eqvae_composer.latents import EncodeOptions, center_crop_arr, encode_latents
from tests.conftest import tiny_vae
from tests.data_fixtures import photo, read_mds, streaming_env, write_image  # noqa: F401  (fixture, used by name)


def _encoded_mean(vae: torch.nn.Module, img: Image.Image) -> np.ndarray:
    with torch.no_grad():
        return vae.encode(to_tensor(center_crop_arr(img, 16))[None]).latent_dist.mean[0].numpy()


@pytest.mark.usefixtures('streaming_env')
def test_an_exif_rotated_photo_is_encoded_unrotated_from_a_folder_and_upright_from_converted_mds(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = write_image(tmp_path / 'images' / '0' / 'rotated.jpg', photo(48, 24, seed=1), exif=exif)
    tiny_vae(blocks=2).save_pretrained(tmp_path / 'vae')
    vae = tiny_vae(blocks=2).eval()
    options = EncodeOptions(resolution=16, dtype='float32', progress=False)
    encode_latents(str(tmp_path / 'vae'), str(tmp_path / 'images'), str(tmp_path / 'from-folder'), options)
    convert('folder', str(tmp_path / 'mds'), input=str(tmp_path / 'images'), options=ConvertOptions(progress=False))
    encode_latents(str(tmp_path / 'vae'), str(tmp_path / 'mds'), str(tmp_path / 'from-mds'), options)

    with Image.open(path) as f:  # DiT: ImageFolder's pil_loader, Image.open(f).convert('RGB'), then the crop
        as_dit_reads = f.convert('RGB')
    upright = ImageOps.exif_transpose(as_dit_reads.copy())
    assert as_dit_reads.size == (48, 24) and upright.size == (24, 48)
    from_folder, from_mds = read_mds(tmp_path / 'from-folder')[0]['mean'], read_mds(tmp_path / 'from-mds')[0]['mean']
    np.testing.assert_allclose(from_folder, _encoded_mean(vae, as_dit_reads), atol=1e-5)
    np.testing.assert_allclose(from_mds, _encoded_mean(vae, upright), atol=1e-5)
    assert not np.allclose(from_folder, from_mds, atol=1e-2)
