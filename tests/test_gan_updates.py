"""Alternating GAN updates through a composer Trainer against a two-optimizer, Lightning-style loop.

The loop below is written the way the reference runs (zelaki/eqvae ``AutoencoderKL.training_step``
under Lightning 1.4): per batch, ``optimizer_idx`` 0 then 1, each with its own branch, transform and
posterior noise and its own forward; the autoencoder's Adam steps before the discriminator's pass,
whose forward therefore sees the updated autoencoder.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from composer import Trainer
from composer.algorithms import SAM
from composer.core import Algorithm, Callback, Event
from torch.utils.data import DataLoader

from eqvae_composer import ComposerAutoencoderKL, EquivarianceAlgorithm, VAEGANLoss
from eqvae_composer.algorithms.equivariance import Branch
from eqvae_composer.models import AlternatingAdam
from tests.conftest import tiny_vae
from tests.test_loss import TinyPerceptual

STEPS, BATCH, SIZE, SEED, LR = 3, 2, 64, 3, 1e-3
SCALES = [0.5, 0.75]  # grid scales whose latent and image sizes stay aligned at 64 px, as at 256 px


def _noise_seed(batch: int, forward: int) -> int:
    return 1000 * batch + forward


class SeedEachForward(Algorithm):
    """Seeds torch's RNG before each forward, so the posterior noise of every pass can be reproduced."""

    def __init__(self):
        self.forwards = 0

    def match(self, event, state):
        return event in (Event.BATCH_START, Event.BEFORE_FORWARD)

    def apply(self, event, state, logger):
        if event == Event.BATCH_START:
            self.forwards = 0
        else:
            torch.manual_seed(_noise_seed(int(state.timestamp.batch), self.forwards))
            self.forwards += 1


