"""StreamingImageDataset and its dataloader: transforms, other column layouts, streams, resumption."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from streaming import MDSWriter
from streaming.base.partition import get_partitions

from eqvae_composer.data.convert import ConvertOptions, convert
from eqvae_composer.data.dataset import (
    PADDING_KEY,
    EmptyDatasetError,
    StreamingImageDataset,
    build_image_dataloader,
    padding_mask,
    sample_rng,
)
from eqvae_composer.data.transforms import open_image, sample_train_box
from tests.data_fixtures import jpeg_bytes, photo, streaming_env  # noqa: F401  (fixture, used by name)

# Every test here creates StreamingDatasets, whose shared memory must not leak into the next test.
pytestmark = pytest.mark.usefixtures('streaming_env')


@pytest.fixture(scope='module')
def demo_mds(tmp_path_factory):
    out = tmp_path_factory.mktemp('demo') / 'mds'
    convert('demo', str(out), options=ConvertOptions(progress=False, workers=1))
    return out


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format='PNG')
    return buf.getvalue()


def _solid_dataset(path, levels, size=(24, 16)) -> None:
    """One flat-grey image per level: a sample's identity survives any crop and resize as its mean."""
    with MDSWriter(out=str(path), columns={'image': 'bytes', 'key': 'str'}, size_limit=1 << 10) as writer:
        for level in levels:
            writer.write({'image': _png(Image.new('RGB', size, (level,) * 3)), 'key': str(level)})


def _levels(batch: dict[str, torch.Tensor]) -> list[int]:
    return [round((x.mean().item() + 1) * 127.5) for x in batch['image']]


def test_train_and_eval_batches(demo_mds, tmp_path):
    loader = build_image_dataloader(batch_size=8, drop_last=True, local=str(demo_mds / 'train'), resolution=32)
    batch = next(iter(loader))
    assert batch['image'].shape == (8, 3, 32, 32) and batch['image'].dtype == torch.float32
    assert -1 <= batch['image'].min() < 0 < batch['image'].max() <= 1
    evaluation = StreamingImageDataset(local=str(demo_mds / 'val'), train=False, resolution=48, output_key='x')
    assert evaluation.shuffle is False and evaluation.num_samples == 40
    first = evaluation[0]['x']
    assert first.shape == (3, 48, 48) and torch.equal(first, evaluation[0]['x'])  # deterministic


def test_train_crops_reproducible_per_seed_epoch_and_index(demo_mds):
    dataset = StreamingImageDataset(local=str(demo_mds / 'train'), resolution=16, shuffle_seed=7)
    a, b = dataset[3]['image'], dataset[3]['image']
    assert torch.equal(a, b)  # same (seed, epoch, index): same crop
    rng = sample_rng(dataset, 3)
    assert rng.uniform() == np.random.default_rng((7, 0, 3)).uniform()
    assert not torch.equal(dataset[3]['image'], dataset[4]['image'])


def test_resize_filter_reaches_the_training_crop_and_is_refused_for_eval(demo_mds):
    area = StreamingImageDataset(
        local=str(demo_mds / 'train'), resolution=32, shuffle_seed=7, draft=False, resize_filter='area_cv2'
    )
    default = StreamingImageDataset(local=str(demo_mds / 'train'), resolution=32, shuffle_seed=7, draft=False)
    # The same crop, resized by the reference's filter: OpenCV's INTER_AREA on the uint8 crop.
    import cv2

    img = open_image(area.get_item(3)['image']).convert('RGB')
    left, top, right, bottom = sample_train_box(*img.size, np.random.default_rng((7, 0, 3)))
    crop = np.ascontiguousarray(np.asarray(img)[top:bottom, left:right])
    expected = cv2.resize(crop, (32, 32), interpolation=cv2.INTER_AREA)
    got = ((area[3]['image'] + 1) * 127.5).round().permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, expected)
    assert not torch.equal(area[3]['image'], default[3]['image'])
    with pytest.raises(ValueError, match='applies to the training crop'):
        StreamingImageDataset(local=str(demo_mds / 'val'), train=False, resize_filter='area_cv2')


