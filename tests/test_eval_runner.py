"""The eval runner and scripts/eval.py end to end on a tiny diffusers folder and a small image folder."""

import json
import subprocess
import sys
from pathlib import Path
from unittest.mock import patch

import numpy as np
import pytest
import torch
from PIL import Image

from eqvae_composer.evaluation import (
    INCEPTION_FILENAME,
    EvalProtocol,
    ImageFolderDataset,
    build_eval_dataset,
    evaluate,
    format_markdown,
    load_inception,
    posterior_noise,
    rank_shard,
    to_uint8,
)
from eqvae_composer.weights import MissingWeightsError
from tests.conftest import tiny_vae, tiny_vq
from tests.test_eval_metrics import TinyFeatures
from tests.test_loss import TinyPerceptual

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION = 32


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    """A tiny diffusers folder and 6 images of assorted sizes and modes."""
    root = tmp_path_factory.mktemp('eval')
    tiny_vae(seed=1).save_pretrained(root / 'vae')
    rng = np.random.default_rng(0)
    (root / 'images' / 'sub').mkdir(parents=True)
    for i in range(6):
        pixels = rng.integers(0, 256, (36 + 4 * i, 48, 3), dtype=np.uint8)
        folder = root / 'images' / ('sub' if i % 2 else '')
        Image.fromarray(pixels).convert('L' if i == 3 else 'RGB').save(folder / f'{i}.{"jpg" if i % 3 else "png"}')
    return root


def test_rank_shard_partitions():
    shards = [rank_shard(11, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))
    assert [len(s) for s in shards] == [4, 4, 3]


def test_posterior_noise_depends_only_on_index():
    together = posterior_noise([3, 7, 9], (4, 2, 2), seed=5)
    assert torch.equal(together[1], posterior_noise([7], (4, 2, 2), seed=5)[0])
    assert not torch.equal(together[1], posterior_noise([7], (4, 2, 2), seed=6)[0])


def test_folder_dataset(assets):
    dataset = build_eval_dataset(assets / 'images', RESOLUTION)
    assert isinstance(dataset, ImageFolderDataset) and len(dataset) == 6
    image = dataset[3]['image']
    assert image.shape == (3, RESOLUTION, RESOLUTION) and image.min() >= -1 and image.max() <= 1
    with pytest.raises(FileNotFoundError):
        build_eval_dataset(assets / 'missing')


def test_evaluate_independent_of_batch_size_and_mode_differs(assets):
    vae = tiny_vae(seed=1)
    dataset = ImageFolderDataset(assets / 'images', RESOLUTION)
    kwargs = dict(metrics=['psnr', 'rfid'], protocol=EvalProtocol(RESOLUTION), inception=TinyFeatures(), progress=False)
    a = evaluate(vae, dataset, batch_size=4, **kwargs)['metrics']
    b = evaluate(vae, dataset, batch_size=5, **kwargs)['metrics']
    assert a == pytest.approx(b, rel=1e-5)
    mode = evaluate(
        vae, dataset, metrics=['psnr'], protocol=EvalProtocol(RESOLUTION, sample_posterior=False), progress=False
    )['metrics']
    assert mode['psnr'] != pytest.approx(a['psnr'], rel=1e-6)
    with pytest.raises(ValueError, match='Inception'):
        evaluate(vae, dataset, metrics=['rfid'], progress=False)


def test_eval_script_end_to_end(assets, tmp_path, capsys):
    from scripts.eval import main

    out = tmp_path / 'results.json'
    argv = [
        '--vae',
        str(assets / 'vae'),
        '--data',
        str(assets / 'images'),
        '--out',
        str(out),
        '--resolution',
        str(RESOLUTION),
        '--batch-size',
        '4',
        '--num-images',
        '5',
        '--no-progress',
        '--metrics',
        'psnr,ssim,equivariance,intrinsic_dim',
    ]
    assert main(argv) == 0
    results = json.loads(out.read_text())
    metrics = results['metrics']
    assert results['num_images'] == 5 and results['protocol']['sample_posterior'] is True
    for key in [
        'psnr',
        'ssim',
        'intrinsic_dim',
        'equivariance_error/R',
        'equivariance_error/S',
        'equivariance_error/rot90',
        'equivariance_error/scale0.25',
        'scaled_psnr/0.5',
    ]:
        assert np.isfinite(metrics[key]), key
    rotations = [metrics[f'equivariance_error/rot{d}'] for d in (90, 180, 270)]
    assert metrics['equivariance_error/R'] == pytest.approx(sum(rotations) / 3)
    table = capsys.readouterr().out
    assert '| autoencoder | PSNR | SSIM |' in table and 'equivariance_error/S' in table
    assert table.strip() == format_markdown(results, name='vae').strip()