def _images():
    return torch.rand(STEPS * BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _model():
    loss = VAEGANLoss(lpips=TinyPerceptual(), disc_num_filters=8, disc_num_layers=2)
    return ComposerAutoencoderKL(tiny_vae(seed=2), loss)


def _reference_forward(vae, x, branch, tau):
    """``AutoencoderKL.training_step``'s branches (reference L119-153) and ``forward`` (L96-107)."""
    if branch == Branch.LOW_RES:
        x = F.interpolate(x, scale_factor=tau.scale_h, mode='bilinear', align_corners=False)
    posterior = vae.encode(x).latent_dist
    z = posterior.sample()
    if branch == Branch.EQUIVARIANCE:
        z = F.interpolate(z, scale_factor=tau.scale_h, mode='bilinear', align_corners=False)
        z = torch.rot90(z, k=tau.quarter_turns, dims=[-1, -2])
        x = F.interpolate(x, scale_factor=tau.scale_h, mode='bilinear', align_corners=False)
        x = torch.rot90(x, k=tau.quarter_turns, dims=[-1, -2])
    return x, vae.decode(z).sample, posterior


def _toggle(trained, frozen):
    for p in trained.parameters():
        p.requires_grad_(True)
    for p in frozen.parameters():
        p.requires_grad_(False)


def _lightning_style(vae, loss, images, draw):
    """Two Adam optimizers, two passes per batch; returns the logged values of the last batch."""
    disc, perceptual = loss.discriminator, loss.lpips
    opt_ae = torch.optim.Adam(vae.parameters(), lr=LR, betas=(0.5, 0.9))
    opt_disc = torch.optim.Adam(disc.parameters(), lr=LR, betas=(0.5, 0.9))
    logged = {}
    for step in range(STEPS):
        x = images[step * BATCH : (step + 1) * BATCH]
        for optimizer_idx in (0, 1):
            branch, tau = draw(step, optimizer_idx)
            logged.setdefault('branches', []).append(branch)
            torch.manual_seed(_noise_seed(step, optimizer_idx))
            if optimizer_idx == 0:
                _toggle(vae, disc)
                inputs, x_hat, posterior = _reference_forward(vae, x, branch, tau)
                rec = (inputs - x_hat).abs() + perceptual(inputs, x_hat)
                nll = rec.sum() / BATCH  # logvar = 0
                kl = posterior.kl().sum() / BATCH
                g = -disc(x_hat).mean()
                last = vae.decoder.conv_out.weight
                nll_grads = torch.autograd.grad(nll, last, retain_graph=True)[0]
                g_grads = torch.autograd.grad(g, last, retain_graph=True)[0]
                d_weight = torch.clamp(nll_grads.norm() / (g_grads.norm() + 1e-4), 0.0, 1e4).detach() * 0.5
                ae_loss = nll + 1e-6 * kl + d_weight * g
                opt_ae.zero_grad()
                ae_loss.backward()
                opt_ae.step()
                logged['total'] = ae_loss.item()
            else:
                _toggle(disc, vae)
                inputs, x_hat, _ = _reference_forward(vae, x, branch, tau)
                logits_real, logits_fake = disc(inputs.detach()), disc(x_hat.detach())
                d_loss = 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
                opt_disc.zero_grad()
                d_loss.backward()
                opt_disc.step()
                logged['disc'] = d_loss.item()
    return logged


def _weights_of(vae, loss):
    return {
        **{f'vae.{k}': v for k, v in vae.state_dict().items()},
        **{f'disc.{k}': v for k, v in loss.discriminator.state_dict().items()},
    }


def _weights(model):
    return _weights_of(model.vae, model.loss_fn)


def test_alternating_updates_match_a_two_optimizer_lightning_loop():
    model = _model()
    reference_vae, reference_loss = copy.deepcopy(model.vae), copy.deepcopy(model.loss_fn)
    images = _images()
    equivariance = EquivarianceAlgorithm(scales=SCALES)
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader([{'image': x} for x in images], batch_size=BATCH),
        optimizers=AlternatingAdam(model.param_groups(lr=LR, betas=(0.5, 0.9)), model=model),
        algorithms=[equivariance, SeedEachForward()],
        max_duration=f'{STEPS}ba',
        seed=SEED,
        device='cpu',
        precision='fp32',
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()

    # The discriminator's pass is the algorithm's second pass over the batch: its own draw.
    draw = lambda step, optimizer_idx: equivariance.draw(SEED, step, 0, pass_index=optimizer_idx)  # noqa: E731
    logged = _lightning_style(reference_vae, reference_loss, images, draw)
    assert {Branch.EQUIVARIANCE, Branch.LOW_RES} <= set(logged['branches'])  # the draws exercise the transforms
    assert any(a != b for a, b in zip(logged['branches'][::2], logged['branches'][1::2]))  # passes draw apart
    ours, expected, initial = _weights(model), _weights_of(reference_vae, reference_loss), _weights(_model())
    assert set(ours) == set(expected)  # weights and the discriminator's BatchNorm statistics
    assert sum(not torch.equal(initial[k], ours[k]) for k in ours) > 0.9 * len(ours)  # it trained
    for name, value in expected.items():
        if name.endswith('to_k.bias'):
            # Attention key biases have an exactly zero gradient (softmax ignores a per-query constant):
            # both runs step Adam on rounding noise, which moves them by up to about lr per step.
            assert (ours[name] - value).abs().max() <= 2 * STEPS * LR, name
            continue
        # Each weight moved by about 3e-3 (LR x 3 steps); the runs agree to well under 1% of that.
        torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-5, msg=name)
    # Adam counted one step per batch on each side, as the reference's two optimizers.
    optimizer = trainer.state.optimizers[0]
    assert {int(optimizer.state[p]['step']) for p in model.parameters() if p.requires_grad} == {STEPS}
    # Logged as the reference: total is the autoencoder's loss, disc the discriminator's (summed over passes).
    losses = trainer.state.total_loss_dict
    assert losses['loss/train/total'] == pytest.approx(logged['total'], rel=1e-5)
    assert losses['loss/train/disc'] == pytest.approx(logged['disc'], rel=1e-5)


