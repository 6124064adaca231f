"""Features that users run together: the transform menu, the loss menu, reflection padding and EMA (with joint or
alternating GAN updates, gradient checkpointing), stopped mid-epoch and resumed through ``train()``, end where an
uninterrupted run ends, bit for bit; reflection padding's smallest latent; a decoder stage with checkpointing.

The decoder-only stage with EMA under FSDP2 and DDP is in tests/test_ema_resume.py (its 2-rank launch).
"""

import json

import pytest
import torch
from diffusers import AutoencoderKL
from omegaconf import OmegaConf
from safetensors.torch import load_file

from eqvae_composer import ComposerAutoencoderKL, VAEGANLoss
from eqvae_composer.algorithms import EMA, EquivarianceAlgorithm
from eqvae_composer.algorithms.equivariance import Branch
from eqvae_composer.checkpoints import load_autoencoder, trained_autoencoder
from eqvae_composer.models import AlternatingAdam
from eqvae_composer.models.trainable import freeze_except
from eqvae_composer.padding import PADDING_CONFIG_KEY, padded_convolutions, set_padding_mode, smallest_image_side
from eqvae_composer.train import ConfigError, train
from tests.conftest import tiny_vae
from tests.test_train import mds, run_config  # noqa: F401 (mds is a fixture)

MAX_BATCHES, STOP_AT = 4, 2  # 16 samples in batches of 4: the stop is mid-epoch
WEIGHTS = 'diffusion_pytorch_model.safetensors'
MENU = {'scale_rotate': 1.0, 'hflip': 0.5, 'crop': 0.5, 'translate': 0.5}
# At 32 px (4 latent cells, f8) reflection padding needs scales of at least 0.5: 2 cells (see the last tests).
SCALES = [0.5, 0.75]


def _menu_config(tmp_path, train_dir, case: str, max_batches: int, gan_updates: str):
    cfg = run_config(
        tmp_path,
        train_dir,
        None,
        run_name=case,
        model={
            'vae': {'padding_mode': 'reflect'},
            'loss': {'l1_weight': 1.0, 'l2_weight': 0.5, 'ssim_weight': 0.5},
            # The reference's alternating passes recompute the VAE: with checkpointing, three times.
            'gradient_checkpointing': gan_updates == 'alternating',
        },
        optimizer={'gan_updates': gan_updates},
        device_train_microbatch_size=2,  # two draws per batch
        eval_loader=None,
        metrics_file=None,
        export_folder=str(tmp_path / case / 'vae'),
        save_folder=str(tmp_path / case / 'checkpoints'),
        save_interval=f'{STOP_AT}ba',
        max_duration=f'{max_batches}ba',
        autoresume=True,
    )
    cfg.algorithms = OmegaConf.create(
        {'equivariance': {'p_equivariance': 0.75, 'scales': SCALES, 'transforms': MENU}, 'ema': {'half_life': '1ba'}}
    )
    return cfg


def _end_state(trainer) -> dict[str, torch.Tensor]:
    state = trainer.state
    tensors = {f'model.{k}': v.detach().clone() for k, v in state.model.state_dict().items()}
    optimizer = state.optimizers[0]
    params = [p for group in optimizer.param_groups for p in group['params']]
    for i, param in enumerate(params):
        tensors.update({f'optim.{i}.{k}': v.clone() for k, v in optimizer.state[param].items()})
    (ema,) = [a for a in state.algorithms if isinstance(a, EMA)]
    tensors.update({f'ema.{k}': v.clone() for k, v in ema.ema_model.named_parameters_dict.items()})
    return tensors


@pytest.mark.slow
@pytest.mark.parametrize('gan_updates', ['joint', 'alternating'])
def test_menus_with_reflection_padding_and_ema_resume_mid_epoch_bit_identical(tmp_path, mds, gan_updates):  # noqa: F811
    train_dir = mds[0]
    uninterrupted = train(_menu_config(tmp_path, train_dir, 'uninterrupted', MAX_BATCHES, gan_updates))
    expected = _end_state(uninterrupted)
    algorithm = next(a for a in uninterrupted.state.algorithms if isinstance(a, EquivarianceAlgorithm))
    passes = (0, 1) if gan_updates == 'alternating' else (0,)  # the discriminator's pass draws its own
    draws = [
        algorithm.draw(uninterrupted.state.seed, b, m, p) for b in range(MAX_BATCHES) for m in (0, 1) for p in passes
    ]
    drawn = {type(tau).__name__ for branch, tau in draws if branch == Branch.EQUIVARIANCE}

    stopped = train(_menu_config(tmp_path, train_dir, 'resumed', STOP_AT, gan_updates))
    assert int(stopped.state.timestamp.batch) == STOP_AT
    resumed = train(_menu_config(tmp_path, train_dir, 'resumed', MAX_BATCHES, gan_updates), fit=False)
    assert int(resumed.state.timestamp.batch) == STOP_AT  # it resumed from the checkpoint
    resumed.fit()
    got = _end_state(resumed)

    assert drawn - {'SpatialTransform'}, drawn  # the run drew from the menu, not only the paper's tau
    assert isinstance(resumed.state.optimizers[0], AlternatingAdam) == (gan_updates == 'alternating')
    assert got.keys() == expected.keys()
    differ = [k for k in expected if not torch.equal(expected[k], got[k])]
    assert not differ, differ[:5]
    convs = padded_convolutions(resumed.state.model.vae)
    assert convs and all(conv.padding_mode == 'reflect' for conv in convs)


