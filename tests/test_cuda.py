"""On a CUDA device: bf16 numerics, fused Adam, the EQ-VAE hook and transforms, FSDP on NCCL, eval.py, train.py.

Every test is marked ``cuda`` and skipped where CUDA is unavailable (CI, the developers' machines);
``scripts/gpu_check.sh`` runs them on a lent GPU (docs/OPERATIONS.md, "Checking on a GPU").
Comparisons with the CPU turn TF32 off, so that both sides compute in fp32.
"""

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from composer.core import Event, State
from composer.devices import DeviceCPU, DeviceGPU
from composer.loggers import Logger
from diffusers import AutoencoderKL

from eqvae_composer.algorithms.equivariance import EquivarianceAlgorithm
from eqvae_composer.algorithms.equivariance.transforms import (
    SpatialTransform,
    apply_to_image,
    apply_to_latent,
    downscale_image,
)
from eqvae_composer.models import ComposerAutoencoderKL, VAEGANLoss
from eqvae_composer.train import OptimizerConfig, build_optimizer, train
from tests.conftest import tiny_vae
from tests.test_algorithm import _run_microbatch
from tests.test_loss import TinyPerceptual
from tests.test_train import run_config, write_mds

REPO = Path(__file__).resolve().parents[1]
RANKS_SCRIPT = REPO / 'tests' / 'distributed' / 'train_ranks.py'

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]


@contextlib.contextmanager
def _no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _model(seed: int = 3) -> ComposerAutoencoderKL:
    loss = VAEGANLoss(lpips=TinyPerceptual(), disc_num_filters=8, disc_num_layers=2)
    return ComposerAutoencoderKL(tiny_vae(seed=seed), loss, sample_posterior=False)


def _pythonpath() -> str:
    """The repository first, then what the caller had (gpu_check.sh's carried wheels)."""
    return os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')]))


def test_bf16_autocast_keeps_losses_and_the_adaptive_weight_in_fp32():
    x = torch.rand(2, 3, 64, 64, device='cuda') * 2 - 1
    model = _model().cuda()
    model.loss_fn.lpips.cuda()
    with torch.no_grad():
        fp32 = model.loss(model({'image': x}), {'image': x})
    with torch.autocast('cuda', dtype=torch.bfloat16):
        outputs = model({'image': x})
        assert outputs['reconstruction'].dtype == torch.bfloat16  # the networks do run in bf16
        losses = model.loss(outputs, {'image': x})
    assert all(v.dtype == torch.float32 for v in losses.values())
    assert losses['disc_weight'].item() > 0  # the adaptive weight is live under autocast
    # bf16 activations, fp32 loss arithmetic: close to the fp32 values, not bit-equal
    assert losses['nll'].item() == pytest.approx(fp32['nll'].item(), rel=2e-2)
    losses['total'].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_fused_adam_on_cuda_steps_like_the_default_kernel():
    models = [_model().cuda() for _ in range(2)]
    fused = build_optimizer(models[0], OptimizerConfig())
    default = build_optimizer(models[1], OptimizerConfig(fused=False))  # PyTorch's choice: foreach on CUDA
    assert fused.defaults['fused'] and not default.defaults['fused']
    generator = torch.Generator('cuda').manual_seed(0)
    for _ in range(3):
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            a.grad = torch.randn(a.shape, device='cuda', generator=generator)
            b.grad = a.grad.clone()
        fused.step()
        default.step()
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.equal(a, _model().cuda().get_parameter(name)), name  # it stepped


@pytest.mark.parametrize(
    'transform', [SpatialTransform(0.5, 0.75, 1), SpatialTransform(0.25, 0.25, 2), SpatialTransform(1.0, 1.0, 3)]
)
def test_transforms_on_cuda_equal_the_cpu(transform):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(apply_to_image(x.cuda(), transform, 8).cpu(), apply_to_image(x, transform, 8))
    torch.testing.assert_close(apply_to_latent(z.cuda(), transform).cpu(), apply_to_latent(z, transform))
    torch.testing.assert_close(downscale_image(x.cuda(), 0.5, 0.5, 8).cpu(), downscale_image(x, 0.5, 0.5, 8))


def test_equivariance_branch_on_cuda_equals_the_cpu_and_leaves_no_hook():
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    results = {}
    with _no_tf32():
        for device in ('cpu', 'cuda'):
            model = ComposerAutoencoderKL(
                tiny_vae(), VAEGANLoss(lpips_weight=0, disc_num_filters=8, disc_num_layers=2)
            ).to(device)
            state = State(
                model=model, rank_zero_seed=0, run_name='cuda', device=DeviceGPU() if device == 'cuda' else DeviceCPU()
            )
            state.batch = {'image': x.to(device)}
            logger = Logger(state)
            algo = EquivarianceAlgorithm(p_equivariance=1.0, scales=[0.5], rotations=[1])
            algo.apply(Event.INIT, state, logger)
            torch.manual_seed(0)  # the posterior sample
            seen = _run_microbatch(algo, state, logger)
            conv_out = model.vae.decoder.conv_out
            assert not conv_out._forward_hooks  # the last-layer hook lived only for its decode
            assert state.outputs['last_layer_input'].device.type == device
            results[device] = (seen, state.outputs['reconstruction'].detach(), state.loss['total'].detach())
    assert results['cuda'][0].shape == (2, 3, 32, 32)  # tau(x) at scale 0.5, rotated
    for got, expected in zip(results['cuda'], results['cpu']):
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)