def test_alternating_without_a_discriminator_is_one_pass():
    model = ComposerAutoencoderKL(tiny_vae(seed=2), VAEGANLoss(lpips_weight=0, disc_weight=0))
    passes = []
    model.autoencoder.register_forward_hook(lambda *args: passes.append(1))
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader([{'image': x} for x in _images()], batch_size=BATCH),
        optimizers=AlternatingAdam(model.param_groups(lr=LR), model=model),
        max_duration='2ba',
        device='cpu',
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    assert len(passes) == 2


def test_alternating_optimizer_needs_the_model():
    with pytest.raises(TypeError, match='ComposerAutoencoderKL'):
        AlternatingAdam([torch.nn.Parameter(torch.zeros(1))], model=torch.nn.Linear(1, 1))


def test_ddp_without_forced_sync_is_named():
    model = _model()
    optimizer = AlternatingAdam(model.param_groups(lr=LR), model=model)

    def closure():
        if model._gan_phase == 'discriminator':  # what DDP raises when a pass leaves parameters without gradients
            raise RuntimeError('Expected to have finished reduction in the prior iteration before starting a new one.')
        return 0.0

    with pytest.raises(RuntimeError, match='forced_sync'):
        optimizer.step(closure)


class RecordDraws(Callback):
    """Each closure evaluation's (batch, branch, transform) per microbatch, as the loss saw them."""

    def __init__(self, equivariance):
        self.equivariance = equivariance
        self.evaluations = []

    def before_train_batch(self, state, logger):
        self.evaluations.append((int(state.timestamp.batch), []))

    def before_loss(self, state, logger):
        self.evaluations[-1][1].append((self.equivariance.branch, self.equivariance.transform))


def _record_draws(model, optimizer, algorithms=()):
    equivariance = EquivarianceAlgorithm(scales=SCALES)
    recorder = RecordDraws(equivariance)
    Trainer(
        model=model,
        train_dataloader=DataLoader([{'image': x} for x in _images()], batch_size=BATCH),
        optimizers=optimizer,
        algorithms=[equivariance, *algorithms],
        callbacks=[recorder],
        max_duration=f'{STEPS}ba',
        device_train_microbatch_size=1,
        seed=SEED,
        device='cpu',
        precision='fp32',
        progress_bar=False,
        log_to_console=False,
    ).fit()
    return equivariance, recorder.evaluations


def test_sams_second_closure_evaluation_sees_the_same_draws():
    model = ComposerAutoencoderKL(tiny_vae(seed=2), VAEGANLoss(lpips_weight=0, disc_weight=0))
    with pytest.warns(UserWarning, match='SAM'):
        sam = SAM(rho=0.05)
    equivariance, evaluations = _record_draws(model, torch.optim.Adam(model.parameters(), lr=LR), [sam])
    assert [step for step, _ in evaluations] == [0, 0, 1, 1, 2, 2]  # SAM's ascent, then its descent, per step
    for ascent, descent in zip(evaluations[::2], evaluations[1::2]):
        assert len(ascent[1]) == BATCH
        assert descent == ascent  # both evaluate the same objective
    draws = [draw for _, mbs in evaluations[::2] for draw in mbs]
    assert len(set(draws)) > 1  # the draws vary across microbatches and steps, so equality above means something
    assert ', min_target_size=None' in repr(equivariance)  # the model's size stays out of the constructor arguments


def test_alternating_passes_draw_independently():
    model = _model()
    optimizer = AlternatingAdam(model.param_groups(lr=LR), model=model)
    equivariance, evaluations = _record_draws(model, optimizer)
    assert [step for step, _ in evaluations] == [0, 0, 1, 1, 2, 2]  # the autoencoder's pass, then the discriminator's
    for index, (step, draws) in enumerate(evaluations):
        expected = [equivariance.draw(SEED, step, microbatch, pass_index=index % 2) for microbatch in range(BATCH)]
        assert draws == expected
    assert any(a[1] != b[1] for a, b in zip(evaluations[::2], evaluations[1::2]))
