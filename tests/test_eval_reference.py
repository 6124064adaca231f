"""``--protocol reference``: each behaviour of the reference's eval.py (zelaki/eqvae @ c34589c) pinned.

Every expected value is computed here the way eval.py computes it (its line numbers in the
comments), and each test also checks that the deviation it guards against gives another number.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from pytorch_fid.fid_score import calculate_activation_statistics, calculate_frechet_distance
from torchmetrics.image import StructuralSimilarityIndexMeasure

from eqvae_composer.evaluation import (
    REFERENCE_INCEPTION_FILENAME,
    EvalProtocol,
    ImageFolderDataset,
    ReconstructionSSIM,
    ReferenceImageFolder,
    ReferenceMetrics,
    ReferencePNGWriter,
    build_eval_dataset,
    evaluate,
    load_reference_inception,
    reference_shard,
    reference_transform,
    reference_uint8,
    to_uint8,
)
from eqvae_composer.weights import MissingWeightsError
from tests.conftest import tiny_vae

ROOT = Path(__file__).resolve().parents[1]


def _images(n, size=16, seed=0, amplitude=1.0):
    return (torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1) * amplitude


class MeanAbsDistance(torch.nn.Module):
    """Stands in for LPIPS: per-image mean |x - y|, shape (B, 1, 1, 1) like LPIPS."""

    def forward(self, x, y):
        return (x - y).abs().mean((1, 2, 3), keepdim=True)


class TinyFeatures(torch.nn.Module):
    """Stands in for pytorch-fid's Inception: float [0, 1] images -> 5 features."""

    def forward(self, x):
        return torch.cat([x.mean((2, 3)), x[:, :1].std((2, 3)), x[:, :, ::2].mean((1, 2, 3))[:, None]], dim=1)


class TinyFeaturesAsInception(TinyFeatures):
    """The same features in pytorch-fid's InceptionV3 output form: a list of one (B, D, 1, 1) map."""

    def forward(self, x):
        return [super().forward(x)[:, :, None, None]]


def _feed(metrics, recon, images, batch_size):
    """Feed as the runner's DataLoader does: consecutive batches of ``batch_size``, the last one smaller."""
    for start in range(0, len(images), batch_size):
        metrics.update(recon[start : start + batch_size], images[start : start + batch_size])
    return metrics.compute()


def test_quantization_is_the_reference_expression():
    x = torch.linspace(-1.1, 1.1, 200_001, dtype=torch.float32)
    # eval.py L98 / L122: torch.clamp(127.5 * x + 128.0, 0, 255) then a cast to uint8 (truncation).
    expected = np.clip(127.5 * x.numpy() + np.float32(128.0), 0, 255).astype(np.uint8)
    assert np.array_equal(reference_uint8(x).numpy(), expected)
    assert reference_uint8(torch.tensor([-1.5, -1.0, 0.0, 1.0, 1.5])).tolist() == [0, 0, 128, 255, 255]
    # Rounding instead of truncating, or our default quantizer, gives other levels on this grid.
    rounded = np.clip(np.round(127.5 * x.numpy() + np.float32(128.0)), 0, 255).astype(np.uint8)
    assert (rounded != expected).sum() > 1000
    assert (to_uint8(x).numpy() != expected).sum() > 0


