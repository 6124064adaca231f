"""scripts/encode_latents.py and StreamingLatentDataset: stored latents decode as the direct encode/decode,
resume after a kill, bad samples are reported, ranks split the work, and the dataset scales and samples."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from streaming import MDSWriter

from eqvae_composer.data.convert import ConvertOptions, convert
from eqvae_composer.data.parts import OutputExistsError
from eqvae_composer.latents import EncodeOptions, StreamingLatentDataset, center_crop_arr, encode_latents
from eqvae_composer.latents.encode import NothingEncodedError, ShardReadError
from eqvae_composer.latents.preprocess import preprocess_image
from tests.conftest import tiny_kl_config, tiny_vq
from tests.data_fixtures import (  # noqa: F401  (fixtures, used by name)
    dataset_files,
    jpeg_bytes,
    photo,
    read_mds,
    read_skipped,
    streaming_env,
    write_image,
)
from tests.test_data_object_store import bucket, s3_endpoint  # noqa: F401  (fixtures, used by name)

pytestmark = pytest.mark.usefixtures('streaming_env')
REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'scripts' / 'encode_latents.py'
QUIET = dict(progress=False)


@pytest.fixture
def vae_dir(tmp_path) -> Path:
    """A tiny f8 AutoencoderKL with SD3's scaling and shift factors, saved as a diffusers folder."""
    torch.manual_seed(0)
    AutoencoderKL.from_config(tiny_kl_config('sd3')).save_pretrained(tmp_path / 'vae')
    return tmp_path / 'vae'


def _photos(root: Path, count: int = 7) -> list[Path]:
    # Sizes on both sides of 2x the resolution (32), so ADM's box-filter halving runs for some.
    sizes = [(150, 100), (40, 64), (33, 90), (200, 70), (64, 64), (97, 41), (300, 250)]
    return [
        Path(write_image(root / f'{i % 2}' / f'{i:03d}.jpg', photo(*sizes[i % len(sizes)], seed=i)))
        for i in range(count)
    ]


@pytest.fixture
def photos(tmp_path) -> Path:
    _photos(tmp_path / 'images')
    return tmp_path / 'images'


def test_center_crop_arr_is_adms_halving_bicubic_and_centre_crop():
    img = photo(200, 100, seed=3)
    # By hand: 100 >= 2 * 32 halves once to 100 x 50 (box); 50 < 64 stops; bicubic to 64 x 32; centre 32.
    expected = img.resize((100, 50), Image.BOX).resize((64, 32), Image.BICUBIC).crop((16, 0, 48, 32))
    assert np.array_equal(np.asarray(center_crop_arr(img, 32)), np.asarray(expected))
    odd = photo(45, 33, seed=4)  # no halving; 33 -> 32 scales 45 to round(43.6) = 44, crop x from 6
    expected = odd.resize((44, 32), Image.BICUBIC).crop((6, 0, 38, 32))
    assert np.array_equal(np.asarray(center_crop_arr(odd, 32)), np.asarray(expected))


@pytest.mark.parametrize('dtype, atol', [('float32', 1e-4), ('float16', 2e-2), ('bfloat16', 1e-1)])
def test_decoding_stored_latents_reproduces_the_direct_encode_decode(vae_dir, photos, tmp_path, dtype, atol):
    out = tmp_path / 'latents'
    summary = encode_latents(
        str(vae_dir),
        str(photos),
        str(out),
        EncodeOptions(resolution=32, dtype=dtype, batch_size=3, part_size=4, **QUIET),
    )
    assert summary.written == 7 and not summary.skipped
    dataset = StreamingLatentDataset(local=str(out), shuffle=False, sample_posterior=False)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    files = sorted(photos.rglob('*.jpg'))
    with torch.no_grad():
        for i, path in enumerate(files):
            pixels = preprocess_image(Image.open(path), 32)[None]
            direct = vae.decode(vae.encode(pixels).latent_dist.mean).sample
            stored = vae.decode(dataset.unscale(dataset[i]['latent'])[None]).sample
            torch.testing.assert_close(stored, direct, atol=atol, rtol=0)
            # Stored latents are scaled as diffusers does for diffusion: (z - shift) * scale.
            mean = vae.encode(pixels).latent_dist.mean[0]
            torch.testing.assert_close(
                dataset[i]['latent'], (mean - 0.0609) * 1.5305, atol=atol * 10, rtol=atol if dtype != 'float32' else 0
            )
    metadata = json.loads((out / 'latents.json').read_text())
    assert metadata['vae']['scaling_factor'] == 1.5305 and metadata['vae']['shift_factor'] == 0.0609
    assert metadata['preprocessing'] == {'crop': 'adm', 'resolution': 32, 'pixels': 'x / 127.5 - 1 (RGB)'}
    assert metadata['vae']['source'] == str(vae_dir) and len(metadata['vae']['weights_sha256']) == 64
    assert [s['key'] for s in read_mds(out)] == [str(p.relative_to(photos).as_posix()) for p in files]


