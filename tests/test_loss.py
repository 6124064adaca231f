"""The one-pass loss against a two-pass computation written the way the reference (LDM) does it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eqvae_composer.models import LOSS_KEYS, ComposerAutoencoderKL, PatchGANDiscriminator, VAEGANLoss
from tests.conftest import tiny_vae


class TinyPerceptual(nn.Module):
    """A differentiable stand-in for LPIPS: (B, 1, 1, 1) distances of conv features."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(123)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.requires_grad_(False)

    def forward(self, x, y):
        return (self.conv(x) - self.conv(y)).pow(2).mean(dim=(1, 2, 3), keepdim=True)


def _model(learn_logvar=False, disc_factor=1.0, lpips_weight=1.0):
    loss = VAEGANLoss(
        lpips=TinyPerceptual(),
        lpips_weight=lpips_weight,
        disc_num_filters=8,
        learn_logvar=learn_logvar,
        logvar_init=0.3 if learn_logvar else 0.0,
        disc_factor=disc_factor,
    )
    return ComposerAutoencoderKL(tiny_vae(seed=3), loss)


def _reference_two_pass(model, x, seed):
    """LDM's LPIPSWithDiscriminator under Lightning: optimizer_idx 0 then 1, a forward each."""
    vae, loss, disc = model.vae, model.loss_fn, model.loss_fn.discriminator

    def forward():
        posterior = vae.encode(x).latent_dist
        torch.manual_seed(seed)
        return posterior, vae.decode(posterior.sample()).sample

    # optimizer_idx == 0: autoencoder step
    posterior, x_hat = forward()
    rec = (x - x_hat).abs() + loss.lpips_weight * loss.lpips(x, x_hat)
    nll = rec / torch.exp(loss.logvar) + loss.logvar
    nll = nll.sum() / nll.shape[0]
    kl = posterior.kl().sum() / x.shape[0]
    g = -disc(x_hat).mean()
    last = vae.decoder.conv_out.weight
    nll_grads = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g, last, retain_graph=True)[0]
    d_weight = torch.clamp(nll_grads.norm() / (g_grads.norm() + 1e-4), 0.0, 1e4).detach() * loss.disc_weight
    ae_loss = nll + loss.kl_weight * kl + d_weight * loss.disc_factor * g
    # optimizer_idx == 1: discriminator step, a second full forward
    grads, d_loss = reference_updates(model, ae_loss, x, lambda: forward()[1])
    return grads, (ae_loss.item(), d_loss.item()), d_weight.item()


def reference_updates(model, ae_loss, x, reconstruct):
    """The gradients of the reference's two optimizers: ``ae_loss`` for the autoencoder, then the hinge loss
    on a second forward (``reconstruct()``) for the discriminator. Returns ``(grads by name, hinge loss)``."""
    disc = model.loss_fn.discriminator
    model.zero_grad()
    ae_loss.backward()
    disc_ids = {id(p) for p in disc.parameters()}
    ae_grads = {n: p.grad.clone() for n, p in model.named_parameters() if id(p) not in disc_ids}
    logits_real, logits_fake = disc(x.detach()), disc(reconstruct().detach())
    d_loss = model.loss_fn.disc_factor * 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
    model.zero_grad()
    d_loss.backward()
    d_grads = {n: p.grad.clone() for n, p in model.named_parameters() if id(p) in disc_ids}
    return {**ae_grads, **d_grads}, d_loss


def _ours(model, x, seed):
    model.zero_grad()
    outputs = _forward_with_seed(model, x, seed)
    losses = model.loss(outputs, {'image': x})
    losses['total'].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, losses


def _forward_with_seed(model, x, seed):
    """The model's forward, with the RNG seeded right before the posterior sample (as the reference's)."""
    vae = model.vae
    original = vae.encode

    def encode_then_seed(*args, **kwargs):
        out = original(*args, **kwargs)
        torch.manual_seed(seed)
        return out

    vae.encode = encode_then_seed
    try:
        return model({'image': x})
    finally:
        del vae.encode