@pytest.mark.slow
def test_ema_export_of_a_reflection_padded_run_records_the_mode_and_loads_it_back(tmp_path, mds):  # noqa: F811
    cfg = run_config(tmp_path, *mds, model={'vae': {'padding_mode': 'reflect'}}, eval_loader=None, metrics_file=None)
    cfg.algorithms = OmegaConf.create({'equivariance': {'scales': SCALES}, 'ema': {'half_life': '1ba'}})
    trainer = train(cfg)
    folder = tmp_path / 'run' / 'vae'
    assert json.loads((folder / 'config.json').read_text())[PADDING_CONFIG_KEY] == 'reflect'
    ema_vae, which = trained_autoencoder(trainer.state, ema=True)
    assert which == 'EMA'
    exported = load_file(folder / WEIGHTS)
    assert all(torch.equal(exported[k], v) for k, v in ema_vae.state_dict().items())
    loaded = load_autoencoder(str(folder))
    assert all(conv.padding_mode == 'reflect' for conv in padded_convolutions(loaded))
    assert isinstance(loaded, AutoencoderKL)


def test_reflection_padding_with_one_cell_targets_is_a_config_error_naming_the_padding(tmp_path, mds):  # noqa: F811
    # At 32 px the grid's smallest scale 8/32 gives 1-cell latents, which reflection padding cannot pad: before
    # this check the run stopped in its first such microbatch ('Padding size should be less than the
    # corresponding input dimension ... input [2, 4, 1, 1]').
    reflect = {'vae': {'padding_mode': 'reflect'}}
    with pytest.raises(ConfigError, match=r'8 px images.*at least 16 px.*reflection padding.*model.vae.padding_mode'):
        train(run_config(tmp_path, *mds, model=reflect, eval_loader=None), fit=False)
    with pytest.raises(ConfigError, match=r'EquivarianceErrorS encodes 32 px.*8 px.*at least 16 px.*64 or more'):
        train(run_config(tmp_path, *mds, model=reflect, algorithms={'equivariance': {'scales': SCALES}}), fit=False)
    train(run_config(tmp_path, *mds, eval_loader=None), fit=False)  # zero padding takes 1-cell latents


def test_the_reflection_minimum_is_two_latent_cells_and_only_with_reflection():
    vae = tiny_vae()
    assert smallest_image_side(vae, 8) == 1
    set_padding_mode(vae, 'replicate')  # pads any size
    assert smallest_image_side(vae, 8) == 1
    set_padding_mode(vae, 'reflect')
    assert smallest_image_side(vae, 8) == 16
    x = torch.rand(1, 4, 2, 2)
    vae.decode(x)  # two cells decode ...
    with pytest.raises(RuntimeError, match='Padding size should be less'):
        vae.decode(x[..., :1, :1])  # ... one does not


def test_a_decoder_stage_with_gradient_checkpointing_has_the_same_gradients_and_none_for_the_encoder():
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    grads = []
    for checkpointing in (False, True):
        vae = tiny_vae()
        freeze_except(vae, 'decoder')
        loss = VAEGANLoss(lpips_weight=0, disc_num_filters=8, disc_num_layers=1)
        model = ComposerAutoencoderKL(vae, loss, gradient_checkpointing=checkpointing)
        torch.manual_seed(0)  # the posterior sample
        model.loss(model({'image': x}), {'image': x})['total'].backward()
        grads.append({n: p.grad for n, p in vae.named_parameters()})
    plain, checkpointed = grads
    assert all(checkpointed[n] is None for n in checkpointed if n.startswith(('encoder.', 'quant_conv.')))
    trained = [n for n in plain if n.startswith(('decoder.', 'post_quant_conv.'))]
    assert all(checkpointed[n] is not None and torch.equal(plain[n], checkpointed[n]) for n in trained)