def test_missing_weights_fail_fast_with_file_name(tmp_path, monkeypatch):
    from scripts.eval import main

    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.delenv('EQVAE_ALLOW_DOWNLOAD', raising=False)
    with pytest.raises(MissingWeightsError, match=INCEPTION_FILENAME):
        load_inception()
    # The VAE and data do not exist: reaching them would raise, so the weights are checked first.
    argv = [
        '--vae',
        str(tmp_path / 'no-vae'),
        '--data',
        str(tmp_path / 'no-data'),
        '--out',
        str(tmp_path / 'r.json'),
        '--metrics',
        'psnr,lpips',
    ]
    with pytest.raises(MissingWeightsError) as info:  # run_cli prints it as one line (tests/test_cli_errors.py)
        main(argv)
    error = str(info.value)
    assert 'vgg16-397923af.pth' in error and str(tmp_path / 'torch') in error and '--lpips-weights' in error
    assert not (tmp_path / 'r.json').exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_match_one(assets, tmp_path):
    common = [
        '--vae',
        str(assets / 'vae'),
        '--data',
        str(assets / 'images'),
        '--resolution',
        str(RESOLUTION),
        '--batch-size',
        '2',
        '--metrics',
        'psnr,ssim,equivariance',
        '--no-progress',
    ]
    composer = str(Path(sys.executable).parent / 'composer')
    subprocess.run(
        [composer, '-n', '2', 'scripts/eval.py', '--out', str(tmp_path / 'two.json'), *common],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    from scripts.eval import main

    assert main(['--out', str(tmp_path / 'one.json'), *common]) == 0
    one = json.loads((tmp_path / 'one.json').read_text())
    two = json.loads((tmp_path / 'two.json').read_text())
    assert two['world_size'] == 2 and two['num_images'] == one['num_images'] == 6
    assert two['metrics'] == pytest.approx(one['metrics'], rel=1e-5)


def test_lpips_metric_with_injected_network(assets):
    class L1Distance(torch.nn.Module):
        def forward(self, x, y):
            return (x - y).abs().mean((1, 2, 3), keepdim=True)

    vae = tiny_vae(seed=1)
    dataset = ImageFolderDataset(assets / 'images', RESOLUTION)
    protocol = EvalProtocol(RESOLUTION, sample_posterior=False)
    result = evaluate(vae, dataset, ['lpips'], protocol, lpips_net=L1Distance(), progress=False)['metrics']
    images = torch.stack([dataset[i]['image'] for i in range(len(dataset))])
    with torch.no_grad():
        expected = (images - vae.decode(vae.encode(images).latent_dist.mode()).sample).abs().mean()
    assert result['lpips'] == pytest.approx(expected.item(), rel=1e-4)


def test_vis_latent_script(assets, tmp_path):
    from scripts.vis_latent import main

    out = tmp_path / 'latent.png'
    image = next((assets / 'images').glob('*.png'))
    assert main(['--vae', str(assets / 'vae'), '--image', str(image), '--out', str(out), '--resolution', '64']) == 0
    assert np.array(Image.open(out)).shape == (64, 128, 3)


def test_eval_script_on_a_vq_model_measures_its_codebook(assets, tmp_path):
    from scripts.eval import main

    vae = tiny_vq(seed=1, num_codes=16)
    vae.save_pretrained(tmp_path / 'vq')
    out = tmp_path / 'vq.json'
    argv = ['--vae', str(tmp_path / 'vq'), '--data', str(assets / 'images'), '--out', str(out)]
    argv += ['--resolution', str(RESOLUTION), '--batch-size', '4', '--no-progress']
    with (
        patch('scripts.eval.load_inception', return_value=TinyFeatures()),
        patch('scripts.eval.load_lpips', return_value=TinyPerceptual()),
    ):
        assert main(argv) == 0  # the default metrics: rfid, psnr, ssim, lpips, equivariance, and codebook
    results = json.loads(out.read_text())
    assert results['protocol']['reconstruction_latent'] == 'deterministic latent (no posterior to sample)'
    metrics = results['metrics']
    for key in ('rfid', 'psnr', 'ssim', 'lpips', 'equivariance_error/R', 'equivariance_error/S', 'scaled_psnr/0.5'):
        assert np.isfinite(metrics[key]), key

    # Against the VQModel's own encode -> quantize -> decode, and the codes it picks, on the same images.
    dataset = ImageFolderDataset(assets / 'images', RESOLUTION)
    images = torch.stack([dataset[i]['image'] for i in range(6)])
    with torch.no_grad():
        z_e = vae.encode(images).latents
        _, _, (_, _, codes) = vae.quantize(z_e)
        reconstruction = vae.decode(z_e).sample
    x, y = to_uint8(images).double() / 255, to_uint8(reconstruction).double() / 255
    psnr = (10 * torch.log10(1 / ((x - y) ** 2).mean((1, 2, 3)))).mean()
    assert metrics['psnr'] == pytest.approx(psnr.item(), rel=1e-5)
    counts = torch.bincount(codes.flatten(), minlength=16).double()
    p = counts / counts.sum()
    perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
    assert metrics['codebook_perplexity'] == pytest.approx(perplexity.item(), rel=1e-5)
    assert metrics['dead_code_fraction'] == pytest.approx((counts == 0).double().mean().item())
    assert 0 < metrics['dead_code_fraction'] < 1  # 6 images x 16 cells leave some of the 16 codes unused, not all

    with pytest.raises(ValueError, match='codebook.*vector-quantized'):
        evaluate(tiny_vae(seed=1), dataset, metrics=['codebook'], progress=False)
