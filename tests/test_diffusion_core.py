"""The probe's pure core: objectives against the references' transcriptions, samplers, guidance, SWD."""

import math

import numpy as np
import pytest
import torch

from eqvae_composer.diffusion.ddpm import DDPMSchedule, ddpm_loss, linear_betas, q_sample
from eqvae_composer.diffusion.flow import flow_matching_loss, linear_path
from eqvae_composer.diffusion.guidance import drop_labels, guided, label_drop_mask
from eqvae_composer.diffusion.sampling import ddpm_scheduler, sample_ddpm, sample_ode
from eqvae_composer.diffusion.swd import laplacian_pyramid, pyr_up, swd
from tests.diffusion_references import DiTGaussianDiffusion, sit_training_loss


class _ConvModel(torch.nn.Module):
    """A fixed random conv whose output depends on x and t (like a denoiser), ``out`` channels."""

    def __init__(self, channels, out):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, out, 3, padding=1)

    def forward(self, x, t):
        return torch.tanh(self.conv(x)) + 0.1 * t.float().reshape(-1, 1, 1, 1) / (1 + t.float().max())


def test_flow_matching_loss_equals_sits_linear_velocity_loss():
    torch.manual_seed(1)
    model = _ConvModel(4, 4)
    x1, x0, t = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8), torch.rand(6)
    xt, ut = linear_path(x1, x0, t)
    ours = flow_matching_loss(model(xt, t), ut)
    assert torch.allclose(ours, sit_training_loss(model, x1, t, x0), atol=1e-6)
    assert ours.shape == (6,)


def test_ddpm_loss_equals_dits_learned_range_hybrid_loss():
    torch.manual_seed(2)
    model = _ConvModel(4, 8)
    x_start = torch.randn(8, 4, 8, 8).clamp(-1.2, 1.2)  # some values past +-0.999: the NLL's edge branches
    noise = torch.randn_like(x_start)
    t = torch.tensor([0, 0, 1, 5, 100, 500, 998, 999])  # t = 0 takes the decoder NLL, the rest the KL
    reference = DiTGaussianDiffusion().training_losses(model, x_start, t, noise)
    schedule = DDPMSchedule(linear_betas(1000))
    x_t = q_sample(schedule, x_start, t, noise)
    ours = ddpm_loss(schedule, model(x_t, t), x_start, x_t, t, noise)
    for key in ('mse', 'vb', 'loss'):
        assert torch.allclose(ours[key], reference[key], rtol=1e-4, atol=1e-5), key


def test_ddpm_loss_sends_the_bound_to_the_variance_head_only():
    schedule = DDPMSchedule(linear_betas(1000))
    x_start, noise, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([3, 400])
    x_t = q_sample(schedule, x_start, t, noise)
    out = torch.randn(2, 6, 4, 4, requires_grad=True)
    ddpm_loss(schedule, out, x_start, x_t, t, noise)['vb'].sum().backward()
    assert out.grad[:, :3].abs().max() == 0 and out.grad[:, 3:].abs().max() > 0


def _gaussian_velocity(mu, s):
    """The exact velocity of the linear path from N(0, 1) to N(mu, s^2), elementwise (hand-derived):
    v(x, t) = E[x1 - x0 | x_t = x] = mu + (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2) * (x - t mu)."""

    def velocity(x, t, labels):
        t = t.reshape(-1, 1, 1, 1).double()
        var = t**2 * s**2 + (1 - t) ** 2
        return (mu + (t * s**2 - (1 - t)) / var * (x - t * mu)).to(x.dtype)

    return velocity


def test_ode_samplers_carry_noise_to_the_gaussian_datas_quantile():
    # The flow of an affine Gaussian path keeps quantiles: noise z ends at mu + s z.
    mu, s = 1.5, 0.5
    z = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    labels = torch.zeros(4, dtype=torch.long)
    exact = mu + s * z
    euler = sample_ode(_gaussian_velocity(mu, s), z, labels, num_steps=200, solver='euler')
    heun = sample_ode(_gaussian_velocity(mu, s), z, labels, num_steps=20, solver='heun')
    coarse_euler = sample_ode(_gaussian_velocity(mu, s), z, labels, num_steps=20, solver='euler')
    assert (euler - exact).abs().max() < 1e-2
    assert (heun - exact).abs().max() < 3e-3
    assert (heun - exact).abs().max() < (coarse_euler - exact).abs().max() / 10  # second order


def test_ddim_with_the_exact_denoiser_of_a_point_mass_returns_the_point():
    # Data always equal to mu: the exact epsilon at (x_t, t) is (x_t - sqrt(acp_t) mu) / sqrt(1 - acp_t).
    mu = 0.7
    acp = torch.cumprod(1 - linear_betas(1000), 0)

    def eps_model(x, t, labels):
        a = acp[t].reshape(-1, 1, 1, 1).to(x.dtype)
        return (x - a.sqrt() * mu) / (1 - a).sqrt()

    noise = torch.randn(2, 4, 4, 4)
    out = sample_ddpm(eps_model, noise, torch.zeros(2, dtype=torch.long), ddpm_scheduler('ddim'), num_steps=25)
    assert (out - mu).abs().max() < 1e-3


