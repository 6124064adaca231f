"""The training benchmark compares like with like: its reference-style loop computes our losses and gradients."""

import json
import os
import subprocess
import sys

import pytest
import torch

from eqvae_composer.algorithms.equivariance.transforms import Branch, SpatialTransform
from eqvae_composer.benchmarks import flops
from eqvae_composer.benchmarks import train_step as bench
from tests.test_loss import TinyPerceptual

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'bench_train.py')


def _record_steps(optimizer, into: dict, model) -> None:
    """Replace ``optimizer.step`` by a copy of its parameters' gradients: the weights stay put."""
    names = {id(p): n for n, p in model.named_parameters()}

    def step():
        for group in optimizer.param_groups:
            for p in group['params']:
                if p.grad is not None:
                    into[names[id(p)]] = p.grad.clone()

    optimizer.step = step


@pytest.mark.parametrize(
    'branch, transform',
    [
        (Branch.EQUIVARIANCE, SpatialTransform(0.5, 0.5, 1)),
        (Branch.EQUIVARIANCE, SpatialTransform(0.75, 0.75, 3)),
        (Branch.LOW_RES, SpatialTransform(0.5, 0.5)),
        (Branch.FULL_RES, SpatialTransform()),
    ],
)
def test_reference_loop_gives_our_losses_and_gradients(monkeypatch, branch, transform):
    # Both loops see the same transform for every forward (the reference's second forward included)
    # and decode the posterior mean, so the only difference left is how the step is computed.
    monkeypatch.setattr(bench, 'draw', lambda step, microbatch=0, p_equivariance=0.5, seed=17: (branch, transform))
    cfg = bench.BenchConfig(width=8, layers_per_block=1, disc_filters=8, disc_layers=1, batch_size=2, resolution=32)
    perceptual = TinyPerceptual()
    images = bench.images_for_step(0, cfg)

    ours = bench.build_model(cfg, perceptual, sample_posterior=False)
    plain = bench.PlainLoop(ours, cfg, bench._autocast(cfg))
    ours_grads: dict = {}
    _record_steps(plain.optimizer, ours_grads, ours)
    ours_losses = plain.step(0, images)

    reference_model = bench.build_model(cfg, perceptual, sample_posterior=False)
    reference = bench.ReferenceLoop(reference_model, cfg, bench._autocast(cfg), sample_posterior=False)
    reference_grads: dict = {}
    _record_steps(reference.opt_ae, reference_grads, reference_model)
    _record_steps(reference.opt_disc, reference_grads, reference_model)
    reference_losses = reference.step(0, images)

    assert reference_losses['disc_weight'].item() > 0  # the adaptive weight is live
    assert ours_losses['disc_weight'].item() == pytest.approx(reference_losses['disc_weight'].item(), rel=1e-4)
    # The logged total is the autoencoder's loss, as the reference's; the hinge loss is 'disc'.
    assert ours_losses['total'].item() == pytest.approx(reference_losses['ae'].item(), rel=1e-5)
    assert ours_losses['disc'].item() == pytest.approx(reference_losses['disc'].item(), rel=1e-5)
    for key in ('nll', 'kl', 'g'):
        assert ours_losses[key].item() == pytest.approx(reference_losses[key].item(), rel=1e-5, abs=1e-7), key
    assert set(ours_grads) == set(reference_grads)
    for name, grad in reference_grads.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-3, atol=max(1e-4 * scale, 2e-5), msg=name)


class _CountGeneratedImages(torch.overrides.TorchFunctionMode):
    """Counts the images ``torch.rand`` produces (``3 x side x side`` values each) while active."""

    def __init__(self, side: int) -> None:
        super().__init__()
        self.side, self.images = side, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.rand:
            self.images += out.numel() // (3 * self.side**2)
        return out


def test_the_trainer_data_generates_each_image_once():
    # The Trainer's DataLoader runs inside ours' timed region; the reference loop generates each step's
    # batch once. Building the whole batch per sample (as before) made ours pay batch_size^2 images a step.
    cfg = bench.BenchConfig(batch_size=4, resolution=8)
    loader = torch.utils.data.DataLoader(bench._StepImages(cfg, num_steps=3), batch_size=cfg.batch_size)
    with _CountGeneratedImages(cfg.resolution) as counter:
        batches = [batch['image'] for batch in loader]
    assert counter.images == 3 * cfg.batch_size
    for step, batch in enumerate(batches):  # and the same images the plain loops get
        torch.testing.assert_close(batch, bench.images_for_step(step, cfg), rtol=0, atol=0)


