"""Evaluation in ``train()``: every eval image counted exactly once (a split smaller than the eval batch, a
remainder, StreamingDataset's padding across ranks), and the checks that stop a run before anything is loaded
(an empty eval set, ``drop_last`` on the eval loader, a missing weight file); ``streams`` as a mapping."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from omegaconf import OmegaConf
from PIL import Image
from streaming import MDSWriter
from streaming.vision.convert import imagenet as streaming_imagenet

from eqvae_composer.data.dataset import StreamingImageDataset
from eqvae_composer.train import ConfigError, train
from eqvae_composer.weights import MissingWeightsError
from tests.conftest import tiny_vae_config
from tests.data_fixtures import streaming_env  # noqa: F401  (fixture, used by name)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures('streaming_env')


def convert_with_streaming(tmp_path: Path, monkeypatch, images: dict[str, int]) -> Path:
    """``python -m streaming.vision.convert.imagenet --compression zstd``: column ``x``, hashed, compressed shards."""
    rng = np.random.default_rng(0)
    for split, count in images.items():
        for i in range(count):
            folder = tmp_path / 'raw' / split / f'n{i % 2:08d}'
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / f'{i}.jpeg', quality=90)
    out = tmp_path / 'mds'
    monkeypatch.setattr(
        sys,
        'argv',
        [
            'imagenet',
            '--in_root',
            str(tmp_path / 'raw'),
            '--out_root',
            str(out),
            '--splits',
            ','.join(images),
            '--compression',
            'zstd',
            '--progress_bar',
            '0',
        ],
    )
    streaming_imagenet.main(streaming_imagenet.parse_args())
    return out


def write_pngs(folder: Path, count: int, seed: int = 0) -> Path:
    """An MDS dataset of ``count`` noise images in this project's layout (column ``image``)."""
    rng = np.random.default_rng(seed)
    with MDSWriter(out=str(folder), columns={'image': 'bytes'}, size_limit=1 << 14) as writer:
        for _ in range(count):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)).save(buf, format='PNG')
            writer.write({'image': buf.getvalue()})
    return folder


def config(train_dir: Path, val_dir: Path | None, **overrides):
    dataset = {'resolution': 32, 'image_column': 'x'}
    cfg = {
        'run_name': 'eval',
        'model': {
            'vae': {'config': tiny_vae_config()},
            'loss': {'lpips_weight': 0.0, 'disc_num_filters': 8, 'disc_num_layers': 1},
            'eval_sample_posterior': False,  # deterministic: the metric can be recomputed by hand
        },
        'train_loader': {'dataset': {'local': str(train_dir), **dataset}},
        'eval_loader': {'dataset': {'local': str(val_dir), **dataset}} if val_dir else None,
        'global_train_batch_size': 4,
        'device_eval_batch_size': 4,
        'max_duration': '1ba',
        'eval_interval': '1ba',
        'precision': 'fp32',
    }
    return OmegaConf.merge(cfg, OmegaConf.create(overrides))


def psnr_of_each_image_once(vae, folder: Path, image_column: str = 'x') -> float:
    """Mean over the folder's images of the PSNR of the uint8-quantized reconstruction (posterior mode)."""
    dataset = StreamingImageDataset(local=str(folder), train=False, resolution=32, image_column=image_column)
    images = torch.stack([dataset[i]['image'] for i in range(dataset.num_samples)])
    with torch.no_grad():
        reconstructions = vae.decode(vae.encode(images).latent_dist.mode()).sample

    def levels(x):
        return ((x.clamp(-1, 1) + 1) * 127.5).round()

    mse = (levels(reconstructions) - levels(images)).div(255).pow(2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())


def _no_data_loading(monkeypatch) -> None:
    def refuse(**kwargs):
        raise AssertionError('a data loader was built before the cheap checks stopped the run')

    monkeypatch.setattr('eqvae_composer.train.build_image_dataloader', refuse)


