"""EquivarianceAlgorithm: configuration, the events on a minimal State, and a Trainer with two model shapes."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from composer import Trainer
from composer.core import Event, State
from composer.devices import DeviceCPU
from composer.loggers import InMemoryLogger, Logger
from composer.models import ComposerModel
from torch.utils.data import DataLoader

from eqvae_composer import ComposerAutoencoderKL, EquivarianceAlgorithm, VAEGANLoss
from eqvae_composer.algorithms.equivariance import GRID_SCALES, Branch, SpatialTransform, apply_to_image
from tests.conftest import tiny_vae


def test_defaults_are_the_reference_defaults():
    algo = EquivarianceAlgorithm()
    assert algo.p_equivariance == 0.5 and algo.p_lowres == 0.25
    assert algo.scales == 'grid' and algo.rotations == (1, 2, 3)
    assert algo.interpolation == 'bilinear' and algo.antialias is False and algo.anisotropic is False
    assert algo.image_key == 'image'


@pytest.mark.parametrize(
    'kwargs, name',
    [
        (dict(p_equivariance=1.5), 'p_equivariance'),
        (dict(p_lowres=-0.1), 'p_lowres'),
        (dict(scales='log'), 'scales'),
        (dict(scales=[0.5, 1.5]), 'scales'),
        (dict(rotations=[4]), 'rotations'),
        (dict(interpolation='lanczos'), 'interpolation'),
        (dict(downsample_factor=0), 'downsample_factor'),
    ],
)
def test_invalid_values_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        EquivarianceAlgorithm(**kwargs)


#: A value other than the default for every constructor argument.
NON_DEFAULTS = dict(
    p_equivariance=0.75,
    p_lowres=0.5,
    scales=(0.25, 0.5),
    anisotropic=True,
    rotations=(0, 2),
    interpolation='bicubic',
    antialias=True,
    image_key='pixels',
    downsample_factor=16,
    lowres_isotropic=True,
    shared_draws=True,
    min_target_size=24,
    transforms={'scale_rotate': 1.0, 'hflip': 0.5, 'crop': {'weight': 0.5, 'min_fraction': 0.75}},
)


def test_repr_rebuilds_every_constructor_argument():
    arguments = [name for name in inspect.signature(EquivarianceAlgorithm.__init__).parameters if name != 'self']
    assert sorted(NON_DEFAULTS) == sorted(arguments), 'give every constructor argument a non-default value here'
    default = EquivarianceAlgorithm()
    assert all(getattr(default, name) != value for name, value in NON_DEFAULTS.items())
    for algo in (default, EquivarianceAlgorithm(**NON_DEFAULTS)):
        rebuilt = eval(repr(algo), {'EquivarianceAlgorithm': EquivarianceAlgorithm})
        assert {name: getattr(rebuilt, name) for name in arguments} == {name: getattr(algo, name) for name in arguments}
    assert {name: getattr(rebuilt, name) for name in arguments} == NON_DEFAULTS


def _state(model, batch):
    state = State(model=model, rank_zero_seed=0, run_name='test', device=DeviceCPU())
    state.batch = batch
    return state


def _run_microbatch(algo, state, logger):
    """The events Composer fires around one microbatch, with the model's forward and loss in between."""
    algo.apply(Event.BEFORE_FORWARD, state, logger)
    state.outputs = state.model(state.batch)
    algo.apply(Event.AFTER_FORWARD, state, logger)
    algo.apply(Event.BEFORE_LOSS, state, logger)
    seen = state.batch['image'].clone()
    state.loss = state.model.loss(state.outputs, state.batch)
    algo.apply(Event.AFTER_LOSS, state, logger)
    return seen


def _attached(model, images, **kwargs):
    """``(algorithm, state, logger)``: ``EquivarianceAlgorithm(**kwargs)`` after INIT on a State holding ``images``."""
    state = _state(model, {'image': images})
    logger = Logger(state)
    algo = EquivarianceAlgorithm(**kwargs)
    algo.apply(Event.INIT, state, logger)
    return algo, state, logger


def test_equivariance_branch_decodes_once_on_tau_z_and_compares_with_tau_x():
    # 64 px at scale 0.25 is 16 px: a 2-layer PatchGAN (12 px at least) sees every draw.
    model = ComposerAutoencoderKL(tiny_vae(), VAEGANLoss(lpips_weight=0, disc_num_filters=8, disc_num_layers=2))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    algo, state, logger = _attached(model, x, p_equivariance=1.0)

    decoder_inputs = []
    model.vae.decoder.register_forward_pre_hook(lambda m, a: decoder_inputs.append(a[0].shape))
    seen = _run_microbatch(algo, state, logger)

    tau = algo.transform
    assert algo.branch == Branch.EQUIVARIANCE and tau.scale_h in GRID_SCALES and tau.quarter_turns in (1, 2, 3)
    assert len(decoder_inputs) == 1  # one decode per microbatch, and it is of tau(z)
    latent = state.outputs['posterior'].mean
    assert latent.shape[-2:] == (8, 8)  # the encoder (and so the KL term) saw the untransformed x
    assert (
        decoder_inputs[0]
        == state.outputs['latents'].shape[:2]
        + tuple(int(8 * s) for s in (tau.scale_h, tau.scale_w))[:: (-1 if tau.quarter_turns % 2 else 1)]
    )
    torch.testing.assert_close(seen, apply_to_image(x, tau, 8))
    assert state.outputs['reconstruction'].shape == seen.shape
    assert state.batch['image'] is x  # restored after the loss