@pytest.mark.parametrize('learn_logvar', [False, True])
def test_gradients_equal_the_two_pass_reference(learn_logvar):
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    model = _model(learn_logvar=learn_logvar)
    expected, (ae_loss, d_loss), expected_weight = _reference_two_pass(model, x, seed=7)
    grads, losses = _ours(model, x, seed=7)
    assert set(grads) == set(expected)
    for name, grad in expected.items():
        # Summation order differs between the two computations: compare relative to the tensor's scale
        # (with a floor for attention key biases, whose true gradient is exactly zero: softmax ignores them).
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=max(1e-4 * scale, 2e-5), msg=name)
    # The logged total is the autoencoder's loss, as the reference's train/total_loss; 'disc' is D's.
    assert losses['total'].item() == pytest.approx(ae_loss, rel=1e-5)
    assert losses['disc'].item() == pytest.approx(d_loss, rel=1e-5) and d_loss > 0
    assert losses['disc_weight'].item() == pytest.approx(expected_weight, rel=1e-4)
    assert 0 < expected_weight  # the adaptive weight is live, so the comparison means something


def test_discriminator_gets_only_its_own_gradient_and_logged_terms_hold_no_graph():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    model = _model()
    disc = model.loss_fn.discriminator
    outputs = model({'image': x})
    losses = model.loss(outputs, {'image': x})
    # The discriminator's gradient equals that of its hinge loss alone, computed here on its own.
    d_grads = torch.autograd.grad(losses['total'], list(disc.parameters()), retain_graph=True)
    logits_real, logits_fake = disc(x), disc(outputs['reconstruction'].detach())
    hinge = 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
    for a, b in zip(d_grads, torch.autograd.grad(hinge, list(disc.parameters()))):
        torch.testing.assert_close(a, b)
    # Logged terms are values only: a trainer holding the dict until the next step keeps no graph alive.
    assert losses['total'].requires_grad
    assert not any(value.requires_grad for name, value in losses.items() if name != 'total')


def test_disc_start_switches_gan_terms_off_before_it():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    model = ComposerAutoencoderKL(tiny_vae(), VAEGANLoss(lpips_weight=0, disc_start=5, disc_num_filters=8))
    model.global_step = 4
    outputs = model({'image': x})
    early = model.loss(outputs, {'image': x})
    assert early['disc_factor'] == 0 and early['disc'] == 0 and early['disc_weight'] == 0
    torch.testing.assert_close(early['total'], early['nll'] + 1e-6 * early['kl'])
    model.global_step = 5
    late = model.loss(model({'image': x}), {'image': x})
    assert late['disc_factor'] == 1 and late['disc_weight'] > 0


def test_disc_start_without_a_step_source_is_an_error_not_step_zero_forever():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    model = ComposerAutoencoderKL(tiny_vae(), VAEGANLoss(lpips_weight=0, disc_start=5, disc_num_filters=8))
    with pytest.raises(RuntimeError, match='GlobalStepCallback'):
        model.loss(model({'image': x}), {'image': x})
    model.eval()  # evaluation needs no step
    model.loss(model({'image': x}), {'image': x})


def test_disc_start_follows_the_trainer_with_global_step_callback():
    from composer import Trainer
    from composer.loggers import InMemoryLogger
    from torch.utils.data import DataLoader

    from eqvae_composer.callbacks import GlobalStepCallback

    model = ComposerAutoencoderKL(
        tiny_vae(), VAEGANLoss(lpips_weight=0, disc_start=2, disc_num_filters=8, disc_num_layers=1)
    )
    logger = InMemoryLogger()
    images = [{'image': torch.rand(3, 32, 32) * 2 - 1} for _ in range(8)]
    Trainer(
        model=model,
        train_dataloader=DataLoader(images, batch_size=2),
        max_duration='4ba',
        optimizers=torch.optim.Adam(model.param_groups(lr=1e-4)),
        callbacks=[GlobalStepCallback()],
        loggers=[logger],
        device='cpu',
        progress_bar=False,
        log_to_console=False,
    ).fit()
    factors = [float(v) for _, v in logger.data['loss/train/disc_factor']]
    assert factors == [0.0, 0.0, 1.0, 1.0]