def test_ours_and_the_reference_share_an_adam_kernel_and_reference_shipped_keeps_pytorchs():
    cfg = bench.BenchConfig(width=8, layers_per_block=1, disc_filters=8, disc_layers=1, resolution=32)
    ours = bench.build_contender('plain', cfg, None, 1).loop.optimizer  # make_optimizer, as the Trainer's
    reference = bench.build_contender('reference', cfg, None, 1).loop
    shipped = bench.build_contender('reference_shipped', cfg, None, 1).loop
    assert ours.defaults['fused'] is True
    assert reference.opt_ae.defaults['fused'] is True and reference.opt_disc.defaults['fused'] is True
    for optimizer in (shipped.opt_ae, shipped.opt_disc):  # torch.optim.Adam(): PyTorch picks the kernel
        assert not optimizer.defaults['fused'] and optimizer.defaults['foreach'] is None
    assert 'reference_shipped' in bench.DEFAULT_CONTENDERS


def test_draws_follow_the_algorithm_mix():
    branches = [bench.draw(step)[0] for step in range(400)]
    assert 0.4 < branches.count(Branch.EQUIVARIANCE) / 400 < 0.6
    assert all(bench.draw(step) == bench.draw(step) for step in range(5))  # stateless


def test_memory_measurement_counts_the_contender():
    # As the script measures it: a fresh process with a fixed mmap threshold. In this process, heap
    # space freed by earlier tests would be reused without raising the resident size.
    code = (
        'import json; from eqvae_composer.benchmarks import train_step as bench; '
        'bench.memory_steps = lambda max_steps=8: 1; '
        'cfg = bench.BenchConfig(width=8, layers_per_block=1, disc_filters=8, disc_layers=1, resolution=32); '
        "print(json.dumps(bench.measure_memory('plain', cfg, None)))"
    )
    env = {**os.environ, 'MALLOC_MMAP_THRESHOLD_': str(128 * 1024), 'PYTHONPATH': ROOT}
    out = subprocess.run([sys.executable, '-c', code], check=True, capture_output=True, text=True, env=env).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result['peak_mib'] > 0 and result['steps'] == 1


def test_flop_counter_uses_the_matmul_formula():
    a, b = torch.randn(4, 8), torch.randn(8, 16)
    with flops.FlopCounter() as counter:
        a @ b
    assert counter.total == 2 * 4 * 8 * 16  # a multiply and an add per term


@pytest.mark.slow
def test_flop_count_of_a_small_step(monkeypatch):
    monkeypatch.setattr(flops, 'GRID_SCALES', (0.5, 0.75))  # two scales instead of 24: the same code, faster
    result = flops.count_step_flops(width=8, resolution=64)
    # The reference runs a second full forward for its discriminator step; low-res and smaller
    # equivariance targets make the branch mix cheaper than full resolution.
    assert 0 < result['vae_fwd_bwd'] < result['ours_full_res'] < result['reference_full_res']
    assert result['ours_branch_mix'] < result['ours_full_res']
    assert result['reference_branch_mix'] < result['reference_full_res']


@pytest.mark.slow
def test_smoke_run_compares_all_contenders(tmp_path):
    out = tmp_path / 'bench.json'
    proc = subprocess.run(
        [sys.executable, SCRIPT, '--smoke', '--json', str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'ours/reference' in proc.stdout and 'RANDOM VGG16' in proc.stdout
    import json

    result = json.loads(out.read_text())['resolutions']['64']
    assert set(result['median_images_per_second']) == set(bench.DEFAULT_CONTENDERS)
    assert set(result['ratios']) == {'ours/reference', 'ours/reference_shipped', 'ours/ours_eq_off', 'ours/plain'}


@pytest.mark.slow
def test_smoke_profile_breaks_the_step_down():
    proc = subprocess.run(
        [sys.executable, SCRIPT, '--smoke', '--profile'], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'convolution backward' in proc.stdout and 'share of CPU self time' in proc.stdout