@pytest.mark.slow
@pytest.mark.parametrize('val_images', [3, 6])  # fewer than one eval batch of 4; a batch and a remainder
def test_eval_during_training_counts_every_image_once(tmp_path, monkeypatch, val_images):
    data = convert_with_streaming(tmp_path, monkeypatch, {'train': 8, 'val': val_images})
    trainer = train(config(data / 'train', data / 'val'))
    metrics = trainer.state.eval_metrics['eval']
    assert int(metrics['EquivarianceErrorR'].count) == 3 * val_images  # three rotations per image
    expected = psnr_of_each_image_once(trainer.state.model.vae, data / 'val')
    assert float(metrics['PSNR'].compute()) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_count_each_image_once(tmp_path):
    # 5 images over 2 ranks: StreamingDataset gives each rank 3, one a repeat. 1 image: one rank sees
    # only the repeat, so its metrics take in nothing at all.
    train_dir = write_pngs(tmp_path / 'train', 8)
    five, one = write_pngs(tmp_path / 'five', 5, seed=1), write_pngs(tmp_path / 'one', 1, seed=2)
    script = REPO / 'tests' / 'distributed' / 'eval_ranks.py'
    args = map(str, (script, tmp_path, train_dir, five, one))
    cmd = [sys.executable, '-m', 'composer.cli.launcher', '-n', '2', *args]
    result = subprocess.run(
        cmd, env={**os.environ, 'PYTHONPATH': str(REPO)}, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / 'results.json').read_text())
    assert results['world_size'] == 2
    vae = AutoencoderKL.from_pretrained(tmp_path / 'vae')  # the weights both evaluations used
    for label, folder, count in (('eval', five, 5), ('other', one, 1)):
        assert results[label]['images_counted'] == count
        assert results[label]['psnr'] == pytest.approx(psnr_of_each_image_once(vae, folder, 'image'), rel=1e-5)


def test_empty_eval_set_stops_before_anything_is_loaded(tmp_path, monkeypatch):
    train_dir = write_pngs(tmp_path / 'train', 4)
    with MDSWriter(out=str(tmp_path / 'val'), columns={'image': 'bytes'}):
        pass  # an index.json that lists no shard
    _no_data_loading(monkeypatch)
    with pytest.raises(ConfigError, match=rf'eval_loader\.dataset: Dataset folder {tmp_path / "val"} holds no samples'):
        train(config(train_dir, tmp_path / 'val'), fit=False)


def test_drop_last_on_the_eval_loader_is_refused(tmp_path, monkeypatch):
    folder = write_pngs(tmp_path / 'data', 4)
    _no_data_loading(monkeypatch)
    with pytest.raises(ConfigError, match='eval_loader.drop_last: evaluation must see every sample'):
        train(config(folder, folder, eval_loader={'drop_last': True}), fit=False)


def test_missing_lpips_weights_stop_before_data_and_autoencoder(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))  # an empty hub cache
    monkeypatch.delenv('EQVAE_ALLOW_DOWNLOAD', raising=False)
    folder = write_pngs(tmp_path / 'data', 4)
    _no_data_loading(monkeypatch)
    # Reaching the autoencoder would raise a plain FileNotFoundError naming this folder instead.
    cfg = config(
        folder,
        folder,
        model={'vae': {'config': None, 'pretrained': str(tmp_path / 'no-vae')}, 'loss': {'lpips_weight': 1.0}},
    )
    with pytest.raises(MissingWeightsError, match='vgg16-397923af.pth'):
        train(cfg, fit=False)


def test_streams_as_a_mapping_like_llm_foundry_yamls(tmp_path):
    first, second = write_pngs(tmp_path / 'first', 4, seed=1), write_pngs(tmp_path / 'second', 6, seed=2)
    streams = {'oi': {'local': str(first)}, 'in': {'local': str(second)}}
    cfg = config(first, None, train_loader={'dataset': {'local': None, 'image_column': 'image', 'streams': streams}})
    trainer = train(cfg, fit=False)
    dataset = trainer.state.train_dataloader.dataset
    assert [stream.local for stream in dataset.streams] == [str(first), str(second)]
    assert dataset.num_samples == 10