def test_loss_keys_are_the_same_in_every_configuration():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    configs = [dict(lpips_weight=0, disc_weight=0), dict(lpips_weight=0, disc_start=10), dict(lpips_weight=0)]
    for kwargs in configs:
        model = ComposerAutoencoderKL(tiny_vae(), VAEGANLoss(disc_num_filters=8, **kwargs))
        model.global_step = 0
        assert set(model.loss(model({'image': x}), {'image': x})) == set(LOSS_KEYS)


def test_nll_kl_normalisation_by_hand():
    # With D off and lpips off: total = sum|x - x_hat| / B + 1e-6 * sum KL / B.
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    model = ComposerAutoencoderKL(tiny_vae(), VAEGANLoss(lpips_weight=0, disc_weight=0))
    outputs = model({'image': x})
    losses = model.loss(outputs, {'image': x})
    post = outputs['posterior']
    kl = 0.5 * (post.mean**2 + post.var - 1 - post.logvar).sum() / 2
    expected = (x - outputs['reconstruction']).abs().sum() / 2 + 1e-6 * kl
    torch.testing.assert_close(losses['total'], expected)


def test_lpips_weight_needs_a_network():
    with pytest.raises(ValueError, match='LPIPS'):
        VAEGANLoss(lpips_weight=1.0)


def test_lpips_is_not_part_of_model_state():
    model = _model()
    assert not any(k.startswith('loss_fn.lpips') for k in model.state_dict())
    assert not any('conv' in k and 'loss_fn' in k and 'discriminator' not in k for k in model.state_dict())


@pytest.mark.parametrize('layers', [1, 2, 3])
def test_discriminator_minimum_size_is_exact(layers):
    disc = PatchGANDiscriminator(num_filters=4, num_layers=layers)
    assert disc(torch.zeros(1, 3, disc.min_input_size, disc.min_input_size)).shape[-1] == 1
    with pytest.raises(ValueError, match=f'at least {disc.min_input_size} px'):
        disc(torch.zeros(1, 3, disc.min_input_size - 1, disc.min_input_size - 1))


def test_param_groups_separate_autoencoder_and_discriminator():
    model = _model()
    groups = model.param_groups(lr=1e-4, betas=(0.5, 0.9), disc_lr=3e-4, disc_betas=(0.0, 0.99))
    ae, disc = groups
    assert (ae['lr'], ae['betas']) == (1e-4, (0.5, 0.9)) and (disc['lr'], disc['betas']) == (3e-4, (0.0, 0.99))
    disc_ids = {id(p) for p in model.loss_fn.discriminator.parameters()}
    assert {id(p) for p in disc['params']} == disc_ids
    assert not disc_ids & {id(p) for p in ae['params']}
    assert len(ae['params']) + len(disc['params']) == len([p for p in model.parameters() if p.requires_grad])


def test_losses_are_fp32_under_bf16_autocast():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    model = _model()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outputs = model({'image': x})
        assert outputs['reconstruction'].dtype == torch.bfloat16  # the networks do run in bf16
        losses = model.loss(outputs, {'image': x})
    assert all(v.dtype == torch.float32 for v in losses.values())
    losses['total'].backward()
    assert torch.isfinite(model.vae.decoder.conv_out.weight.grad).all()


def test_gradient_checkpointing_recomputes_blocks_and_keeps_gradients_and_adaptive_weight():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    plain = _model()
    expected, (ae_loss, _), expected_weight = _reference_two_pass(plain, x, seed=5)
    model = _model()
    model = ComposerAutoencoderKL(model.vae, model.loss_fn, gradient_checkpointing=True)
    block = model.vae.decoder.up_blocks[0]
    block_calls, block_forward = [], block.forward
    block.forward = lambda *args, **kwargs: block_calls.append(1) or block_forward(*args, **kwargs)
    grads, losses = _ours(model, x, seed=5)
    assert len(block_calls) == 2  # the forward, and its recomputation during the backward
    for name, grad in expected.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(grads[name], grad, rtol=1e-3, atol=max(1e-4 * scale, 2e-5), msg=name)
    assert losses['total'].item() == pytest.approx(ae_loss, rel=1e-5)
    assert losses['disc_weight'].item() == pytest.approx(expected_weight, rel=1e-4) and expected_weight > 0