def test_flip_copies_are_the_latents_of_the_flipped_images(vae_dir, photos, tmp_path):
    out = tmp_path / 'latents'
    encode_latents(
        str(vae_dir), str(photos), str(out), EncodeOptions(resolution=32, dtype='float32', flip=True, **QUIET)
    )
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    samples = read_mds(out)
    first = sorted(photos.rglob('*.jpg'))[0]
    pixels = preprocess_image(Image.open(first), 32)[None]
    with torch.no_grad():
        flipped = vae.encode(pixels.flip(-1)).latent_dist
    np.testing.assert_allclose(samples[0]['mean_flip'], flipped.mean[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(samples[0]['std_flip'], flipped.std[0].numpy(), atol=1e-5)
    dataset = StreamingLatentDataset(local=str(out), shuffle=False, sample_posterior=False, flip='always')
    torch.testing.assert_close(dataset[0]['latent'], (flipped.mean[0] - 0.0609) * 1.5305)
    randomly = StreamingLatentDataset(local=str(out), shuffle=False, sample_posterior=False, flip='random')
    chose_flip = [
        torch.allclose(randomly[i]['latent'], (torch.from_numpy(samples[i]['mean_flip']) - 0.0609) * 1.5305)
        for i in range(7)
    ]
    assert any(chose_flip) and not all(chose_flip)  # independent coin per sample (7 samples: p = 1/64 to fail)


def test_posterior_samples_depend_only_on_the_seed_and_the_sample(vae_dir, photos, tmp_path):
    def run(name: str, **kwargs) -> list[np.ndarray]:
        options = EncodeOptions(resolution=32, dtype='float32', store='sample', **{**QUIET, **kwargs})
        encode_latents(str(vae_dir), str(photos), str(tmp_path / name), options)
        return [s['sample'] for s in read_mds(tmp_path / name)]

    a, b, other_seed = run('a', batch_size=2, part_size=3), run('b', batch_size=5), run('c', seed=1)
    # The same noise whatever the batching (the encoder's float sums differ with the batch size, by ~1e-6).
    assert all(np.allclose(x, y, atol=1e-5, rtol=0) for x, y in zip(a, b))
    assert not any(np.array_equal(x, y) for x, y in zip(a, other_seed))
    encode_latents(
        str(vae_dir), str(photos), str(tmp_path / 'm'), EncodeOptions(resolution=32, dtype='float32', **QUIET)
    )
    stored = read_mds(tmp_path / 'm')
    # sample = mean + std * eps with eps ~ N(0, 1): standardised, it has mean ~0 and std ~1.
    eps = np.concatenate([((x - s['mean']) / s['std']).ravel() for x, s in zip(a, stored)])
    assert abs(eps.mean()) < 0.1 and abs(eps.std() - 1) < 0.1


def test_dataset_samples_the_posterior_reproducibly(vae_dir, photos, tmp_path):
    out = tmp_path / 'latents'
    encode_latents(str(vae_dir), str(photos), str(out), EncodeOptions(resolution=32, dtype='float32', **QUIET))
    stored = read_mds(out)
    dataset = StreamingLatentDataset(local=str(out), shuffle=False, shuffle_seed=5, batch_size=4)
    z = dataset[2]['latent']
    assert torch.equal(z, dataset[2]['latent'])  # same (seed, epoch, index)
    eps = (z / 1.5305 + 0.0609 - torch.from_numpy(stored[2]['mean'])) / torch.from_numpy(stored[2]['std'])
    assert 0.7 < eps.std() < 1.3 and abs(eps.mean()) < 0.3  # 256 draws of N(0, 1)
    other = StreamingLatentDataset(local=str(out), shuffle=False, shuffle_seed=6)
    assert not torch.equal(z, other[2]['latent'])
    loader = torch.utils.data.DataLoader(dataset, batch_size=4)
    batch = next(iter(loader))
    assert batch['latent'].shape == (4, 16, 4, 4) and 'label' not in batch


def _mds(root: Path, columns: dict[str, str], samples: list[dict]) -> Path:
    with MDSWriter(out=str(root), columns=columns, size_limit=1 << 12) as writer:
        for sample in samples:
            writer.write(sample)
    return root


def test_labels_of_a_dataset_in_streamings_imagenet_layout(vae_dir, tmp_path):
    # streaming.vision.convert.imagenet: columns i (int), x (jpeg: a PIL image), y (int label).
    images = [Image.open(write_image(tmp_path / 'raw' / f'{i}.jpg', photo(60 + i, 40, seed=i))) for i in range(5)]
    samples = [{'i': i, 'x': img, 'y': label} for i, (img, label) in enumerate(zip(images, [3, 1, 4, 1, 5]))]
    data = _mds(tmp_path / 'in', {'i': 'int', 'x': 'jpeg', 'y': 'int'}, samples)
    out = tmp_path / 'latents'
    summary = encode_latents(str(vae_dir), str(data), str(out), EncodeOptions(resolution=32, part_size=2, **QUIET))
    assert summary.written == 5 and not summary.skipped
    dataset = StreamingLatentDataset(local=str(out), shuffle=False)
    assert [int(dataset[i]['label']) for i in range(5)] == [3, 1, 4, 1, 5]
    assert json.loads((out / 'latents.json').read_text())['labelled'] is True


def test_bad_samples_are_reported_and_the_rest_encoded(vae_dir, tmp_path):
    images = [photo(60 + i, 40, seed=i) for i in range(7)]
    encoded = [jpeg_bytes(img) for img in images]
    encoded[2], encoded[4] = b'\xff\xd8\xff not a jpeg', encoded[4][:-400]  # garbage; a JPEG cut short
    samples = [{'image': data, 'key': f'k{i}', 'label': i} for i, data in enumerate(encoded)]
    data = _mds(tmp_path / 'in', {'image': 'bytes', 'key': 'str', 'label': 'int'}, samples)
    out = tmp_path / 'latents'
    summary = encode_latents(str(vae_dir), str(data), str(out), EncodeOptions(resolution=32, part_size=4, **QUIET))
    assert summary.written == 5 and [key for key, _ in summary.skipped] == ['k2', 'k4']
    assert summary.skipped[0][1] == 'not a readable image (unknown format)'
    assert summary.skipped[1][1].startswith('cannot decode image (OSError: image file is truncated')
    assert [r['key'] for r in read_skipped(out / 'skipped.jsonl')] == ['k2', 'k4']
    assert [(s['key'], s['label']) for s in read_mds(out)] == [('k0', 0), ('k1', 1), ('k3', 3), ('k5', 5), ('k6', 6)]
    assert json.loads((out / 'latents.json').read_text())['skipped'] == 2


def test_a_jpeg_column_streaming_cannot_decode_is_one_skipped_sample(vae_dir, tmp_path):
    # With a 'jpeg' column streaming opens the image inside get_item: the failure surfaces there.
    images = [Image.open(write_image(tmp_path / 'raw' / f'{i}.jpg', photo(60, 40, seed=i))) for i in range(3)]
    data = _mds(tmp_path / 'in', {'x': 'jpeg', 'y': 'int'}, [{'x': img, 'y': i} for i, img in enumerate(images)])
    shard = next(data.glob('shard.*.mds'))
    raw = bytearray(shard.read_bytes())
    second = raw.index(b'\xff\xd8\xff', raw.index(b'\xff\xd8\xff') + 1)
    raw[second : second + 16] = b'no jpeg here....'
    shard.write_bytes(bytes(raw))
    summary = encode_latents(str(vae_dir), str(data), str(tmp_path / 'out'), EncodeOptions(resolution=32, **QUIET))
    assert summary.written == 2 and summary.skipped == [('1', 'not a readable image (unknown format)')]


def test_a_missing_shard_stops_the_run_and_the_same_command_resumes(vae_dir, tmp_path):
    # Not a skipped sample: streaming leaves a shard whose read failed half-prepared, so a second
    # read of it would wait forever. The run stops with the shard named; restored, it resumes.
    images = [jpeg_bytes(photo(60, 40, seed=i)) for i in range(6)]
    data = _mds(tmp_path / 'in', {'image': 'bytes'}, [{'image': img} for img in images])
    shards = sorted(data.glob('shard.*.mds'))
    assert len(shards) > 2
    kept = shards[-1].read_bytes()
    shards[-1].unlink()
    out = tmp_path / 'out'
    options = EncodeOptions(resolution=32, part_size=2, batch_size=1, **QUIET)
    with pytest.raises(ShardReadError, match=rf'cannot read sample \d of {data}.*resumes'):
        encode_latents(str(vae_dir), str(data), str(out), options)
    assert not (out / 'index.json').exists()
    shards[-1].write_bytes(kept)
    summary = encode_latents(str(vae_dir), str(data), str(out), options)
    assert summary.written == 6 and summary.resumed_parts >= 1


def test_nothing_usable_writes_no_dataset(vae_dir, tmp_path):
    data = _mds(tmp_path / 'in', {'image': 'bytes'}, [{'image': b'not an image'}] * 3)
    out = tmp_path / 'out'
    with pytest.raises(NothingEncodedError, match=r'all 3 were skipped \(the first, 0: not a readable image'):
        encode_latents(str(vae_dir), str(data), str(out), EncodeOptions(resolution=32, **QUIET))
    assert not (out / 'index.json').exists() and len(read_skipped(out / 'skipped.jsonl')) == 3


def test_a_split_smaller_than_a_batch_and_a_single_sample(vae_dir, tmp_path):
    write_image(tmp_path / 'one' / 'only.png', photo(50, 40))
    summary = encode_latents(
        str(vae_dir), str(tmp_path / 'one'), str(tmp_path / 'out'), EncodeOptions(resolution=32, batch_size=8, **QUIET)
    )
    assert summary.written == 1
    assert len(StreamingLatentDataset(local=str(tmp_path / 'out'), shuffle=False, batch_size=4)) == 1


def test_a_different_encoding_into_the_same_folder_is_refused(vae_dir, photos, tmp_path):
    out = tmp_path / 'latents'
    encode_latents(str(vae_dir), str(photos), str(out), EncodeOptions(resolution=32, **QUIET))
    with pytest.raises(OutputExistsError, match='--overwrite'):
        encode_latents(str(vae_dir), str(photos), str(out), EncodeOptions(resolution=32, dtype='bfloat16', **QUIET))
    encode_latents(
        str(vae_dir), str(photos), str(out), EncodeOptions(resolution=32, dtype='bfloat16', overwrite=True, **QUIET)
    )
    assert json.loads((out / 'latents.json').read_text())['dtype'] == 'bfloat16'


def test_errors_a_user_can_fix(vae_dir, tmp_path):
    tiny_vq().save_pretrained(tmp_path / 'vq')
    (tmp_path / 'imgs').mkdir()
    write_image(tmp_path / 'imgs' / 'a.png', photo(40, 40))
    with pytest.raises(ValueError, match='VQModel: encoding stores the Gaussian posterior'):
        encode_latents(str(tmp_path / 'vq'), str(tmp_path / 'imgs'), str(tmp_path / 'o'), EncodeOptions(resolution=32))
    with pytest.raises(FileNotFoundError, match='neither an MDS dataset'):
        encode_latents(str(vae_dir), str(tmp_path / 'nope'), str(tmp_path / 'o2'), EncodeOptions(resolution=32))
    with pytest.raises(ValueError, match='--resolution 30 must be a multiple of 8, the downsampling factor'):
        encode_latents(str(vae_dir), str(tmp_path / 'imgs'), str(tmp_path / 'o3'), EncodeOptions(resolution=30))
    with pytest.raises(ValueError, match='limit must be positive, got 0'):
        EncodeOptions(limit=0)
    with pytest.raises(ValueError, match='seed must be non-negative'):
        EncodeOptions(seed=-1)
    with pytest.raises(ValueError, match='must be a local .* upload it'):
        encode_latents(str(vae_dir), str(tmp_path / 'imgs'), 's3://bucket/latents', EncodeOptions(resolution=32))
    with pytest.raises(FileNotFoundError, match='latents.json'):
        convert(
            'folder', str(tmp_path / 'images-mds'), input=str(tmp_path / 'imgs'), options=ConvertOptions(progress=False)
        )
        StreamingLatentDataset(local=str(tmp_path / 'images-mds'))
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            '--vae',
            str(vae_dir),
            '--data',
            str(tmp_path / 'nope'),
            '--out',
            str(tmp_path / 'x'),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, 'PYTHONPATH': str(REPO)},
    )
    assert result.returncode == 2 and result.stderr.count('\n') == 1 and 'neither an MDS dataset' in result.stderr


