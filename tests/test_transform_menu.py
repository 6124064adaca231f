"""The transform menu beyond the paper: its draws, the built-in pairs, a pair of one's own, and the paper's default."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from composer.core import Event
from composer.loggers import InMemoryLogger, Logger

from eqvae_composer import ComposerAutoencoderKL, EquivarianceAlgorithm, VAEGANLoss
from eqvae_composer.algorithms.equivariance import (
    TRANSFORM_PAIRS,
    Branch,
    Flip,
    LatentCrop,
    LatentTranslation,
    SpatialTransform,
    TransformPair,
)
from eqvae_composer.train import ALGORITHMS, ConfigError, _instantiate
from tests.conftest import tiny_vae
from tests.test_algorithm import _run_microbatch, _state


def _paper_draw(seed, batch, microbatch):
    """The default draw sequence, transcribed from the spec (section 2) and the microbatch seeding.

    A generator seeded by SeedSequence([seed, batch, microbatch]); u < 0.5: equivariance, a grid scale
    s/32 (s = 8..31) then k from (1, 2, 3); else u < 0.25: low resolution at a grid scale; else full res.
    """
    entropy = np.random.SeedSequence([seed, batch, microbatch]).generate_state(1, dtype=np.uint64)[0] >> 1
    generator = torch.Generator().manual_seed(int(entropy))
    grid = [s / 32 for s in range(8, 32)]
    if float(torch.rand((), generator=generator)) < 0.5:
        scale = grid[int(torch.randint(24, (), generator=generator))]
        quarter_turns = (1, 2, 3)[int(torch.randint(3, (), generator=generator))]
        return 2, scale, scale, quarter_turns
    if float(torch.rand((), generator=generator)) < 0.25:
        scale = grid[int(torch.randint(24, (), generator=generator))]
        return 1, scale, scale, 0
    return 0, 1.0, 1.0, 0


@pytest.mark.parametrize('transforms', [None, {'scale_rotate': 1.0}, {'scale_rotate': 2.0, 'hflip': 0.0}])
def test_the_default_menu_draws_the_papers_sequence_bit_for_bit(transforms):
    algo = EquivarianceAlgorithm(transforms=transforms)
    for batch in range(300):
        for microbatch in range(2):
            branch, tau = algo.draw(5, batch, microbatch)
            assert (int(branch), tau.scale_h, tau.scale_w, tau.quarter_turns) == _paper_draw(5, batch, microbatch)


def test_a_menu_draws_each_entry_by_its_weight_as_a_pure_function_of_the_seeds():
    algo = EquivarianceAlgorithm(p_equivariance=1.0, transforms={'scale_rotate': 1.0, 'hflip': 1.0, 'crop': 2.0})
    draws = [algo.draw(0, batch, 0)[1] for batch in range(800)]
    kinds = [type(tau).__name__ for tau in draws]
    shares = {kind: kinds.count(kind) / len(kinds) for kind in ('SpatialTransform', 'Flip', 'LatentCrop')}
    assert shares == pytest.approx({'SpatialTransform': 0.25, 'Flip': 0.25, 'LatentCrop': 0.5}, abs=0.06)
    assert all(algo.draw(0, batch, 0)[1] == draws[batch] for batch in range(20))  # stateless: resumes exactly
    crops = [tau for tau in draws if isinstance(tau, LatentCrop)]
    assert min(c.size_h for c in crops) >= 0.5 and len({c.top for c in crops}) == len(crops)


def test_crop_and_translation_cells_by_hand():
    z = torch.arange(24.0).view(1, 1, 4, 6)
    x = torch.arange(96.0).view(1, 1, 8, 12)  # a factor-2 image of the same grid
    crop = LatentCrop(0.5, 0.5, top=0.99, left=0.0)  # 2 of 4 rows, last start (2); 3 of 6 columns from 0
    assert torch.equal(crop.apply_to_latent(z), z[..., 2:4, 0:3])
    assert torch.equal(crop.apply_to_image(x, 2), x[..., 4:8, 0:6])
    shift = LatentTranslation(0.25, -0.5)  # +1 row, -3 columns
    assert torch.equal(shift.apply_to_latent(z), torch.roll(z, (1, -3), (2, 3)))
    assert torch.equal(shift.apply_to_image(x, 2), torch.roll(x, (2, -6), (2, 3)))
    assert torch.equal(Flip((-1,)).apply_to_latent(z), z[..., torch.arange(5, -1, -1)])


@pytest.mark.parametrize(
    'tau', [Flip((-1,)), Flip((-2,)), LatentCrop(0.5, 0.75, 0.3, 0.6), LatentTranslation(-0.3, 0.4)]
)
def test_each_built_in_pair_commutes_with_an_exactly_equivariant_encoder(tau):
    # Average pooling over the 8x8 cells is an encoder that every grid-aligned tau commutes with.
    x = torch.rand(2, 3, 48, 64)
    encode = lambda image: F.avg_pool2d(image, 8)  # noqa: E731
    torch.testing.assert_close(encode(tau.apply_to_image(x, 8)), tau.apply_to_latent(encode(x)))


@dataclass(frozen=True)
class Transpose:
    """A user-defined tau: swap height and width of the latent and of the image."""

    def apply_to_latent(self, z):
        return z.transpose(-1, -2).contiguous()

    def apply_to_image(self, x, downsample_factor):
        return x.transpose(-1, -2).contiguous()


class RandomTranspose(TransformPair):
    def sample(self, generator):
        return Transpose()


def _logged_microbatches(algo, model, x, count):
    state = _state(model, {'image': x})
    memory = InMemoryLogger()
    logger = Logger(state, destinations=[memory])
    memory.init(state, logger)
    algo.apply(Event.INIT, state, logger)
    seen = []
    for _ in range(count):
        state.timestamp = state.timestamp.to_next_batch()
        algo.apply(Event.BATCH_START, state, logger)
        algo.apply(Event.BEFORE_TRAIN_BATCH, state, logger)
        seen.append((algo.draw(algo._seed, int(state.timestamp.batch), 0), _run_microbatch(algo, state, logger)))
        algo.apply(Event.AFTER_TRAIN_BATCH, state, logger)
    return seen, memory, state


def test_a_user_defined_pair_decodes_tau_z_and_is_compared_with_tau_x():
    model = ComposerAutoencoderKL(tiny_vae(), VAEGANLoss(lpips_weight=0, disc_weight=0), sample_posterior=False)
    x = torch.rand(1, 3, 32, 48) * 2 - 1
    algo = EquivarianceAlgorithm(p_equivariance=1.0, transforms={RandomTranspose(): 1.0})
    seen, memory, state = _logged_microbatches(algo, model, x, 1)
    assert algo.transform == Transpose() and torch.equal(seen[0][1], x.transpose(-1, -2))
    with torch.no_grad():
        expected = model.vae.decode(model.vae.encode(x).latent_dist.mode().transpose(-1, -2)).sample
    torch.testing.assert_close(state.outputs['reconstruction'], expected)
    assert torch.equal(state.batch['image'], x)  # restored after the loss


def test_a_menu_logs_fixed_keys_with_the_entry_and_restores_the_batch():
    model = ComposerAutoencoderKL(tiny_vae(), VAEGANLoss(lpips_weight=0, disc_weight=0))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    menu = {'scale_rotate': 1.0, 'hflip': 1.0, 'crop': 1.0, 'translate': 1.0}
    algo = EquivarianceAlgorithm(transforms=menu)
    seen, memory, state = _logged_microbatches(algo, model, x, 12)
    keys = {'eqvae/branch', 'eqvae/scale_h', 'eqvae/scale_w', 'eqvae/rotation_deg', 'eqvae/transform'}
    assert all(len(memory.data[key]) == 12 for key in keys) and keys <= set(memory.data)
    entries = [value for _, value in memory.data['eqvae/transform']]
    for ((branch, tau), image), entry in zip(seen, entries):
        expected_entry = (SpatialTransform, Flip, LatentCrop, LatentTranslation).index(type(tau))
        assert entry == (expected_entry if branch == Branch.EQUIVARIANCE else -1)
        if branch == Branch.EQUIVARIANCE and not isinstance(tau, SpatialTransform):
            assert torch.equal(image, tau.apply_to_image(x, 8))
    assert len({entry for entry in entries if entry >= 0}) >= 3
    assert torch.equal(state.batch['image'], x)


def test_the_target_size_check_covers_the_smallest_crop():
    assert EquivarianceAlgorithm().target_scales == 'grid'
    algo = EquivarianceAlgorithm(scales=[0.5], transforms={'scale_rotate': 1.0, 'crop': {'min_fraction': 0.25}})
    assert algo.target_scales == (0.25,)
    algo._min_size, algo._factor = 24, 8  # as INIT resolves them
    algo._check_target_size((128, 128))  # 16 latent cells x 0.25 = 4 cells = 32 px: fine
    with pytest.raises(ValueError, match='smallest scale 0.25'):
        algo._check_target_size((64, 64))  # 8 x 0.25 = 2 cells = 16 px < 24 (scale 0.5 alone would give 32)


def test_yaml_names_a_menu_and_a_registered_pair_and_bad_entries_name_the_key(monkeypatch):
    monkeypatch.setitem(TRANSFORM_PAIRS, 'transpose', RandomTranspose)
    spec = {'equivariance': {'transforms': {'scale_rotate': 1.0, 'hflip': 0.5, 'transpose': {'weight': 0.5}}}}
    (algo,) = _instantiate(ALGORITHMS, 'algorithms', spec)
    assert algo._menu.names == ['scale_rotate', 'hflip', 'transpose'] and algo._menu.weights == [1.0, 0.5, 0.5]
    for transforms, message in (
        ({'shear': 1.0}, "unknown transform 'shear'"),
        ({'hflip': -1.0}, 'must be non-negative'),
        ({'hflip': 0.0}, 'no entry has a positive weight'),
        ({'crop': {'weight': 1.0, 'min_fraction': 2.0}}, 'crop: min_fraction must be in'),
    ):
        with pytest.raises(ConfigError, match=f'algorithms.equivariance.transforms: .*{message}'):
            _instantiate(ALGORITHMS, 'algorithms', {'equivariance': {'transforms': transforms}})


def test_in_a_trainer_the_train_metric_compares_d_of_tau_z_with_the_menus_tau_x():
    from tests.test_integration_trainers import _diffusion_trainer, _images

    equivariance = EquivarianceAlgorithm(p_equivariance=1.0, transforms={'crop': 1.0, 'hflip': 1.0})
    model, trainer = _diffusion_trainer([equivariance], microbatch=4, max_duration='2ba')
    trainer.fit()
    taus = [equivariance.draw(trainer.state.seed, batch, 0)[1] for batch in range(2)]
    assert all(isinstance(tau, (Flip, LatentCrop)) for tau in taus) and len(model.metric_pairs) == 2
    images = _images(size=96)
    for (prediction, target), tau, batch in zip(model.metric_pairs, taus, (images[:4], images[4:])):
        torch.testing.assert_close(target, tau.apply_to_image(batch, 8))
        assert prediction.shape == target.shape