def test_autoencoder_phase_is_the_reference_first_pass_and_leaves_the_discriminator_alone():
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    model = _model()
    expected, (ae_loss, _), expected_weight = _reference_two_pass(model, x, seed=7)
    model.zero_grad()
    with model.gan_phase('autoencoder'):
        outputs = _forward_with_seed(model, x, seed=7)
        losses = model.loss(outputs, {'image': x})
    losses['total'].backward()
    disc_ids = {id(p) for p in model.loss_fn.discriminator.parameters()}
    for name, param in model.named_parameters():
        if id(param) in disc_ids:
            assert param.grad is None, name
        else:
            scale = expected[name].abs().max().item()
            torch.testing.assert_close(param.grad, expected[name], rtol=1e-3, atol=max(1e-4 * scale, 2e-5), msg=name)
    assert losses['total'].item() == pytest.approx(ae_loss, rel=1e-5)
    assert losses['disc_weight'].item() == pytest.approx(expected_weight, rel=1e-4) and expected_weight > 0
    assert losses['disc'] == 0 and losses['logits_real'] == 0 and set(losses) == set(LOSS_KEYS)


def test_discriminator_phase_trains_only_the_discriminator_on_a_reconstruction_without_graph():
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    model = _model()
    lpips_calls = []
    model.loss_fn.lpips.register_forward_hook(lambda *args: lpips_calls.append(1))
    with model.gan_phase('discriminator'):
        outputs = _forward_with_seed(model, x, seed=11)
        losses = model.loss(outputs, {'image': x})
    assert not outputs['reconstruction'].requires_grad  # no autoencoder graph is built
    losses['total'].backward()
    disc = model.loss_fn.discriminator
    disc_ids = {id(p) for p in disc.parameters()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in disc_ids)
    # The hinge loss, by hand, on the same reconstruction (the posterior noise seeded alike).
    with torch.no_grad():
        x_hat = _forward_with_seed(model, x, seed=11)['reconstruction']
    hinge = 0.5 * (F.relu(1 - disc(x)).mean() + F.relu(1 + disc(x_hat)).mean())
    for param, grad in zip(disc.parameters(), torch.autograd.grad(hinge, list(disc.parameters()))):
        torch.testing.assert_close(param.grad, grad)
    assert losses['disc'].item() == pytest.approx(hinge.item(), rel=1e-6)
    assert losses['total'].item() == 0  # the logged total is the autoencoder's loss, logged in its own pass
    assert all(losses[k] == 0 for k in ('nll', 'rec', 'l1', 'lpips', 'kl', 'g', 'disc_weight'))
    assert not lpips_calls  # LPIPS is not run for the discriminator's pass


def test_gan_phase_is_checked_and_restored():
    model = _model()
    with pytest.raises(ValueError, match='phase must be one of'):
        with model.gan_phase('generator'):
            pass
    with pytest.raises(RuntimeError), model.gan_phase('discriminator'):
        raise RuntimeError
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model({'image': x})['reconstruction'].requires_grad  # back to the joint pass


