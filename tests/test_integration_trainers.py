"""EquivarianceAlgorithm in trainers people already have: train metrics, other algorithms, exceptions.

The mosaicml/diffusion model and algorithm are reproduced in ``tests/diffusion_replica.py``; every
run goes through Composer's real training loop (which deep-copies the batch before
``BEFORE_FORWARD`` and updates train metrics on that copy after the backward).
"""

from __future__ import annotations

import pytest
import torch
from composer import Trainer
from composer.core import Event, State
from composer.devices import DeviceCPU
from composer.loggers import Logger
from torch.utils.data import DataLoader
from torchmetrics import MeanSquaredError

from eqvae_composer import ComposerAutoencoderKL, EquivarianceAlgorithm, VAEGANLoss
from eqvae_composer.algorithms.equivariance import Branch, apply_to_image, downscale_image, smallest_target_size
from eqvae_composer.models import AutoencoderKLForward
from tests.conftest import tiny_vae
from tests.diffusion_replica import AutoEncoderLoss, ComposerDiffusersAutoEncoder, DiscriminatorSchedule, optimizer_for


def _images(n=8, size=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


class RecordingDiffusersAutoEncoder(ComposerDiffusersAutoEncoder):
    """Their model, recording the prediction and target of each update of the Trainer's train metric."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_metric: MeanSquaredError | None = None  # the Trainer's copy, set once it exists
        self.metric_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update_metric(self, batch, outputs, metric):
        if metric is self.train_metric:
            self.metric_pairs.append((outputs['x_recon'].detach().clone(), batch[self.input_key].clone()))
        # On CPU, torch returns this tiny VAE's decoder output in channels-last strides (its 1x1
        # post_quant_conv makes the memory format ambiguous), which MeanSquaredError's `.view(-1)`
        # rejects with or without EquivarianceAlgorithm: not what these tests are about.
        outputs = {**outputs, 'x_recon': outputs['x_recon'].contiguous()}
        return super().update_metric(batch, outputs, metric)


def _diffusion_trainer(algorithms, size=96, microbatch=2, max_duration='3ba', eval_loader=None):
    torch.manual_seed(0)
    model = RecordingDiffusersAutoEncoder(
        tiny_vae(),
        AutoEncoderLoss(lpips_weight=0.25, discriminator_num_filters=8, discriminator_num_layers=3),
    )
    images = [{'image': im} for im in _images(size=size)]
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(images, batch_size=4),
        eval_dataloader=eval_loader,
        max_duration=max_duration,
        optimizers=optimizer_for(model),
        algorithms=algorithms,
        device_train_microbatch_size=microbatch,
        device='cpu',
        seed=7,
        progress_bar=False,
        log_to_console=False,
    )
    model.train_metric = trainer.state.train_metrics['MeanSquaredError']
    return model, trainer


def test_mosaicml_diffusion_model_trains_with_its_train_metric_and_discriminator_schedule():
    # 96 px: the smallest grid scale gives 24 px targets, the least their 3-layer PatchGAN takes.
    equivariance = EquivarianceAlgorithm(p_equivariance=0.75, p_lowres=1.0)
    model, trainer = _diffusion_trainer([DiscriminatorSchedule('1ba'), equivariance])
    trainer.fit()

    assert len(model.metric_pairs) == 6  # every microbatch of 3 batches x 2 updated the train metric
    shapes = {pred.shape for pred, _ in model.metric_pairs}
    assert any(shape[-1] < 96 for shape in shapes)  # transformed microbatches were among them
    for prediction, target in model.metric_pairs:
        assert prediction.shape == target.shape  # a consistent pair: D(tau(z)) against tau(x)
    assert torch.isfinite(trainer.state.train_metric_values['MeanSquaredError'])


def test_train_metric_target_is_tau_x_of_the_microbatch():
    equivariance = EquivarianceAlgorithm(p_equivariance=1.0, scales=[0.5], rotations=[1])
    model, trainer = _diffusion_trainer([equivariance], microbatch=4, max_duration='1ba')
    trainer.fit()
    ((prediction, target),) = model.metric_pairs
    expected = apply_to_image(_images(size=96)[:4], equivariance.transform, 8)
    torch.testing.assert_close(target, expected)
    assert prediction.shape == (4, 3, 48, 48)


def test_low_resolution_microbatches_give_the_train_metric_the_downscaled_input():
    equivariance = EquivarianceAlgorithm(p_equivariance=0.0, p_lowres=1.0, scales=[0.5])
    model, trainer = _diffusion_trainer([equivariance], microbatch=4, max_duration='1ba')
    trainer.fit()
    ((prediction, target),) = model.metric_pairs
    torch.testing.assert_close(target, downscale_image(_images(size=96)[:4], 0.5, 0.5, 8))
    assert prediction.shape == target.shape == (4, 3, 48, 48)


def test_eval_after_training_compares_untransformed_pairs():
    equivariance = EquivarianceAlgorithm(p_equivariance=1.0)
    eval_loader = DataLoader([{'image': im} for im in _images(n=4, seed=1)], batch_size=4)
    model, trainer = _diffusion_trainer([equivariance], max_duration='1ba', eval_loader=eval_loader)
    trainer.fit()
    assert torch.isfinite(trainer.state.eval_metric_values['PeakSignalNoiseRatio'])


def test_targets_below_the_declared_minimum_stop_before_the_first_forward():
    # At 64 px the grid's 8/32 gives 16 px targets; their 3-layer PatchGAN needs 24.
    assert smallest_target_size(64, 8, 'grid') == 16 and smallest_target_size(96, 8, 'grid') == 24
    equivariance = EquivarianceAlgorithm(min_target_size=24)
    model, trainer = _diffusion_trainer([equivariance], size=64)
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    with pytest.raises(ValueError, match=r'16 px.*at least 24 px.*96 px.*0\.375'):
        trainer.fit()
    assert forwards == []


def test_our_model_declares_its_discriminator_minimum():
    model = ComposerAutoencoderKL(tiny_vae(), VAEGANLoss(lpips_weight=0, disc_num_filters=8, disc_num_layers=3))
    assert model.min_target_size == 24
    images = [{'image': im} for im in _images(size=64)]
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(images, batch_size=4),
        max_duration='1ba',
        optimizers=torch.optim.Adam(model.param_groups(lr=1e-4)),
        algorithms=[EquivarianceAlgorithm()],
        device='cpu',
        progress_bar=False,
        log_to_console=False,
    )
    with pytest.raises(ValueError, match='disc_num_layers'):
        trainer.fit()


# --- state after an exception --------------------------------------------------------------------------


class FailingOnce(ComposerAutoencoderKL):
    """Raises (after the decoder has run on tau(z)) the first time ``fail_in`` is reached."""

    def __init__(self, *args, fail_in='forward', message='boom', **kwargs):
        super().__init__(*args, **kwargs)
        self.fail_in, self.message, self.failed = fail_in, message, False
        self.decoded_shapes: list[tuple[int, ...]] = []
        self.vae.decoder.register_forward_pre_hook(lambda m, a: self.decoded_shapes.append(tuple(a[0].shape)))

    def _maybe_fail(self, where):
        if self.fail_in == where and not self.failed:
            self.failed = True
            raise RuntimeError(self.message)

    def forward(self, batch):
        outputs = super().forward(batch)
        self._maybe_fail('forward')
        return outputs

    def loss(self, outputs, batch):
        self._maybe_fail('loss')
        return super().loss(outputs, batch)


def _state(model, batch):
    state = State(model=model, rank_zero_seed=0, run_name='test', device=DeviceCPU())
    state.batch = batch
    return state


@pytest.mark.parametrize('fail_in', ['forward', 'loss'])
def test_an_exception_mid_microbatch_leaves_no_armed_hook_or_swapped_image(fail_in):
    model = FailingOnce(tiny_vae(), VAEGANLoss(lpips_weight=0, disc_weight=0), fail_in=fail_in)
    x = _images(n=2, size=64)
    state = _state(model, {'image': x})
    logger = Logger(state)
    algo = EquivarianceAlgorithm(p_equivariance=1.0, scales=[0.5])
    algo.apply(Event.INIT, state, logger)

    algo.apply(Event.BEFORE_FORWARD, state, logger)
    with pytest.raises(RuntimeError, match='boom'):
        state.outputs = state.model(state.batch)
        algo.apply(Event.AFTER_FORWARD, state, logger)
        algo.apply(Event.BEFORE_LOSS, state, logger)
        state.model.loss(state.outputs, state.batch)
    assert model.decoded_shapes[-1][-1] == 4  # the failed microbatch decoded tau(z): 8 cells at scale 0.5

    # A forward outside training (a notebook, a callback, an eval) decodes z, not tau(z).
    model.eval()
    with torch.no_grad():
        assert model.eval_forward({'image': x})['reconstruction'].shape == x.shape
    assert model.decoded_shapes[-1][-1] == 8
    model.train()

    # The same batch retried: it holds x again, and the new microbatch starts clean.
    algo.apply(Event.BEFORE_FORWARD, state, logger)
    assert state.batch['image'] is x
    state.outputs = state.model(state.batch)
    algo.apply(Event.AFTER_FORWARD, state, logger)
    algo.apply(Event.BEFORE_LOSS, state, logger)
    assert state.outputs['reconstruction'].shape == state.batch['image'].shape == (2, 3, 32, 32)
    state.model.loss(state.outputs, state.batch)
    algo.apply(Event.AFTER_LOSS, state, logger)
    assert state.batch['image'] is x


def test_an_out_of_memory_retry_redraws_from_a_clean_state():
    """Composer's auto-microbatching retry (the real loop, with a simulated CUDA OOM on CPU)."""
    model = FailingOnce(tiny_vae(), VAEGANLoss(lpips_weight=0, disc_weight=0), message='CUDA out of memory')
    images = [{'image': im} for im in _images(n=4, size=64)]
    algo = EquivarianceAlgorithm(p_equivariance=1.0)
    trainer = Trainer(
        model=model,
        train_dataloader=DataLoader(images, batch_size=4),
        max_duration='1ba',
        optimizers=torch.optim.Adam(model.param_groups(lr=1e-4)),
        algorithms=[algo],
        device_train_microbatch_size=4,
        device='cpu',
        progress_bar=False,
        log_to_console=False,
    )
    trainer.state.auto_microbatching = True  # Composer allows 'auto' on GPUs only; the retry loop is the same
    trainer.fit()
    assert model.failed and trainer.state.device_train_microbatch_size == 2  # it retried with half the size
    # The retry's first microbatch drew what a clean first pass draws (pass 0, microbatch 0).
    assert algo.draw(trainer.state.seed, 0, 1, 0) == (algo.branch, algo.transform)
    assert algo.branch == Branch.EQUIVARIANCE


# --- the autoencoder wrapper -------------------------------------------------------------------------


def test_direct_decodes_keep_nothing_and_wrapping_twice_leaves_no_hook():
    vae = tiny_vae()
    first, second = AutoencoderKLForward(vae), AutoencoderKLForward(vae)
    x = _images(n=1, size=32)
    with torch.no_grad():
        for _ in range(3):
            vae.decode(torch.randn(1, 4, 4, 4))
        outputs = second(x)
    assert outputs['last_layer_input'].shape[0] == 1  # only its own decode, not the three direct ones
    assert len(vae.decoder.conv_out._forward_hooks) == 0
    assert first is not second