def _command(vae_dir: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(SCRIPT),
        '--vae',
        str(vae_dir),
        '--data',
        str(data),
        '--out',
        str(out),
        '--resolution',
        '64',
        '--part-size',
        '8',
        '--batch-size',
        '4',
        '--no-progress',
        *extra,
    ]


def _without_state(folder: Path) -> dict[str, bytes]:
    return {name: data for name, data in dataset_files(folder).items() if not name.startswith('.encode')}


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_output(vae_dir, tmp_path):
    _photos(tmp_path / 'many', count=160)
    env = {**os.environ, 'PYTHONPATH': str(REPO)}
    whole = subprocess.run(
        _command(vae_dir, tmp_path / 'many', tmp_path / 'whole'), env=env, cwd=REPO, capture_output=True, text=True
    )
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / 'killed'
    process = subprocess.Popen(_command(vae_dir, tmp_path / 'many', out), env=env, cwd=REPO)
    state = out / '.encode'
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if state.is_dir() and sum(n.startswith('part_') for n in os.listdir(state)) >= 3:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = sum(n.startswith('part_') for n in os.listdir(state))
    assert 3 <= finished < 20 and not (out / 'index.json').exists()  # killed part-way
    resumed = subprocess.run(
        _command(vae_dir, tmp_path / 'many', out), env=env, cwd=REPO, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f'resumed: {finished} parts' in resumed.stdout
    resumed_files, whole_files = _without_state(out), _without_state(tmp_path / 'whole')
    assert set(resumed_files) == set(whole_files)
    # Indexes, latents.json and every sample's key and label byte for byte; the latents to their storage precision:
    # the same encoder on the same batch in two processes once differed in the last bits of one part (a fresh-clone
    # suite run; CPU kernels may take different vector paths for differently aligned buffers).
    assert {n: d for n, d in resumed_files.items() if not n.endswith('.mds')} == {
        n: d for n, d in whole_files.items() if not n.endswith('.mds')
    }
    resumed_samples, whole_samples = _samples(out), _samples(tmp_path / 'whole')
    assert len(resumed_samples) == len(whole_samples) == 160
    for mine, theirs in zip(resumed_samples, whole_samples):
        assert mine.keys() == theirs.keys()
        for column, value in mine.items():
            if isinstance(value, np.ndarray) and value.dtype.kind == 'f':
                np.testing.assert_allclose(
                    value.astype(np.float32), theirs[column].astype(np.float32), rtol=2e-3, atol=1e-4
                )
            else:
                assert (
                    np.array_equal(value, theirs[column]) if isinstance(value, np.ndarray) else value == theirs[column]
                )


def _samples(folder: Path) -> list[dict]:
    from streaming import StreamingDataset

    dataset = StreamingDataset(local=str(folder), shuffle=False, batch_size=1)
    return [dataset.get_item(i) for i in range(dataset.num_samples)]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_write_what_one_process_writes(vae_dir, tmp_path):
    _photos(tmp_path / 'many', count=40)
    env = {**os.environ, 'PYTHONPATH': str(REPO)}
    one = subprocess.run(
        _command(vae_dir, tmp_path / 'many', tmp_path / 'one', '--flip'),
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    launcher = [sys.executable, '-m', 'composer.cli.launcher', '-n', '2']
    two = subprocess.run(
        launcher + _command(vae_dir, tmp_path / 'many', tmp_path / 'two', '--flip')[1:],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert two.returncode == 0, two.stdout[-2000:] + two.stderr[-2000:]
    assert 'this rank (0 of 2) encoded 24;' in two.stdout  # parts 0, 2, 4 of 8, 8, 8, 8, 8 samples
    assert _without_state(tmp_path / 'two') == _without_state(tmp_path / 'one')


@pytest.mark.slow
def test_reads_images_from_and_streams_latents_from_an_object_store(vae_dir, bucket, photos, tmp_path):  # noqa: F811
    convert('folder', bucket.uri('images'), input=str(photos), options=ConvertOptions(progress=False))
    out = tmp_path / 'latents'
    summary = encode_latents(
        str(vae_dir),
        bucket.uri('images'),
        str(out),
        EncodeOptions(resolution=32, **QUIET),
        local=str(tmp_path / 'cache'),
    )
    assert summary.written == 7
    for name, data in dataset_files(out).items():
        bucket.put(f'latents/{name}', data)
    remote = StreamingLatentDataset(remote=bucket.uri('latents'), local=str(tmp_path / 'stream'), shuffle=False)
    local = StreamingLatentDataset(local=str(out), shuffle=False)
    assert remote.scaling_factor == 1.5305
    assert all(torch.equal(remote[i]['latent'], local[i]['latent']) for i in range(7))