def test_low_res_branch_downscales_the_input_for_forward_and_loss():
    model = ComposerAutoencoderKL(tiny_vae(), VAEGANLoss(lpips_weight=0, disc_weight=0))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    state = _state(model, {'image': x})
    logger = Logger(state)
    algo = EquivarianceAlgorithm(p_equivariance=0.0, p_lowres=1.0, scales=[0.5])
    algo.apply(Event.INIT, state, logger)
    seen = _run_microbatch(algo, state, logger)
    assert seen.shape[-2:] == (32, 32) and state.outputs['reconstruction'].shape[-2:] == (32, 32)
    torch.testing.assert_close(seen, F.interpolate(x, size=(32, 32), mode='bilinear', align_corners=False))
    assert state.batch['image'] is x


def test_full_res_branch_changes_nothing():
    model = ComposerAutoencoderKL(tiny_vae(), VAEGANLoss(lpips_weight=0, disc_weight=0))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    state = _state(model, {'image': x})
    logger = Logger(state)
    algo = EquivarianceAlgorithm(p_equivariance=0.0, p_lowres=0.0)
    algo.apply(Event.INIT, state, logger)
    assert _run_microbatch(algo, state, logger) is not None
    assert state.outputs['reconstruction'].shape == x.shape and algo.transform == SpatialTransform()


def test_a_forward_that_never_decodes_is_an_error():
    class EncoderOnly(ComposerModel):
        def __init__(self):
            super().__init__()
            self.vae = tiny_vae()

        def forward(self, batch):
            return self.vae.encode(batch['image']).latent_dist.mode()

        def loss(self, outputs, batch):
            return outputs.mean()

    state = _state(EncoderOnly(), {'image': torch.zeros(1, 3, 32, 32)})
    logger = Logger(state)
    algo = EquivarianceAlgorithm(p_equivariance=1.0)
    algo.apply(Event.INIT, state, logger)
    algo.apply(Event.BEFORE_FORWARD, state, logger)
    state.outputs = state.model(state.batch)
    with pytest.raises(RuntimeError, match='did not decode'):
        algo.apply(Event.AFTER_FORWARD, state, logger)


def test_model_without_autoencoder_is_rejected():
    class NoVAE(ComposerModel):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(1, 1)

        def forward(self, batch):
            return batch

        def loss(self, outputs, batch):
            return torch.zeros(())

    with pytest.raises(ValueError, match=r'exactly one diffusers autoencoder \(AutoencoderKL \(kl\), VQModel'):
        state = _state(NoVAE(), {})
        EquivarianceAlgorithm().apply(Event.INIT, state, Logger(state))


# --- with a Trainer ---------------------------------------------------------------------------


class DiffusionStyleAutoEncoder(ComposerModel):
    """Shaped like mosaicml/diffusion's ComposerDiffusersAutoEncoder: dict outputs, loss dict with `total`."""

    def __init__(self, model, input_key='image'):
        super().__init__()
        self.model = model
        self.input_key = input_key
        self.loss_shapes = []

    def forward(self, batch):
        latent_dist = self.model.encode(batch[self.input_key])['latent_dist']
        latents = latent_dist.sample()
        recon = self.model.decode(latents).sample
        return {'x_recon': recon, 'latents': latents, 'mean': latent_dist.mean, 'log_var': latent_dist.logvar}

    def loss(self, outputs, batch):
        self.loss_shapes.append((tuple(outputs['x_recon'].shape), tuple(batch[self.input_key].shape)))
        ae_loss = F.l1_loss(outputs['x_recon'], batch[self.input_key])
        kl = -0.5 * torch.mean(1 + outputs['log_var'] - outputs['mean'].pow(2) - outputs['log_var'].exp())
        return {'ae_loss': ae_loss, 'kl_div_loss': kl, 'total': ae_loss + 1e-6 * kl}


def _loader(n=8, size=32, batch_size=4):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    return DataLoader([{'image': im} for im in images], batch_size=batch_size)


