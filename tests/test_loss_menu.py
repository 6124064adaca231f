"""The loss menu beyond the paper: L1/L2/SSIM/LPIPS weights, another LPIPS backbone, their config keys."""

import numpy as np
import pytest
import torch
import torchvision
from skimage.metrics import structural_similarity
from torch import nn

from eqvae_composer.models import LOSS_KEYS, ComposerAutoencoderKL, VAEGANLoss
from eqvae_composer.models.loss import ssim_distance
from eqvae_composer.models.lpips import load_lpips_net
from eqvae_composer.train import ConfigError, LossConfig, ModelConfig, VAEConfig, build_model
from eqvae_composer.weights import MissingWeightsError
from tests.conftest import tiny_vae, tiny_vae_config
from tests.test_loss import TinyPerceptual, _forward_with_seed

SDXL_MENU = dict(l1_weight=0.3, l2_weight=0.5, ssim_weight=0.5, lpips_weight=0.5)  # MS-LC-EQ-D-VR's SDXL run


def _images(seed=0, size=24):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 3, size, size, generator=generator) * 2 - 1
    x_hat = (x + 0.3 * torch.randn(x.shape, generator=generator)).clamp(-1, 1)
    return x, x_hat


def _reconstruction_terms(loss, x, x_hat):
    """The loss with the discriminator and KL out of the way: ``nll`` is ``sum(rec) / B``."""
    posterior = tiny_vae().encode(x).latent_dist
    return loss(x, x_hat, posterior, nn.Conv2d(1, 3, 1), None)


def test_default_weights_are_the_reference_rec_bit_for_bit():
    x, x_hat = _images()
    perceptual = TinyPerceptual()
    terms = _reconstruction_terms(VAEGANLoss(lpips=perceptual, disc_weight=0, kl_weight=0), x, x_hat)
    # LDM's contperceptual.py: rec = |x - x_hat| + perceptual_weight * p_loss; nll = sum(rec) / B.
    reference_rec = (x - x_hat).abs() + 1.0 * perceptual(x, x_hat)
    assert torch.equal(terms['nll'], (reference_rec / torch.exp(torch.zeros(())) + 0.0).sum() / 2)
    assert terms['l2'] == 0 and terms['ssim'] == 0 and set(terms) == set(LOSS_KEYS)


def test_l2_term_by_hand():
    x, x_hat = _images(1)
    terms = _reconstruction_terms(VAEGANLoss(lpips_weight=0, l1_weight=0, l2_weight=0.5, disc_weight=0), x, x_hat)
    squared = sum(float(a - b) ** 2 for a, b in zip(x.flatten().tolist(), x_hat.flatten().tolist()))
    assert terms['nll'].item() == pytest.approx(0.5 * squared / 2, rel=1e-5)
    assert terms['l2'].item() == pytest.approx(squared / x.numel(), rel=1e-5) and terms['l1'] == 0


def test_ssim_of_constant_images_by_hand():
    # Constant images: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1), C1 = (0.01 * data range 2)^2.
    a, b = 0.2, -0.4
    x, x_hat = torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)
    c1 = (0.01 * 2) ** 2
    expected = 1 - (2 * a * b + c1) / (a * a + b * b + c1)
    assert ssim_distance(x, x_hat).item() == pytest.approx(expected, rel=1e-5)
    terms = _reconstruction_terms(VAEGANLoss(lpips_weight=0, l1_weight=0, ssim_weight=2.0, disc_weight=0), x, x_hat)
    assert terms['nll'].item() == pytest.approx(2.0 * expected * 3 * 16 * 16, rel=1e-5)  # per image, per pixel