def test_reference_transform_is_float_bilinear_antialiased(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (37, 50, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    out = reference_transform(16)(image)
    # eval.py L60-65 by hand: [0, 1] float, shorter side to 16 (longer int(16 * 50 / 37) = 21),
    # bilinear with antialiasing, centre crop (left = round((21 - 16) / 2) = 2), then 2x - 1.
    x = torch.from_numpy(pixels).permute(2, 0, 1).float().div(255)[None]
    resized = F.interpolate(x, size=(16, 21), mode='bilinear', align_corners=False, antialias=True)
    expected = resized[0, :, :, 2:18] * 2 - 1
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
    # Not quantized: the model sees the float image (L96, L117), not 256 levels.
    assert not torch.allclose(out, reference_uint8(out).float() / 127.5 - 1, atol=1e-3)
    # Without antialiasing, or with our default (bicubic, uint8), the pixels differ.
    aliased = F.interpolate(x, size=(16, 21), mode='bilinear', align_corners=False, antialias=False)
    assert (aliased[0, :, :, 2:18] * 2 - 1 - out).abs().max() > 0.05
    image.save(tmp_path / 'a.png')
    ours = ImageFolderDataset(tmp_path, 16)[0]['image']
    assert (ours - out).abs().max() > 0.02


def test_reference_shard_is_distributed_sampler_with_repeats():
    # torch's DistributedSampler as eval.py L69 builds it: permutation seeded 0 + epoch 0, padded with
    # its own head to a multiple of the ranks, then strided.
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(0)).tolist()
    padded = perm + perm[:1]
    assert [reference_shard(5, r, 2) for r in range(2)] == [padded[0::2], padded[1::2]]
    assert reference_shard(5, 0, 1) == perm
    assert sorted(reference_shard(5, 0, 2) + reference_shard(5, 1, 2)) != list(range(5))  # one image twice


def _ssim_data():
    # Images of different contrast, so that each batch's inferred data range differs from each
    # image's; reconstructions overshoot [-1, 1], as an unclamped decoder output does.
    images = torch.cat([_images(1, 24, seed=i, amplitude=a) for i, a in enumerate([1.0, 0.3, 0.8, 0.2, 0.6])])
    recon = images * 1.15 + 0.1 * _images(5, 24, seed=9)
    assert recon.abs().max() > 1
    return recon, images


def test_ssim_per_batch_as_torchmetrics_called_by_the_reference():
    recon, images = _ssim_data()
    # eval.py L109 and L126: one StructuralSimilarityIndexMeasure(), called on each batch (the
    # unclamped float reconstruction, the float input); L137-143: the mean of those values.
    ssim = StructuralSimilarityIndexMeasure()
    batches = [slice(0, 2), slice(2, 4), slice(4, 5)]
    expected = float(torch.stack([ssim(recon[b], images[b]) for b in batches]).mean())
    measured = _feed(ReferenceMetrics(['ssim'], batch_size=2), recon, images, batch_size=4)['ssim']
    assert measured == pytest.approx(expected, rel=1e-6)
    # Each deviation moves the number: a fixed data range, a mean over images instead of over
    # batches, a clamped reconstruction, our default protocol (uint8, range 1).
    fixed = float(
        torch.stack([StructuralSimilarityIndexMeasure(data_range=2.0)(recon[b], images[b]) for b in batches]).mean()
    )
    per_image = _feed(ReferenceMetrics(['ssim'], batch_size=1), recon, images, batch_size=4)['ssim']
    clamped = _feed(ReferenceMetrics(['ssim'], batch_size=2), recon.clamp(-1, 1), images, batch_size=4)['ssim']
    default = ReconstructionSSIM()
    default.update(recon, images)
    for other in (fixed, per_image, clamped, float(default.compute())):
        assert abs(other - expected) > 1e-3


def test_lpips_per_batch_mean_then_mean_over_batches_on_unclamped_recon():
    images = torch.full((5, 3, 8, 8), 0.95)
    offsets = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.9])
    recon = images + offsets[:, None, None, None]  # up to 1.85: unclamped
    measured = _feed(ReferenceMetrics(['lpips'], lpips_net=MeanAbsDistance(), batch_size=2), recon, images, 4)
    # Batches of 2 (the last of 1): (0.1 + 0.2) / 2, (0.3 + 0.4) / 2, 0.9 -> their mean 1.4 / 3.
    assert measured['lpips'] == pytest.approx(1.4 / 3, rel=1e-6)
    # The mean over images would be 1.9 / 5; a clamped reconstruction would give 0.05 everywhere.
    per_image = _feed(ReferenceMetrics(['lpips'], lpips_net=MeanAbsDistance()), recon, images, 4)
    assert per_image['lpips'] == pytest.approx(1.9 / 5, rel=1e-6)
    clamped = _feed(
        ReferenceMetrics(['lpips'], lpips_net=MeanAbsDistance(), batch_size=2), recon.clamp(-1, 1), images, 4
    )
    assert clamped['lpips'] == pytest.approx(0.05, rel=1e-4)