def _fit(model, algorithms, seed=42, microbatch=None, max_duration='2ba', loggers=()):
    trainer = Trainer(
        model=model,
        train_dataloader=_loader(),
        max_duration=max_duration,
        optimizers=torch.optim.Adam(model.parameters(), lr=1e-3),
        algorithms=algorithms,
        seed=seed,
        device='cpu',
        device_train_microbatch_size=microbatch,
        loggers=list(loggers),
        progress_bar=False,
        log_to_console=False,
    )
    trainer.fit()
    return trainer


def test_plugs_into_a_diffusion_style_model():
    model = DiffusionStyleAutoEncoder(tiny_vae())
    _fit(model, [EquivarianceAlgorithm(p_equivariance=1.0)], max_duration='3ba')
    assert len(model.loss_shapes) == 3
    for recon_shape, target_shape in model.loss_shapes:
        assert recon_shape == target_shape  # the loss compared D(tau(z)) with tau(x)
        assert recon_shape[-1] < 32  # and they were transformed (every grid scale is < 1)


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_same_seed_same_run_and_fixed_log_keys():
    runs = []
    for _ in range(2):
        logger = InMemoryLogger()
        # 32 px at scale 0.25 is 8 px: a 1-layer PatchGAN is the deepest that sees it.
        vae = tiny_vae(seed=1)  # seeds the discriminator's init too
        model = ComposerAutoencoderKL(vae, VAEGANLoss(lpips_weight=0, disc_num_filters=8, disc_num_layers=1))
        _fit(model, [EquivarianceAlgorithm()], seed=3, microbatch=2, max_duration='3ba', loggers=[logger])
        runs.append((_weights(model), logger.data))
    torch.testing.assert_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    keys = {'eqvae/branch', 'eqvae/scale_h', 'eqvae/scale_w', 'eqvae/rotation_deg'}
    assert keys <= set(runs[0][1])
    for key in keys:
        assert [v for _, v in runs[0][1][key]] == [v for _, v in runs[1][1][key]]
        assert len(runs[0][1][key]) == 6  # every microbatch (3 batches x 2) logged each key
    assert {v for _, v in runs[0][1]['eqvae/branch']} != {0.0}  # it did transform


def test_each_microbatch_draws_its_own_transform():
    logger = InMemoryLogger()
    model = ComposerAutoencoderKL(tiny_vae(), VAEGANLoss(lpips_weight=0, disc_weight=0))
    _fit(model, [EquivarianceAlgorithm(p_equivariance=1.0)], microbatch=1, max_duration='2ba', loggers=[logger])
    draws = list(zip(*([v for _, v in logger.data[k]] for k in ('eqvae/scale_h', 'eqvae/rotation_deg'))))
    assert len(draws) == 8 and len(set(draws)) > 1


def test_different_seeds_draw_differently():
    logs = []
    for seed in (1, 2):
        logger = InMemoryLogger()
        model = ComposerAutoencoderKL(tiny_vae(), VAEGANLoss(lpips_weight=0, disc_weight=0))
        _fit(model, [EquivarianceAlgorithm()], seed=seed, microbatch=1, loggers=[logger])
        logs.append([v for _, v in logger.data['eqvae/scale_h']])
    assert logs[0] != logs[1]


def _draws_on_rank(monkeypatch, rank, **kwargs):
    from composer.utils import dist

    monkeypatch.setattr(dist, 'get_global_rank', lambda: rank)
    model = ComposerAutoencoderKL(tiny_vae(), VAEGANLoss(lpips_weight=0, disc_weight=0))
    state = _state(model, {'image': torch.zeros(1, 3, 32, 32)})
    algo = EquivarianceAlgorithm(**kwargs)
    algo.apply(Event.INIT, state, Logger(state))
    assert state.seed == rank  # Composer's per-rank seed: rank_zero_seed (0) + rank
    return [algo.draw(algo._seed, batch, 0) for batch in range(40)]


def test_draws_are_per_rank_by_default_and_shared_with_shared_draws(monkeypatch):
    assert _draws_on_rank(monkeypatch, 0) != _draws_on_rank(monkeypatch, 1)
    assert _draws_on_rank(monkeypatch, 0, shared_draws=True) == _draws_on_rank(monkeypatch, 1, shared_draws=True)


def test_lowres_isotropic_draws_one_scale_for_the_low_resolution_branch_only():
    def scales(**kwargs):
        algo = EquivarianceAlgorithm(anisotropic=True, **kwargs)
        draws = [algo.draw(0, batch, 0) for batch in range(200)]
        return {branch: [(t.scale_h, t.scale_w) for b, t in draws if b == branch] for branch in Branch}

    default, reference = scales(), scales(lowres_isotropic=True)
    assert any(h != w for h, w in default[Branch.LOW_RES])
    assert reference[Branch.LOW_RES] and all(h == w for h, w in reference[Branch.LOW_RES])
    assert any(h != w for h, w in reference[Branch.EQUIVARIANCE])  # the equivariance branch stays anisotropic