def _launch_ranks(out: Path, mode: str, fsdp_version: str) -> dict[str, torch.Tensor]:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, 'PYTHONPATH': _pythonpath(), 'FSDP_VERSION': fsdp_version, 'PRECISION': 'fp32'}
    cmd = [sys.executable, '-m', 'composer.cli.launcher', '-n', '1', str(RANKS_SCRIPT), str(out), mode, '4']
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    init = torch.load(out / f'{mode}_w1_init.pt')
    final = torch.load(out / f'{mode}_w1_lr1_rank0.pt')
    return {name: final[name] - init[name] for name in init if init[name].is_floating_point()}


@pytest.mark.parametrize('fsdp_version', ['1', '2'])
def test_fsdp_on_nccl_at_world_size_one_trains_like_one_plain_process(fsdp_version, tmp_path):
    # At world size 1 FSDP1 switches FULL_SHARD to NO_SHARD (torch clamps it), so this checks Composer's
    # FSDP wrapping on NCCL, not sharded weights: tests/test_fsdp1_loss.py shards on two CPU processes.
    with_fsdp = _launch_ranks(tmp_path / f'fsdp{fsdp_version}', 'fsdp', fsdp_version)
    plain = _launch_ranks(tmp_path / 'plain', 'ddp', fsdp_version)
    trained = [n for n, d in plain.items() if d.abs().max() > 0]
    assert any('decoder' in n for n in trained) and any('discriminator' in n for n in trained)
    for name in trained:
        if name.endswith(('running_mean', 'running_var')):
            continue
        # the SGD updates themselves (weight deltas), so a wrong gradient cannot hide in the weights
        scale = plain[name].abs().max().item()
        torch.testing.assert_close(with_fsdp[name], plain[name], rtol=1e-2, atol=1e-2 * scale, msg=name)


def test_eval_script_on_cuda_gives_the_cpu_metrics(tmp_path):
    import numpy as np
    from PIL import Image

    tiny_vae(seed=1).save_pretrained(tmp_path / 'vae')
    rng = np.random.default_rng(0)
    (tmp_path / 'images').mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / 'images' / f'{i}.png')
    metrics = {}
    for device in ('cpu', 'gpu'):
        out = tmp_path / f'{device}.json'
        cmd = [
            sys.executable,
            str(REPO / 'scripts' / 'eval.py'),
            '--vae',
            str(tmp_path / 'vae'),
            '--data',
            str(tmp_path / 'images'),
            '--out',
            str(out),
            '--resolution',
            '32',
            '--batch-size',
            '2',
            '--metrics',
            'psnr,ssim,equivariance',
            '--device',
            device,
            '--no-progress',
        ]
        # NVIDIA_TF32_OVERRIDE=0: the GPU side in fp32, like the CPU side
        env = {**os.environ, 'PYTHONPATH': _pythonpath(), 'NVIDIA_TF32_OVERRIDE': '0'}
        result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        metrics[device] = json.loads(out.read_text())['metrics']
    assert set(metrics['gpu']) == set(metrics['cpu'])
    for key, value in metrics['cpu'].items():
        # uint8 quantisation can flip a pixel where CPU and GPU round differently: close, not equal
        assert metrics['gpu'][key] == pytest.approx(value, rel=1e-2, abs=1e-4), key


def test_train_on_cuda_in_bf16_with_the_algorithm_exports_a_loadable_vae(tmp_path):
    train_dir, val_dir = write_mds(tmp_path / 'train', 16), write_mds(tmp_path / 'val', 4, seed=1)
    cfg = run_config(tmp_path, train_dir, val_dir, precision='amp_bf16')
    trainer = train(cfg)
    assert trainer.state.device.name == 'gpu' and str(trainer.state.precision.value) == 'amp_bf16'
    assert trainer.state.optimizers[0].defaults['fused']
    assert next(trainer.state.model.parameters()).is_cuda
    metrics = json.loads(Path(cfg.metrics_file).read_text())['metrics']
    assert {'PSNR', 'SSIM', 'EquivarianceErrorR', 'EquivarianceErrorS'} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    vae = AutoencoderKL.from_pretrained(cfg.export_folder)
    assert all(torch.isfinite(p).all() for p in vae.parameters())
    trained = trainer.state.model.vae.decoder.conv_out.weight.detach().cpu()
    torch.testing.assert_close(vae.decoder.conv_out.weight, trained)  # the trained weights, exported from the GPU
