"""Test-only transcriptions of the reference objectives, to check ours against.

- ``sit_training_loss``: willisma/SiT ``transport/transport.py`` ``Transport.training_losses`` with
  ``PathType.LINEAR`` (``transport/path.py`` ``ICPlan``: ``alpha_t = t``, ``sigma_t = 1 - t``,
  ``d_alpha_t = 1``, ``d_sigma_t = -1``) and ``ModelType.VELOCITY``; the draws of ``Transport.sample``
  (``t``, ``x0``) are arguments so both sides see the same ones.
- ``DiTGaussianDiffusion``: facebookresearch/DiT ``diffusion/gaussian_diffusion.py`` (numpy float64
  tables, ``_extract_into_tensor``, ``training_losses`` for ``LossType.MSE``, ``ModelVarType.LEARNED_RANGE``,
  ``ModelMeanType.EPSILON``) and ``diffusion/diffusion_utils.py`` (``normal_kl``,
  ``discretized_gaussian_log_likelihood``), with the linear betas of ``get_named_beta_schedule``.
"""

import numpy as np
import torch as th


def mean_flat(tensor):
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


def sit_training_loss(model, x1, t, x0):
    def expand_t_like_x(t, x):
        dims = [1] * (len(x.size()) - 1)
        return t.view(t.size(0), *dims)

    # ICPlan.plan -> compute_mu_t, compute_ut
    t_ = expand_t_like_x(t, x1)
    alpha_t, d_alpha_t = t_, 1
    sigma_t, d_sigma_t = 1 - t_, -1
    xt = alpha_t * x1 + sigma_t * x0
    ut = d_alpha_t * x1 + d_sigma_t * x0
    model_output = model(xt, t)
    return mean_flat((model_output - ut) ** 2)


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + th.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * th.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + th.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * th.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    assert x.shape == means.shape == log_scales.shape
    centered_x = x - means
    inv_stdv = th.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
    cdf_plus = approx_standard_normal_cdf(plus_in)
    min_in = inv_stdv * (centered_x - 1.0 / 255.0)
    cdf_min = approx_standard_normal_cdf(min_in)
    log_cdf_plus = th.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = th.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    log_probs = th.where(
        x < -0.999,
        log_cdf_plus,
        th.where(x > 0.999, log_one_minus_cdf_min, th.log(cdf_delta.clamp(min=1e-12))),
    )
    return log_probs


def _extract_into_tensor(arr, timesteps, broadcast_shape):
    res = th.from_numpy(arr).to(device=timesteps.device)[timesteps].float()
    while len(res.shape) < len(broadcast_shape):
        res = res[..., None]
    return res + th.zeros(broadcast_shape, device=timesteps.device)


class DiTGaussianDiffusion:
    def __init__(self, num_diffusion_timesteps=1000):
        scale = 1000 / num_diffusion_timesteps
        betas = np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps, dtype=np.float64)
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    def q_sample(self, x_start, t, noise):
        return (
            _extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + _extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def q_posterior_mean_variance(self, x_start, x_t, t):
        posterior_mean = (
            _extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + _extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        posterior_variance = _extract_into_tensor(self.posterior_variance, t, x_t.shape)
        posterior_log_variance_clipped = _extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return posterior_mean, posterior_variance, posterior_log_variance_clipped

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            _extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - _extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps
        )

    def p_mean_variance(self, model, x, t, clip_denoised=True):
        B, C = x.shape[:2]
        model_output = model(x, t)
        model_output, model_var_values = th.split(model_output, C, dim=1)
        min_log = _extract_into_tensor(self.posterior_log_variance_clipped, t, x.shape)
        max_log = _extract_into_tensor(np.log(self.betas), t, x.shape)
        frac = (model_var_values + 1) / 2
        model_log_variance = frac * max_log + (1 - frac) * min_log
        pred_xstart = self._predict_xstart_from_eps(x_t=x, t=t, eps=model_output)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        model_mean, _, _ = self.q_posterior_mean_variance(x_start=pred_xstart, x_t=x, t=t)
        return {'mean': model_mean, 'log_variance': model_log_variance, 'pred_xstart': pred_xstart}

    def _vb_terms_bpd(self, model, x_start, x_t, t, clip_denoised=True):
        true_mean, _, true_log_variance_clipped = self.q_posterior_mean_variance(x_start=x_start, x_t=x_t, t=t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised)
        kl = normal_kl(true_mean, true_log_variance_clipped, out['mean'], out['log_variance'])
        kl = mean_flat(kl) / np.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out['mean'], log_scales=0.5 * out['log_variance']
        )
        decoder_nll = mean_flat(decoder_nll) / np.log(2.0)
        return th.where((t == 0), decoder_nll, kl)

    def training_losses(self, model, x_start, t, noise):
        x_t = self.q_sample(x_start, t, noise=noise)
        terms = {}
        model_output = model(x_t, t)
        B, C = x_t.shape[:2]
        model_output, model_var_values = th.split(model_output, C, dim=1)
        frozen_out = th.cat([model_output.detach(), model_var_values], dim=1)
        terms['vb'] = self._vb_terms_bpd(
            model=lambda *args, r=frozen_out: r, x_start=x_start, x_t=x_t, t=t, clip_denoised=False
        )
        terms['mse'] = mean_flat((noise - model_output) ** 2)
        terms['loss'] = terms['mse'] + terms['vb']
        return terms


