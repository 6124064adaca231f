"""A long-lived process (a notebook, a service) that builds datasets in a loop holds a flat number of /dev/shm
file descriptors: the library releases the shared memory streaming opened for a dataset once it is done."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from eqvae_composer.compat import release_shared_memory
from eqvae_composer.data.convert import ConvertOptions, convert
from eqvae_composer.data.dataset import build_image_dataloader
from eqvae_composer.evaluation import EvalProtocol, build_eval_dataset, evaluate
from eqvae_composer.latents import EncodeOptions, StreamingLatentDataset, encode_latents
from tests.conftest import tiny_vae
from tests.data_fixtures import photo, streaming_env, write_image  # noqa: F401  (fixture, used by name)

pytestmark = pytest.mark.usefixtures('streaming_env')


@pytest.fixture
def release_streaming_shared_memory():
    """Overrides conftest's autouse fixture of this name, which releases after each test what streaming
    opened in it: here the library must do it, so nothing else may."""
    from streaming.base.shared import memory

    assert memory.SharedMemory.__init__.__qualname__ == 'SharedMemory.__init__'  # streaming's own, unrecorded
    yield


def _shm_descriptors() -> int:
    """This process's open file descriptors into /dev/shm (two per block: its fd and its mmap's)."""
    count = 0
    for fd in os.listdir('/proc/self/fd'):
        try:
            count += os.readlink(f'/proc/self/fd/{fd}').startswith('/dev/shm/')
        except OSError:  # closed since listed (the listing's own descriptor)
            continue
    return count


@pytest.fixture
def images_mds(tmp_path) -> Path:
    for i in range(2):
        write_image(tmp_path / 'images' / '0' / f'{i}.jpg', photo(40, 36, seed=i))
    convert('folder', str(tmp_path / 'mds'), input=str(tmp_path / 'images'), options=ConvertOptions(progress=False))
    return tmp_path / 'mds'


def test_evaluating_50_times_in_one_process_keeps_the_shm_descriptors_flat(images_mds):
    vae = tiny_vae(blocks=2)
    counts = []
    for _ in range(50):  # as scripts/eval.py does, once per call: the previous dataset is dropped when rebound
        dataset = build_eval_dataset(images_mds, 16)
        evaluate(vae, dataset, ['psnr'], EvalProtocol(16), batch_size=2, progress=False)
        counts.append(_shm_descriptors())
        if counts[-1] != counts[0]:
            break  # streaming alone: 12, 36, 72, ..., up to 'Too many open files' for the whole test session
    assert counts == [counts[0]] * 50, counts


def test_training_loaders_latent_datasets_and_encodings_in_a_loop_keep_the_shm_descriptors_flat(images_mds, tmp_path):
    vae_dir = tmp_path / 'vae'
    tiny_vae(blocks=2).save_pretrained(vae_dir)
    options = EncodeOptions(resolution=16, overwrite=True, progress=False)
    counts = []
    for _ in range(8):
        loader = build_image_dataloader(local=str(images_mds), batch_size=2, drop_last=False, resolution=16)
        assert next(iter(loader))['image'].shape == (2, 3, 16, 16)
        encode_latents(str(vae_dir), str(images_mds), str(tmp_path / 'latents'), options)  # reads it as MDS
        latents = StreamingLatentDataset(local=str(tmp_path / 'latents'), batch_size=2)
        assert latents[0]['latent'].shape == (4, 8, 8)
        counts.append(_shm_descriptors())
        if counts[-1] != counts[0]:
            break
    assert counts == [counts[0]] * 8, counts


def test_resuming_mid_epoch_in_a_loop_keeps_the_shm_descriptors_flat(images_mds):
    kwargs = dict(local=str(images_mds), batch_size=1, drop_last=False, resolution=16)
    counts = []
    for _ in range(6):
        loader = build_image_dataloader(**kwargs)
        next(iter(loader))
        state = loader.state_dict()  # one sample into epoch 0
        loader = build_image_dataloader(**kwargs)
        loader.load_state_dict(state)  # streaming: a 'resume' block, kept until exit
        assert [len(batch['image']) for epoch in range(2) for batch in loader] == [1, 1, 1]  # each epoch attaches it
        counts.append(_shm_descriptors())
        if counts[-1] != counts[0]:
            break  # streaming alone: 6 more per round
    assert counts == [counts[0]] * 6, counts


def test_a_released_dataset_frees_its_prefix_for_the_next(images_mds):
    before = _shm_descriptors()
    first = build_eval_dataset(images_mds, 16)
    prefix = first._shm_prefix_int
    assert _shm_descriptors() > before
    release_shared_memory(first)
    release_shared_memory(first)  # idempotent
    assert _shm_descriptors() == before
    second = build_eval_dataset(images_mds, 16)
    assert second._shm_prefix_int == prefix  # streaming alone: the next prefix, as long as the process lives
    assert torch.equal(second[0]['image'], build_eval_dataset(images_mds, 16)[0]['image'])
