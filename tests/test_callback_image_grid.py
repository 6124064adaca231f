"""ImageGridCallback in a 2-batch Trainer run, and the PCA latent picture."""

import numpy as np
import pytest
import torch
from composer import Trainer
from PIL import Image

from eqvae_composer.callbacks import ImageGridCallback
from eqvae_composer.evaluation import latent_pca_rgb
from eqvae_composer.models import ComposerAutoencoderKL, VAEGANLoss
from tests.conftest import tiny_vae


def test_latent_pca_rgb_orders_components():
    # Channel 0 varies most (a ramp along x), channel 1 less (along y): PCA puts them in that order.
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 8), torch.linspace(-1, 1, 8), indexing='ij')
    latent = torch.stack([4 * xs, ys, torch.zeros_like(xs), torch.zeros_like(xs)])[None]
    rgb = latent_pca_rgb(latent)
    assert rgb.shape == (1, 3, 8, 8) and rgb.min() >= 0 and rgb.max() <= 1
    torch.testing.assert_close(rgb[0, 0], (xs + 1) / 2, atol=1e-5, rtol=0)  # sign fixed: + loading
    torch.testing.assert_close(rgb[0, 1], (ys + 1) / 2, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_callback_writes_pngs(tmp_path):
    torch.manual_seed(0)
    data = [{'image': image} for image in torch.rand(4, 3, 32, 32) * 2 - 1]
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    model = ComposerAutoencoderKL(tiny_vae(), VAEGANLoss(lpips_weight=0, disc_weight=0))
    callback = ImageGridCallback(interval='1ba', num_images=3, folder=str(tmp_path / '{run_name}' / 'grids'))
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        optimizers=torch.optim.Adam(model.param_groups(lr=1e-3)),
        max_duration='2ba',
        callbacks=[callback],
        run_name='grid-test',
        device='cpu',
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    names = sorted(p.name for p in (tmp_path / 'grid-test' / 'grids').iterdir())
    assert names == [f'{kind}_ba{b:06d}.png' for kind in ('latent_pca', 'reconstructions') for b in (1, 2)]
    grid = np.array(Image.open(tmp_path / 'grid-test' / 'grids' / 'reconstructions_ba000002.png'))
    # 3 images; input | reconstruction | (tau(x) | D(tau(z))) for 2 transforms; torchvision's 2-px padding is absent.
    assert grid.shape == (3 * 32, 6 * 32, 3)
    first_input = ((data[0]['image'].permute(1, 2, 0) + 1) / 2 * 255).round().numpy()
    assert np.abs(grid[:32, :32].astype(float) - first_input).max() <= 1
    assert np.array(Image.open(tmp_path / 'grid-test' / 'grids' / 'latent_pca_ba000001.png')).shape == (96, 64, 3)