def test_ranks_average_as_the_reference_all_reduce():
    recon, images = _ssim_data()
    shards = [reference_shard(5, r, 2) for r in range(2)]  # 3 images each, one of them repeated
    states = []
    for shard in shards:
        metrics = ReferenceMetrics(['ssim', 'lpips'], lpips_net=MeanAbsDistance())
        for start in (0, 2):  # no compute() before the merge: torchmetrics would keep the value it cached
            metrics.update(recon[shard][start : start + 2], images[shard][start : start + 2])
        states.append(metrics)
    for name, metric in states[0].table.items():
        metric.merge_state(states[1].table[name])
    merged = states[0].compute()
    # eval.py L137-143: per-rank lists of per-batch values, all_reduce(AVG) elementwise, then the mean.
    ssim = StructuralSimilarityIndexMeasure()
    per_rank = torch.tensor([[float(ssim(recon[[i]], images[[i]])) for i in shard] for shard in shards])
    assert merged['ssim'] == pytest.approx(float(per_rank.mean(0).mean()), rel=1e-6)
    lpips = torch.tensor([[float((recon[i] - images[i]).abs().mean()) for i in shard] for shard in shards])
    assert merged['lpips'] == pytest.approx(float(lpips.mean(0).mean()), rel=1e-6)


def _folder_psnr(reference_dir, decoded_dir):
    """eval.py L170-196: PNG pairs in sorted order, 20 log10(255 / sqrt(MSE)) each, their mean."""
    pairs = zip(sorted(reference_dir.iterdir()), sorted(decoded_dir.iterdir()))
    values = []
    for a, b in pairs:
        x = torch.tensor(np.array(Image.open(a).convert('RGB')).transpose(2, 0, 1), dtype=torch.float32)
        y = torch.tensor(np.array(Image.open(b).convert('RGB')).transpose(2, 0, 1), dtype=torch.float32)
        values.append(20 * torch.log10(255.0 / torch.sqrt(torch.mean((x - y) ** 2))).item())
    return sum(values) / len(values)


def test_psnr_and_fid_equal_pytorch_fid_on_the_written_png_folders(tmp_path):
    images = _images(24, 16, seed=1)
    recon = images * 0.8 + 0.25 * _images(24, 16, seed=2)
    writer = ReferencePNGWriter(tmp_path, rank=0)
    metrics = ReferenceMetrics(['rfid', 'psnr'], inception=TinyFeatures(), writer=writer)
    measured = _feed(metrics, recon, images, batch_size=10)
    reference_dir, decoded_dir = tmp_path / 'ref_images', tmp_path / 'decoded_images'
    assert sorted(p.name for p in reference_dir.iterdir())[:2] == ['ref_image_rank_0_0.png', 'ref_image_rank_0_1.png']
    # The PNGs hold the reference's levels (L98, L122).
    assert np.array_equal(
        np.array(Image.open(decoded_dir / 'decoded_image_rank_0_7.png')),
        reference_uint8(recon[7]).permute(1, 2, 0).numpy(),
    )
    assert measured['psnr'] == pytest.approx(_folder_psnr(reference_dir, decoded_dir), rel=1e-6)
    # eval.py L148: pytorch-fid on the two folders, references first.
    stats = [
        calculate_activation_statistics(
            sorted(d.iterdir()), TinyFeaturesAsInception(), batch_size=7, dims=5, num_workers=0
        )
        for d in (reference_dir, decoded_dir)
    ]
    assert measured['rfid'] == pytest.approx(calculate_frechet_distance(*stats[0], *stats[1]), rel=1e-9)
    # The mean of per-image PSNRs, not the PSNR of the pooled MSE.
    mse = (reference_uint8(recon).float() - reference_uint8(images).float()).pow(2).mean()
    assert abs(measured['psnr'] - 20 * math.log10(255 / math.sqrt(mse))) > 1e-3