def test_label_dropout_draws_per_sample_at_its_rate():
    g = torch.Generator().manual_seed(0)
    assert not label_drop_mask(100, 0.0, g).any() and label_drop_mask(100, 1.0, g).all()
    assert abs(label_drop_mask(20000, 0.1, g).float().mean().item() - 0.1) < 0.01
    labels = torch.tensor([3, 1, 4, 1])
    assert drop_labels(labels, torch.tensor([True, False, True, False]), 10).tolist() == [10, 1, 10, 1]
    with pytest.raises(ValueError, match='probability'):
        label_drop_mask(3, 1.5)


def test_guidance_mixes_conditional_and_unconditional_predictions():
    # A toy model: prediction = label (as a float) everywhere, in two channels; the null label is 10.
    def model(x, t, labels):
        return labels.float().reshape(-1, 1, 1, 1).expand(-1, 2, 1, 1).clone()

    x, t, labels = torch.zeros(2, 2, 1, 1), torch.zeros(2), torch.tensor([2, 4])
    assert guided(model, 1.0, 10) is model
    assert guided(model, 0.0, 10)(x, t, labels).flatten().tolist() == [10.0] * 4
    # uncond + 4 * (cond - uncond) = 10 + 4 * (2 - 10) = -22 and 10 + 4 * (4 - 10) = -14
    assert guided(model, 4.0, 10)(x, t, labels)[:, :, 0, 0].tolist() == [[-22.0, -22.0], [-14.0, -14.0]]
    # Guiding only the first channel: the second is the conditional prediction.
    assert guided(model, 4.0, 10, guided_channels=1)(x, t, labels)[:, :, 0, 0].tolist() == [[-22.0, 2.0], [-14.0, 4.0]]


def test_laplacian_pyramid_collapses_back_to_the_image():
    images = torch.rand(2, 3, 32, 32)
    pyramid = laplacian_pyramid(images, 3)
    assert [p.shape[-1] for p in pyramid] == [32, 16, 8]
    image = pyramid[-1]
    for level in reversed(pyramid[:-1]):
        image = level + pyr_up(image)
    assert torch.allclose(image, images, atol=1e-5)


def test_swd_is_zero_for_identical_sets_and_grows_with_the_perturbation():
    torch.manual_seed(0)
    # Smooth-ish images so each pyramid level carries structure.
    images = torch.nn.functional.interpolate(torch.rand(16, 3, 8, 8), size=32, mode='bilinear')
    kwargs = dict(patches_per_image=32, dirs_per_repeat=64)
    assert swd(images, images.clone(), **kwargs)['swd_avg'] == 0
    values = [swd(images, images + sigma * torch.randn_like(images), **kwargs)['swd_avg'] for sigma in (0.02, 0.1, 0.5)]
    assert values[0] < values[1] < values[2]
    assert set(swd(images, images, **kwargs)) == {'swd_32', 'swd_16', 'swd_avg'}
    assert not math.isnan(values[0])


def test_swd_pieces_equal_progressive_gans_numpy_code():
    from eqvae_composer.diffusion.swd import _normalize, laplacian_pyramid, patch_descriptors, sliced_wasserstein
    from tests import diffusion_references as ref

    images = torch.rand(3, 3, 32, 32)
    ours = laplacian_pyramid(images, 3)
    theirs = ref.generate_laplacian_pyramid(images.numpy(), 3)
    for a, b in zip(ours, theirs):
        assert np.allclose(a.numpy(), b, atol=1e-5)
    desc_a = patch_descriptors(ours[0], 7, 16, torch.Generator().manual_seed(0))
    desc_b = patch_descriptors(ours[1], 7, 16, torch.Generator().manual_seed(1))[: len(desc_a)]
    assert desc_a.shape == (48, 3, 7, 7)
    norm_a, norm_b = ref.finalize_descriptors(desc_a.numpy().copy()), ref.finalize_descriptors(desc_b.numpy().copy())
    assert np.allclose(_normalize(desc_a).numpy(), norm_a, atol=1e-5)
    rng = np.random.default_rng(0)
    dirs = [rng.standard_normal((147, 32)) for _ in range(4)]
    value = sliced_wasserstein(_normalize(desc_a), _normalize(desc_b), directions=[torch.from_numpy(d) for d in dirs])
    assert float(value) == pytest.approx(float(ref.sliced_wasserstein_given(norm_a, norm_b, dirs)), rel=1e-5)


@pytest.mark.parametrize('step', [999, 500, 1, 0])
def test_a_ddpm_step_is_dits_p_sample_with_the_learned_variance(step):
    from tests.diffusion_references import dit_p_sample

    torch.manual_seed(0)
    x, out = torch.randn(2, 4, 4, 4), torch.randn(2, 8, 4, 4).clamp(-1, 1)
    scheduler = ddpm_scheduler('ddpm', learn_sigma=True)
    scheduler.set_timesteps(1000)  # every step: no respacing
    ours = scheduler.step(out, step, x, generator=torch.Generator().manual_seed(1)).prev_sample
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    t = torch.full((2,), step)
    theirs = dit_p_sample(DiTGaussianDiffusion(), lambda *_: out, x, t, noise)
    # diffusers keeps its tables in float32, DiT in float64: 2e-4 apart at t = 1, where 1 - alpha_bar is smallest.
    assert torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4)