def test_x_column_dataset_like_streaming_imagenet_converter(tmp_path):
    # streaming.vision.convert.imagenet declares {'i': 'int', 'x': 'jpeg', 'y': 'int'}; its `jpeg`
    # encoding stores an opened JPEG file's original bytes and decodes to a lazily opened PIL image.
    files = []
    for i in range(6):
        path = tmp_path / 'raw' / f'{i}.JPEG'
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(jpeg_bytes(photo(600, 450, i)))
        files.append(path)
    with MDSWriter(out=str(tmp_path / 'mds'), columns={'i': 'int', 'x': 'jpeg', 'y': 'int'}) as writer:
        for i, path in enumerate(files):
            writer.write({'i': i, 'x': Image.open(path), 'y': i % 2})
    loader = build_image_dataloader(
        batch_size=3, drop_last=False, local=str(tmp_path / 'mds'), image_column='x', resolution=64, train=False
    )
    batches = list(loader)
    assert [b['image'].shape for b in batches] == [(3, 3, 64, 64)] * 2
    with pytest.raises(KeyError, match='image_column'):
        loader.dataset.image_column = 'image'  # the default name is not a column of this dataset
        loader.dataset[0]


def test_streams_from_dicts_with_proportions(tmp_path):
    _solid_dataset(tmp_path / 'dark', [10] * 20)
    _solid_dataset(tmp_path / 'bright', [240] * 20)
    loader = build_image_dataloader(
        batch_size=10,
        drop_last=True,
        resolution=8,
        epoch_size=40,
        streams=[
            {'local': str(tmp_path / 'dark'), 'proportion': 0.75},
            {'local': str(tmp_path / 'bright'), 'proportion': 0.25},
        ],
    )
    levels = [level for batch in loader for level in _levels(batch)]
    assert len(levels) == 40 and levels.count(10) == 30 and levels.count(240) == 10


def test_streams_as_a_mapping_of_names(tmp_path):
    # llm-foundry's YAMLs write `streams: {name: {local: ..., ...}}`; the names only label the streams.
    _solid_dataset(tmp_path / 'dark', [10] * 3)
    _solid_dataset(tmp_path / 'bright', [240] * 5)
    loader = build_image_dataloader(
        batch_size=4,
        drop_last=False,
        resolution=8,
        train=False,
        streams={'dark': {'local': str(tmp_path / 'dark')}, 'bright': {'local': str(tmp_path / 'bright')}},
    )
    levels = [level for batch in loader for level in _levels(batch)]
    assert sorted(levels) == [10] * 3 + [240] * 5


@pytest.mark.parametrize('algo', ['orig', 'relaxed'])
@pytest.mark.parametrize(
    'samples, nodes, ranks, workers, batch',
    [
        (5, 1, 2, 1, 2),  # one rank gets a repeat
        (1, 1, 2, 1, 4),  # one rank gets nothing but a repeat
        (7, 1, 3, 2, 2),
        (11, 2, 2, 2, 3),  # two nodes: repeats at the node level too
        (40, 1, 8, 2, 4),
    ],
)
def test_padding_mask_counts_each_sample_once_across_ranks_and_workers(algo, samples, nodes, ranks, workers, batch):
    partition = get_partitions(algo, samples, nodes, nodes, ranks, workers, batch)
    counted, yielded = [], 0
    for node in range(nodes):
        for rank in range(ranks):
            for worker in range(workers):
                ids = partition[node, rank, worker].reshape(-1)
                ids = ids[ids != -1]  # StreamingDataset never yields these
                padding = padding_mask(partition, node, rank, worker)
                assert padding.shape == ids.shape
                counted += ids[~padding].tolist()
                yielded += len(ids)
    assert sorted(counted) == list(range(samples))
    if samples % (nodes * ranks):
        assert yielded > samples  # the partition did repeat samples, and the mask dropped them


def test_eval_iteration_flags_no_padding_on_one_process(tmp_path):
    _solid_dataset(tmp_path / 'solid', LEVELS[:7])
    loader = build_image_dataloader(
        batch_size=3, drop_last=False, local=str(tmp_path / 'solid'), resolution=8, train=False
    )
    batches = list(loader)
    assert [len(b[PADDING_KEY]) for b in batches] == [3, 3, 1] and not any(b[PADDING_KEY].any() for b in batches)
    assert PADDING_KEY not in next(
        iter(build_image_dataloader(batch_size=3, drop_last=True, local=str(tmp_path / 'solid'), resolution=8))
    )


