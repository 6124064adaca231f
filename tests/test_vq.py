"""VQGAN: the one-pass loss against taming's two-pass computation, the quantizer's loss, codebook metrics, the model."""

import math

import pytest
import torch

from eqvae_composer import ComposerVQModel, VQGANLoss
from eqvae_composer.algorithms.equivariance import Branch, apply_to_image, apply_to_latent
from eqvae_composer.data.dataset import PADDING_KEY
from eqvae_composer.evaluation import CodebookPerplexity, DeadCodeFraction
from eqvae_composer.models import VQ_LOSS_KEYS
from tests.conftest import tiny_vae, tiny_vq
from tests.test_algorithm import _attached, _run_microbatch
from tests.test_loss import TinyPerceptual, reference_updates


def _model(disc_factor=1.0, codebook_weight=1.0):
    loss = VQGANLoss(
        lpips=TinyPerceptual(),
        disc_num_filters=8,
        disc_weight=0.8,
        disc_factor=disc_factor,
        codebook_weight=codebook_weight,
    )
    return ComposerVQModel(tiny_vq(seed=3), loss)


def _taming_two_pass(model, x):
    """taming's VQLPIPSWithDiscriminator under Lightning: optimizer_idx 0 then 1, a forward each."""
    vae, loss, disc = model.vae, model.loss_fn, model.loss_fn.discriminator

    def forward():  # taming's VQModel.forward: encode (with quantization), decode
        decoded = vae.decode(vae.encode(x).latents)
        return decoded.sample, decoded.commit_loss

    # optimizer_idx == 0: autoencoder step (vqperceptual.py: nll is the mean over every pixel)
    x_hat, qloss = forward()
    nll = torch.mean((x - x_hat).abs() + loss.lpips_weight * loss.lpips(x, x_hat))
    g = -torch.mean(disc(x_hat))
    last = vae.decoder.conv_out.weight
    nll_grads = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g, last, retain_graph=True)[0]
    d_weight = torch.clamp(nll_grads.norm() / (g_grads.norm() + 1e-4), 0.0, 1e4).detach() * loss.disc_weight
    ae_loss = nll + d_weight * loss.disc_factor * g + loss.codebook_weight * qloss.mean()
    # optimizer_idx == 1: discriminator step (the same hinge loss), a second full forward
    grads, d_loss = reference_updates(model, ae_loss, x, lambda: forward()[0])
    return grads, (ae_loss.item(), d_loss.item()), d_weight.item()


@pytest.mark.parametrize('codebook_weight', [1.0, 0.3])
def test_gradients_equal_tamings_two_pass_computation(codebook_weight):
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    model = _model(codebook_weight=codebook_weight)
    expected, (ae_loss, d_loss), expected_weight = _taming_two_pass(model, x)
    model.zero_grad()
    losses = model.loss(model({'image': x}), {'image': x})
    losses['total'].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert set(grads) == set(expected)
    assert expected['autoencoder.vae.quantize.embedding.weight'].abs().sum() > 0  # the codebook is trained
    for name, grad in expected.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=max(1e-4 * scale, 2e-5), msg=name)
    assert losses['total'].item() == pytest.approx(ae_loss, rel=1e-5)
    assert losses['disc'].item() == pytest.approx(d_loss, rel=1e-5) and d_loss > 0
    assert losses['disc_weight'].item() == pytest.approx(expected_weight, rel=1e-4) and expected_weight > 0


def test_quantizer_loss_is_tamings_legacy_codebook_and_commitment_terms():
    # diffusers' VectorQuantizer (legacy=True), as taming's VectorQuantizer2: mean((sg(z_q) - z)^2) trains the
    # encoder, beta = 0.25 times mean((z_q - sg(z))^2) the codebook.
    vae = tiny_vq(seed=1)
    z = vae.encode(torch.rand(2, 3, 32, 32) * 2 - 1).latents.detach().requires_grad_(True)
    codebook = vae.quantize.embedding.weight
    decoded = vae.decode(z)
    z_q = codebook[torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 4), codebook).argmin(1)]
    mse = (z_q - z.permute(0, 2, 3, 1).reshape(-1, 4)).pow(2).mean()
    assert decoded.commit_loss.item() == pytest.approx(1.25 * mse.item(), rel=1e-5)
    grad_z, grad_codebook = torch.autograd.grad(decoded.commit_loss, [z, codebook])
    expected_z, expected_codebook = torch.autograd.grad(mse, [z, codebook])
    torch.testing.assert_close(grad_z, expected_z)
    torch.testing.assert_close(grad_codebook, 0.25 * expected_codebook)


def test_loss_keys_are_the_same_in_every_configuration():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for kwargs in (dict(disc_weight=0), dict(disc_start=10), {}):
        model = ComposerVQModel(tiny_vq(), VQGANLoss(lpips_weight=0, disc_num_filters=8, **kwargs))
        model.global_step = 0
        assert set(model.loss(model({'image': x}), {'image': x})) == set(VQ_LOSS_KEYS)


def test_loss_by_hand_without_the_discriminator():
    # total = mean|x - x_hat| + codebook_weight * codebook loss (taming's nll is a mean, not LDM's sum per sample).
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    model = ComposerVQModel(tiny_vq(), VQGANLoss(lpips_weight=0, disc_weight=0, codebook_weight=0.5))
    outputs = model({'image': x})
    losses = model.loss(outputs, {'image': x})
    expected = (x - outputs['reconstruction']).abs().mean() + 0.5 * outputs['codebook_loss']
    torch.testing.assert_close(losses['total'], expected)
    assert losses['codebook'] == outputs['codebook_loss'].detach()