def test_ssim_matches_scikit_image_on_reflection_padded_images():
    # torchmetrics reflects the borders; scikit-image drops them. Padding by the window's radius (5) first
    # makes scikit-image's interior the whole image with the same neighbourhoods.
    x, x_hat = _images(2, size=20)
    expected = []
    for image, reconstruction in zip(x.numpy().astype(np.float64), x_hat.numpy().astype(np.float64)):
        pad = ((0, 0), (5, 5), (5, 5))
        expected.append(
            1
            - structural_similarity(
                np.pad(image, pad, mode='reflect'),
                np.pad(reconstruction, pad, mode='reflect'),
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                data_range=2.0,
                channel_axis=0,
            )
        )
    torch.testing.assert_close(ssim_distance(x, x_hat).flatten().double(), torch.tensor(expected), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('weights', [dict(l1_weight=0, l2_weight=1.0), dict(l1_weight=0, ssim_weight=1.0)])
def test_each_new_term_alone_reaches_the_decoder(weights):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    model = ComposerAutoencoderKL(tiny_vae(seed=1), VAEGANLoss(lpips_weight=0, disc_weight=0, kl_weight=0, **weights))
    losses = model.loss(model({'image': x}), {'image': x})
    losses['total'].backward()
    assert losses['total'] > 0 and model.vae.decoder.conv_out.weight.grad.abs().sum() > 0


def test_the_adaptive_weight_is_taken_on_the_whole_reconstruction_loss():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    loss = VAEGANLoss(lpips=TinyPerceptual(), disc_num_filters=8, **SDXL_MENU)
    model = ComposerAutoencoderKL(tiny_vae(seed=3), loss)
    model.global_step = 0
    # As the reference's calculate_adaptive_weight, with rec = the whole weighted menu.
    outputs = _forward_with_seed(model, x, seed=5)
    x_hat = outputs['reconstruction']
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    one_minus_ssim = 1 - ssim(x_hat, x, data_range=2.0, reduction='none').view(-1, 1, 1, 1)
    rec = 0.3 * (x - x_hat).abs() + 0.5 * (x - x_hat) ** 2 + 0.5 * one_minus_ssim + 0.5 * loss.lpips(x, x_hat)
    nll = rec.sum() / 2
    g = -loss.discriminator(x_hat).mean()
    last = model.vae.decoder.conv_out.weight
    nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g, last, retain_graph=True)[0]
    expected = (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4) * 0.5
    l1_only_grad = torch.autograd.grad(0.3 * (x - x_hat).abs().sum() / 2, last, retain_graph=True)[0]
    assert (l1_only_grad.norm() - nll_grad.norm()).abs() > 1e-2 * nll_grad.norm()  # the terms matter here

    losses = model.loss(outputs, {'image': x})
    assert losses['disc_weight'].item() == pytest.approx(expected.item(), rel=1e-4)
    assert losses['nll'].item() == pytest.approx(nll.item(), rel=1e-5)
    for name, value in (('l1', (x - x_hat).abs().mean()), ('l2', ((x - x_hat) ** 2).mean())):
        assert losses[name].item() == pytest.approx(value.item(), rel=1e-5)
    assert losses['ssim'].item() == pytest.approx(one_minus_ssim.mean().item(), rel=1e-5)


def test_negative_or_all_zero_weights_are_refused():
    with pytest.raises(ValueError, match='l2_weight'):
        VAEGANLoss(lpips_weight=0, l2_weight=-1)
    with pytest.raises(ValueError, match='nothing to reconstruct'):
        VAEGANLoss(lpips_weight=0, l1_weight=0)


def _squeezenet_file(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / 'squeezenet1_1-b8a52dc0.pth'
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)
    return path


def test_a_squeezenet_lpips_loads_its_trunk_from_the_file_and_the_packages_heads(tmp_path):
    import lpips

    path = _squeezenet_file(tmp_path)
    net = load_lpips_net('squeeze', path)
    state = torch.load(path, weights_only=True)
    torch.testing.assert_close(getattr(net.net.slice1, '0').weight, state['features.0.weight'], rtol=0, atol=0)
    torch.testing.assert_close(
        getattr(net.net.slice7, '12').expand3x3.bias, state['features.12.expand3x3.bias'], rtol=0, atol=0
    )
    heads = torch.load(f'{lpips.__path__[0]}/weights/v0.1/squeeze.pth', map_location='cpu', weights_only=True)
    torch.testing.assert_close(net.lin0.model[1].weight, heads['lin0.model.1.weight'], rtol=0, atol=0)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x, x_hat = _images(3, size=32)
    assert net(x, x_hat).shape == (2, 1, 1, 1) and net(x, x).abs().max() < 1e-6


def test_the_config_picks_the_perceptual_network_and_fails_fast_without_its_file(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))  # an empty hub cache
    monkeypatch.delenv('EQVAE_ALLOW_DOWNLOAD', raising=False)
    vae = VAEConfig(config=tiny_vae_config())
    with pytest.raises(MissingWeightsError, match='squeezenet1_1-b8a52dc0.pth'):
        build_model(ModelConfig(vae=vae, loss=LossConfig(lpips_net='squeeze', disc_weight=0)))
    loss = LossConfig(lpips_net='squeeze', lpips_net_weights=str(_squeezenet_file(tmp_path)), **SDXL_MENU)
    model = build_model(ModelConfig(vae=vae, loss=loss))
    assert type(model.loss_fn.lpips.net).__name__ == 'squeezenet'
    assert (model.loss_fn.l1_weight, model.loss_fn.l2_weight, model.loss_fn.ssim_weight) == (0.3, 0.5, 0.5)
    with pytest.raises(MissingWeightsError, match='vgg16-397923af.pth'):  # the LPIPS metric stays VGG
        build_model(ModelConfig(vae=vae, loss=loss, eval_metrics=['LPIPS']))


@pytest.mark.parametrize(
    ('setting', 'message'),
    [
        (dict(l2_weight=-0.5), 'model.loss.l2_weight must be non-negative'),
        (dict(ssim_weight=-1.0), 'model.loss.ssim_weight must be non-negative'),
        (dict(l1_weight=0, lpips_weight=0), 'set at least one above 0'),
        (dict(lpips_net='resnet'), "model.loss.lpips_net must be one of \\['alex', 'squeeze', 'vgg'\\]"),
        (dict(lpips_net_weights='alexnet.pth'), 'give VGG16 weights as model.loss.lpips_vgg_weights'),
    ],
)
def test_loss_menu_config_keys_are_checked(setting, message):
    with pytest.raises(ConfigError, match=message):
        build_model(ModelConfig(vae=VAEConfig(config=tiny_vae_config()), loss=LossConfig(**setting)))