# tkarras/progressive_growing_of_gans metrics/sliced_wasserstein.py (numpy + scipy), the parts that do not
# draw random numbers: the pyramid, the descriptors' normalization, and the distance for given directions.
gaussian_filter = (
    np.float32([[1, 4, 6, 4, 1], [4, 16, 24, 16, 4], [6, 24, 36, 24, 6], [4, 16, 24, 16, 4], [1, 4, 6, 4, 1]]) / 256.0
)


def pyr_down(minibatch):  # matches cv2.pyrDown()
    import scipy.ndimage

    assert minibatch.ndim == 4
    return scipy.ndimage.convolve(minibatch, gaussian_filter[np.newaxis, np.newaxis, :, :], mode='mirror')[
        :, :, ::2, ::2
    ]


def pyr_up(minibatch):  # matches cv2.pyrUp()
    import scipy.ndimage

    assert minibatch.ndim == 4
    S = minibatch.shape
    res = np.zeros((S[0], S[1], S[2] * 2, S[3] * 2), minibatch.dtype)
    res[:, :, ::2, ::2] = minibatch
    return scipy.ndimage.convolve(res, gaussian_filter[np.newaxis, np.newaxis, :, :] * 4.0, mode='mirror')


def generate_laplacian_pyramid(minibatch, num_levels):
    pyramid = [np.float32(minibatch)]
    for _i in range(1, num_levels):
        pyramid.append(pyr_down(pyramid[-1]))
        pyramid[-2] -= pyr_up(pyramid[-1])
    return pyramid


def finalize_descriptors(desc):
    if isinstance(desc, list):
        desc = np.concatenate(desc, axis=0)
    assert desc.ndim == 4  # (neighborhood, channel, height, width)
    desc -= np.mean(desc, axis=(0, 2, 3), keepdims=True)
    desc /= np.std(desc, axis=(0, 2, 3), keepdims=True)
    desc = desc.reshape(desc.shape[0], -1)
    return desc


def sliced_wasserstein_given(A, B, dirs_list):
    """``sliced_wasserstein(A, B, dir_repeats, dirs_per_repeat)`` with its ``np.random.randn`` draws given."""
    assert A.ndim == 2 and A.shape == B.shape  # (neighborhood, descriptor_component)
    results = []
    for dirs in dirs_list:
        dirs = dirs / np.sqrt(np.sum(np.square(dirs), axis=0, keepdims=True))  # normalize descriptor components
        dirs = dirs.astype(np.float32)
        projA = np.matmul(A, dirs)  # (neighborhood, dir)
        projB = np.matmul(B, dirs)
        projA = np.sort(projA, axis=0)  # sort neighborhood projections
        projB = np.sort(projB, axis=0)
        dists = np.abs(projA - projB)  # pointwise wasserstein distances
        results.append(np.mean(dists))  # average over neighborhoods and directions
    return np.mean(results)  # average over repeats


def dit_p_sample(diffusion, model, x, t, noise, clip_denoised=False):
    """DiT's ``GaussianDiffusion.p_sample`` (no cond_fn) with its ``th.randn_like(x)`` given as ``noise``."""
    out = diffusion.p_mean_variance(model, x, t, clip_denoised=clip_denoised)
    nonzero_mask = (t != 0).float().view(-1, *([1] * (len(x.shape) - 1)))  # no noise when t == 0
    return out['mean'] + nonzero_mask * th.exp(0.5 * out['log_variance']) * noise