def test_discriminator_phase_trains_only_the_discriminator():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    model = _model()
    with model.gan_phase('discriminator'):
        losses = model.loss(model({'image': x}), {'image': x})
    losses['total'].backward()
    disc_ids = {id(p) for p in model.loss_fn.discriminator.parameters()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in disc_ids)
    assert all(p.grad is not None for p in model.loss_fn.discriminator.parameters())


def test_composer_vq_model_refuses_a_kl_autoencoder():
    with pytest.raises(TypeError, match='needs a diffusers VQModel, got AutoencoderKL'):
        ComposerVQModel(tiny_vae())


def test_equivariance_transforms_the_latent_before_quantization():
    model = ComposerVQModel(tiny_vq(), VQGANLoss(lpips_weight=0, disc_num_filters=8, disc_num_layers=2))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    algo, state, logger = _attached(model, x, p_equivariance=1.0)
    quantizer_inputs, post_quant_inputs = [], []
    model.vae.quantize.register_forward_pre_hook(lambda m, a: quantizer_inputs.append(a[0].detach()))
    model.vae.post_quant_conv.register_forward_pre_hook(lambda m, a: post_quant_inputs.append(a[0].detach()))
    seen = _run_microbatch(algo, state, logger)

    tau = algo.transform
    assert algo.branch == Branch.EQUIVARIANCE
    with torch.no_grad():
        z_e = model.vae.encode(x).latents
    # The quantizer gets tau(z_e); the decoder the codes of tau(z_e), i.e. codebook vectors only.
    torch.testing.assert_close(quantizer_inputs[0], apply_to_latent(z_e, tau))
    codebook = model.vae.quantize.embedding.weight.detach()
    vectors = post_quant_inputs[0].permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
    torch.testing.assert_close(vectors, codebook[torch.cdist(vectors, codebook).argmin(1)])
    assert state.outputs['codes'].numel() == quantizer_inputs[0][:, 0].numel()
    torch.testing.assert_close(seen, apply_to_image(x, tau, 8))
    assert state.outputs['reconstruction'].shape == seen.shape and state.batch['image'] is x


def test_codebook_metrics_by_hand():
    codes = torch.tensor([[0, 0], [1, 3]])
    perplexity, dead = CodebookPerplexity(4), DeadCodeFraction(4)
    perplexity.update(codes[:1])  # two updates: the histogram accumulates
    perplexity.update(codes[1:])
    dead.update(codes)
    # p = (1/2, 1/4, 0, 1/4): entropy 1.5 log 2, perplexity 2 ** 1.5.
    assert perplexity.compute().item() == pytest.approx(2**1.5, rel=1e-6)
    assert dead.compute().item() == 0.25
    uniform = CodebookPerplexity(4)
    uniform.update(torch.arange(4))
    assert uniform.compute().item() == pytest.approx(4.0)
    with pytest.raises(ValueError, match=r'code indices must be in \[0, 4\)'):
        dead.update(torch.tensor([4]))


def test_eval_metrics_of_the_vq_model():
    model = ComposerVQModel(tiny_vq(), VQGANLoss(lpips_weight=0, disc_weight=0)).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    metrics = model.get_metrics(is_train=False)
    assert set(metrics) == {
        'PSNR',
        'SSIM',
        'EquivarianceErrorR',
        'EquivarianceErrorS',
        'CodebookPerplexity',
        'DeadCodeFraction',
    }
    with torch.no_grad():
        outputs = model.eval_forward({'image': x})
    for metric in metrics.values():
        model.update_metric({'image': x}, outputs, metric)
    values = {name: metric.compute().item() for name, metric in metrics.items()}
    assert all(math.isfinite(v) for v in values.values())
    used = outputs['codes'].unique().numel()
    assert values['DeadCodeFraction'] == pytest.approx(1 - used / 32)
    assert 1 <= values['CodebookPerplexity'] <= used
    assert outputs['equivariance']['rotation'].shape == (3, 2)  # three rotations, two images


def test_eval_metrics_count_streaming_padding_once():
    # StreamingDataset pads a rank's last eval batch with repeats (PADDING_KEY): they must not count again.
    model = ComposerVQModel(tiny_vq(), VQGANLoss(lpips_weight=0, disc_weight=0)).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    padded = {'image': x, PADDING_KEY: torch.tensor([False, False, True])}
    alone = {'image': x[:2]}
    with torch.no_grad():
        outputs_padded, outputs_alone = model.eval_forward(padded), model.eval_forward(alone)
    for name, metric in model.get_metrics(is_train=False).items():
        expected = model.get_metrics(is_train=False)[name]
        model.update_metric(padded, outputs_padded, metric)
        model.update_metric(alone, outputs_alone, expected)
        torch.testing.assert_close(metric.compute(), expected.compute(), msg=name)
    nothing = model.get_metrics(is_train=False)['CodebookPerplexity']
    model.update_metric({'image': x, PADDING_KEY: torch.ones(3, dtype=torch.bool)}, outputs_padded, nothing)
    assert nothing.counts.sum() == 0