def test_empty_local_dataset_is_named(tmp_path):
    with MDSWriter(out=str(tmp_path / 'empty'), columns={'image': 'bytes'}):
        pass
    with pytest.raises(EmptyDatasetError, match=f'{tmp_path / "empty"} holds no samples'):
        StreamingImageDataset(local=str(tmp_path / 'empty'))


def test_missing_local_dataset_names_path_and_command(tmp_path):
    missing = tmp_path / 'nowhere' / 'train'
    with pytest.raises(FileNotFoundError) as info:
        build_image_dataloader(batch_size=2, drop_last=True, local=str(missing))
    message = str(info.value)
    assert str(missing) in message and f'python convert_dataset.py --out {tmp_path / "nowhere"}' in message
    (tmp_path / 'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='index.json'):
        StreamingImageDataset(streams=[{'local': str(tmp_path / 'empty')}])


LEVELS = list(range(10, 250, 6))  # 40 distinct samples


def test_mid_epoch_resume_sees_each_remaining_sample_once(tmp_path):
    from streaming.base.util import clean_stale_shared_memory

    _solid_dataset(tmp_path / 'solid', LEVELS)
    kwargs = dict(batch_size=4, drop_last=True, local=str(tmp_path / 'solid'), resolution=8, shuffle_seed=3)
    loader = build_image_dataloader(**kwargs)
    seen, it = [], iter(loader)
    for _ in range(4):  # 16 of 40 samples
        seen += _levels(next(it))
    state = loader.state_dict()
    # Composer checkpoints the dataset through its own state_dict, counting from the epoch start.
    assert loader.dataset.state_dict(16, True) == state
    del it, loader
    clean_stale_shared_memory()

    resumed = build_image_dataloader(**kwargs)
    resumed.load_state_dict(state)
    rest = [level for batch in resumed for level in _levels(batch)]
    assert len(rest) == 24 and not set(seen) & set(rest)
    assert sorted(seen + rest) == LEVELS


def test_worker_processes_cover_epoch_exactly_once(tmp_path):
    _solid_dataset(tmp_path / 'solid', LEVELS)
    loader = build_image_dataloader(
        batch_size=4, drop_last=False, num_workers=2, local=str(tmp_path / 'solid'), resolution=8, prefetch_factor=2
    )
    levels = [level for batch in loader for level in _levels(batch)]
    assert sorted(levels) == LEVELS


@pytest.fixture(params=['no process group', 'process group of one'])
def process_group(request, tmp_path):
    """As a script runs, or as ``composer -n 1`` runs it (a gloo group of one rank)."""
    import torch.distributed as torch_dist

    created = request.param == 'process group of one' and not torch_dist.is_initialized()
    if created:
        torch_dist.init_process_group('gloo', init_method=f'file://{tmp_path}/pg', rank=0, world_size=1)
    yield
    if created:
        torch_dist.destroy_process_group()


@pytest.mark.usefixtures('process_group')
def test_a_dataset_that_loses_streamings_shared_memory_race_takes_the_next_prefix(tmp_path, monkeypatch):
    """Another process registers the prefix our dataset found free before our dataset creates it."""
    from streaming.base.constant import LOCALS
    from streaming.base.shared import prefix as shm_prefix
    from streaming.base.shared.memory import SharedMemory

    _solid_dataset(tmp_path / 'mds', [10, 20])
    real_find = shm_prefix._check_and_find_retrying
    rivals = []

    def find_then_lose_the_race(streams_local, streams_remote, shm_name, retry):
        found = real_find(streams_local, streams_remote, shm_name, retry)
        if shm_name == LOCALS and not rivals:  # the rival wins once, between our check and our create
            data = shm_prefix._pack_locals([str(tmp_path / 'rival')], found)
            rival = SharedMemory(shm_prefix._get_path(found, LOCALS), True, len(data))
            rival.buf[: len(data)] = data
            rivals.append((found, rival))
        return found

    monkeypatch.setattr(shm_prefix, '_check_and_find_retrying', find_then_lose_the_race)
    try:
        dataset = StreamingImageDataset(local=str(tmp_path / 'mds'), resolution=8, train=False, batch_size=2)
        lost, _ = rivals[0]
        assert dataset._shm_prefix_int > lost
        assert sorted(_levels({'image': torch.stack([dataset[i]['image'] for i in range(2)])})) == [10, 20]
    finally:
        for _, rival in rivals:
            rival.cleanup()