@pytest.mark.slow
def test_reference_inception_loads_a_local_file_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.delenv('EQVAE_ALLOW_DOWNLOAD', raising=False)
    with pytest.raises(MissingWeightsError, match=REFERENCE_INCEPTION_FILENAME):
        load_reference_inception()
    # A fake with the real file's keys and shapes: pytorch-fid patches torchvision's Inception
    # blocks without changing their parameters.
    fake = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in fake.state_dict().items()}
    torch.save(state, tmp_path / REFERENCE_INCEPTION_FILENAME)
    net = load_reference_inception(tmp_path)  # a folder holding the file
    torch.testing.assert_close(net.net.blocks[0][0].conv.weight, state['Conv2d_1a_3x3.conv.weight'])
    with torch.no_grad():
        assert net(torch.rand(2, 3, 40, 40)).shape == (2, 2048)
    torch.save({'Conv2d_1a_3x3.conv.weight': state['Conv2d_1a_3x3.conv.weight']}, tmp_path / 'broken.pth')
    with pytest.raises(RuntimeError, match='Missing key'):
        load_reference_inception(tmp_path / 'broken.pth')


@pytest.fixture(scope='module')
def class_folder(tmp_path_factory):
    """5 images of assorted sizes in two class subfolders, as ImageFolder wants them."""
    root = tmp_path_factory.mktemp('reference')
    rng = np.random.default_rng(0)
    for i in range(5):
        (root / 'data' / f'class{i % 2}').mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (30 + 3 * i, 40, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / 'data' / f'class{i % 2}' / f'{i}.png')
    tiny_vae(seed=1).save_pretrained(root / 'vae')
    return root


def test_evaluate_reference_ssim_by_hand(class_folder):
    vae = tiny_vae(seed=1)
    dataset = build_eval_dataset(class_folder / 'data', 32, protocol='reference')
    assert isinstance(dataset, ReferenceImageFolder) and len(dataset) == 5
    protocol = EvalProtocol(32, sample_posterior=False, name='reference', reference_batch_size=2)
    result = evaluate(vae, dataset, ['ssim'], protocol, batch_size=4, progress=False)
    # By hand: the sampler's order, batches of 2 in it, torchmetrics SSIM per batch, their mean.
    order = reference_shard(5, 0, 1)
    images = torch.stack([dataset[i]['image'] for i in order])
    with torch.no_grad():
        recon = vae.decode(vae.encode(images).latent_dist.mode()).sample
    ssim = StructuralSimilarityIndexMeasure()
    expected = torch.stack([ssim(recon[s : s + 2], images[s : s + 2]) for s in range(0, 5, 2)]).mean()
    assert result['metrics']['ssim'] == pytest.approx(float(expected), rel=1e-5)
    assert result['num_evaluated'] == 5 and result['protocol']['name'] == 'reference'
    with pytest.raises(ValueError, match='multiple of the reference batch size'):
        evaluate(vae, dataset, ['ssim'], protocol, batch_size=3, progress=False)
    with pytest.raises(ValueError, match='only in the default protocol'):
        evaluate(vae, dataset, ['equivariance'], protocol, progress=False)


def test_reference_dataset_needs_class_folders(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / 'flat.png')
    with pytest.raises(FileNotFoundError, match='class subfolders'):
        build_eval_dataset(tmp_path, 8, protocol='reference')
    (tmp_path / 'mds').mkdir()
    (tmp_path / 'mds' / 'index.json').write_text('{}')
    with pytest.raises(ValueError, match='image folder'):
        build_eval_dataset(tmp_path / 'mds', 8, protocol='reference')