def test_always_train_discriminator_trains_it_at_zero_weight_without_touching_the_autoencoder():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    kwargs = dict(lpips_weight=0, disc_weight=0, disc_num_filters=8)
    without = ComposerAutoencoderKL(tiny_vae(seed=4), VAEGANLoss(**kwargs), sample_posterior=False)
    model = ComposerAutoencoderKL(
        tiny_vae(seed=4), VAEGANLoss(always_train_discriminator=True, **kwargs), sample_posterior=False
    )
    assert without.loss_fn.discriminator is None
    disc = model.loss_fn.discriminator
    assert disc is not None and len(model.param_groups(lr=1e-4)) == 2  # the reference's opt_disc
    losses = model.loss(model({'image': x}), {'image': x})
    losses['total'].backward()
    reference = without.loss(without({'image': x}), {'image': x})
    reference['total'].backward()
    # The autoencoder's gradient is that of nll + KL alone (generator weight 0), as without a discriminator.
    for (name, a), b in zip(model.vae.named_parameters(), without.vae.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    # The discriminator still learns from its hinge loss.
    with torch.no_grad():
        x_hat = model({'image': x})['reconstruction']
    hinge = 0.5 * (F.relu(1 - disc(x)).mean() + F.relu(1 + disc(x_hat)).mean())
    for param, grad in zip(disc.parameters(), torch.autograd.grad(hinge, list(disc.parameters()))):
        torch.testing.assert_close(param.grad, grad)
    assert losses['disc_weight'] == 0 and losses['disc'] > 0
    assert losses['total'].item() == pytest.approx(reference['total'].item(), rel=1e-6)


def _vgg_lpips():
    """The package's LPIPS-VGG (its calibrated linear layers, with dropout) on a random VGG trunk: no download."""
    import lpips

    torch.manual_seed(0)
    return lpips.LPIPS(net='vgg', pretrained=True, pnet_rand=True, verbose=False).eval().requires_grad_(False)


def test_lpips_dropout_trains_like_the_reference_module_in_train_mode_and_evaluates_without_it():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    x_hat = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    net = _vgg_lpips()
    loss = VAEGANLoss(lpips=net, lpips_dropout=True, disc_weight=0, kl_weight=0)
    posterior = tiny_vae().encode(x).latent_dist
    conv = nn.Conv2d(1, 3, 1)

    def lpips_term(seed):
        torch.manual_seed(seed)
        return loss(x, x_hat, posterior, conv, None)['lpips'].item()

    # The reference: taming's LPIPS module, put in train mode by Lightning's model.train().
    reference_net = _vgg_lpips().train()
    torch.manual_seed(1)
    reference = reference_net(x, x_hat).mean().item()
    torch.manual_seed(0)
    without_dropout = net(x, x_hat).mean().item()
    assert lpips_term(1) == pytest.approx(reference, rel=1e-6)
    assert lpips_term(2) != pytest.approx(lpips_term(1), rel=1e-3)  # the dropout masks are live
    assert not any(m.training for m in net.modules())  # the shared network is left in eval mode
    loss.eval()
    assert lpips_term(1) == pytest.approx(without_dropout, rel=1e-6) == lpips_term(2)  # evaluation: no dropout
    off = VAEGANLoss(lpips=net, disc_weight=0, kl_weight=0)  # the default: eval-mode LPIPS while training
    assert off(x, x_hat, posterior, conv, None)['lpips'].item() == pytest.approx(without_dropout, rel=1e-6)


def test_lpips_dropout_needs_a_network_with_dropout():
    with pytest.raises(ValueError, match='lpips_dropout needs'):
        VAEGANLoss(lpips_weight=0, lpips_dropout=True)
    with pytest.raises(ValueError, match='no Dropout layer'):
        VAEGANLoss(lpips=TinyPerceptual(), lpips_dropout=True)


@pytest.mark.parametrize('left_behind', ['empty', 'flat'])
def test_adaptive_weight_never_reads_the_last_layers_weight(left_behind):
    # Outside the wrapped forward, FSDP1 (use_orig_params) leaves the decoder's last-layer weight as a 1-D
    # view of the rank's shard, or an empty tensor on a rank that holds none of it; the loss runs there.
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    model = _model()
    _, _, expected_weight = _reference_two_pass(model, x, seed=4)
    outputs = _forward_with_seed(model, x, seed=4)
    conv = model.vae.decoder.conv_out
    shard = conv.weight.detach().flatten().clone() if left_behind == 'flat' else torch.empty(0)
    conv.weight = nn.Parameter(shard)
    losses = model.loss(outputs, {'image': x})
    assert losses['disc_weight'].item() == pytest.approx(expected_weight, rel=1e-4) and expected_weight > 0


def test_adaptive_weight_of_a_grouped_strided_conv_matches_autograd():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, kernel_size=(3, 1), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2)
    h = torch.randn(2, 4, 9, 8)
    out = conv(h)
    grad_nll, grad_g = torch.randn_like(out), torch.randn_like(out)
    (w_nll,) = torch.autograd.grad(out, conv.weight, grad_nll, retain_graph=True)
    (w_g,) = torch.autograd.grad(out, conv.weight, grad_g)
    expected = 0.5 * (w_nll.norm() / (w_g.norm() + 1e-4))
    loss = VAEGANLoss(lpips_weight=0, disc_weight=0.5)
    conv.weight = nn.Parameter(torch.empty(0))  # the computation needs only the layer's hyperparameters
    assert loss._adaptive_weight(grad_nll, grad_g, conv, h).item() == pytest.approx(expected.item(), rel=1e-5)