def test_eval_script_reference_protocol(class_folder, tmp_path, capsys):
    from scripts.eval import main

    out, images = tmp_path / 'results.json', tmp_path / 'pngs'
    argv = [
        '--vae',
        str(class_folder / 'vae'),
        '--data',
        str(class_folder / 'data'),
        '--out',
        str(out),
        '--resolution',
        '32',
        '--batch-size',
        '2',
        '--no-progress',
        '--protocol',
        'reference',
        '--metrics',
        'psnr,ssim',
        '--save-images',
        str(images),
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "reference's protocol" in table
    results = json.loads(out.read_text())
    assert results['protocol']['name'] == 'reference' and set(results['metrics']) == {'psnr', 'ssim'}
    assert len(list((images / 'decoded_images').iterdir())) == 5
    assert results['metrics']['psnr'] == pytest.approx(
        _folder_psnr(images / 'ref_images', images / 'decoded_images'), rel=1e-6
    )
    assert main([*argv[:-2], '--metrics', 'equivariance']) == 2
    assert main(['--vae', 'x', '--data', 'y', '--out', str(out), '--save-images', str(images)]) == 2


def test_eval_script_reference_missing_fid_weights(tmp_path, monkeypatch):
    from scripts.eval import main

    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.delenv('EQVAE_ALLOW_DOWNLOAD', raising=False)
    argv = [
        '--vae',
        str(tmp_path / 'no-vae'),
        '--data',
        str(tmp_path / 'no-data'),
        '--out',
        str(tmp_path / 'r.json'),
        '--protocol',
        'reference',
        '--metrics',
        'rfid',
    ]
    with pytest.raises(MissingWeightsError) as info:  # run_cli prints it as one line (tests/test_cli_errors.py)
        main(argv)
    assert REFERENCE_INCEPTION_FILENAME in str(info.value) and '--inception-weights' in str(info.value)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_count_the_samplers_repeat(class_folder, tmp_path):
    out = tmp_path / 'two.json'
    argv = [
        '--vae',
        str(class_folder / 'vae'),
        '--data',
        str(class_folder / 'data'),
        '--out',
        str(out),
        '--resolution',
        '32',
        '--batch-size',
        '2',
        '--no-progress',
        '--protocol',
        'reference',
        '--metrics',
        'psnr,ssim',
        '--mode',
    ]
    composer = str(Path(sys.executable).parent / 'composer')
    # PYTHONPATH: the launched processes import this checkout's package, as pytest does.
    env = {**os.environ, 'PYTHONPATH': str(ROOT)}
    subprocess.run(
        [composer, '-n', '2', 'scripts/eval.py', *argv], cwd=ROOT, env=env, check=True, capture_output=True, timeout=300
    )
    results = json.loads(out.read_text())
    assert results['world_size'] == 2 and results['num_images'] == 5 and results['num_evaluated'] == 6
    # By hand: 5 images padded to 6 by the sampler, every image's value (batch size 1) averaged.
    dataset = ReferenceImageFolder(class_folder / 'data', 32)
    padded = reference_shard(5, 0, 2) + reference_shard(5, 1, 2)
    vae = tiny_vae(seed=1)
    images = torch.stack([dataset[i]['image'] for i in range(5)])
    with torch.no_grad():
        recon = vae.decode(vae.encode(images).latent_dist.mode()).sample
    ssim = StructuralSimilarityIndexMeasure()
    per_image_ssim = [float(ssim(recon[[i]], images[[i]])) for i in range(5)]
    mse = (reference_uint8(recon).float() - reference_uint8(images).float()).pow(2).mean((1, 2, 3))
    per_image_psnr = (20 * torch.log10(255 / mse.sqrt())).tolist()
    assert results['metrics']['ssim'] == pytest.approx(np.mean([per_image_ssim[i] for i in padded]), rel=1e-5)
    assert results['metrics']['psnr'] == pytest.approx(np.mean([per_image_psnr[i] for i in padded]), rel=1e-5)
    assert results['metrics']['ssim'] != pytest.approx(np.mean(per_image_ssim), rel=1e-4)
