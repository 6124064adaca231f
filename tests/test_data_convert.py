"""Raw folders -> MDS: every source layout, bad inputs, reports, parallel = serial, resume (remote outputs: see
test_data_object_store.py)."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import convert_dataset
from eqvae_composer.data.convert import ConvertOptions, NoUsableImagesError, OutputExistsError, convert, convert_split
from eqvae_composer.data.demo import DEMO_EVAL_PHOTOS, DEMO_TRAIN_PHOTOS
from eqvae_composer.data.sources import list_folder
from tests.data_fixtures import (
    dataset_files,
    jpeg_bytes,
    photo,
    read_mds,
    read_skipped,
    write_image,
    write_many_images,
)

QUIET = ConvertOptions(progress=False, workers=1)


def _options(**kwargs) -> ConvertOptions:
    return ConvertOptions(**{**QUIET.__dict__, **kwargs})


def _write_bytes(path, data: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(data)
    return str(path)


@pytest.fixture
def messy_folder(tmp_path):
    """A tree with good images of every colour kind, bad files, and a non-image file."""
    root = tmp_path / 'messy'
    write_image(root / 'a' / 'rgb.jpg', photo(64, 48, 1), quality=90)
    write_image(root / 'a' / 'gray.jpg', photo(40, 30, 2).convert('L'))
    write_image(root / 'a' / 'cmyk.jpg', photo(40, 30, 3).convert('CMYK'))
    write_image(root / 'b' / 'palette.png', photo(30, 30, 4).quantize(16))
    write_image(root / 'b' / 'rgba.png', photo(30, 20, 5).convert('RGBA'))
    write_image(root / 'b' / 'deep.png', Image.fromarray((np.arange(600, dtype=np.uint16) * 100).reshape(20, 30)))
    write_image(root / 'b' / 'tiny.jpg', photo(8, 6, 6))
    exif = Image.Exif()
    exif[0x0112] = 6
    write_image(root / 'c' / 'rotated.jpg', photo(60, 30, 7), exif=exif)
    full = jpeg_bytes(photo(200, 150, 8))
    _write_bytes(root / 'c' / 'truncated.jpg', full[: len(full) // 2])
    _write_bytes(root / 'c' / 'empty.jpg', b'')
    _write_bytes(root / 'c' / 'text.jpg', b'this is not an image\n')
    _write_bytes(root / 'notes.txt', b'ignored: no image extension\n')
    return root


GOOD = [
    'a/cmyk.jpg',
    'a/gray.jpg',
    'a/rgb.jpg',
    'b/deep.png',
    'b/palette.png',
    'b/rgba.png',
    'b/tiny.jpg',
    'c/rotated.jpg',
]
BAD = {'c/empty.jpg': 'empty file', 'c/text.jpg': 'not an image', 'c/truncated.jpg': 'truncated'}


def test_folder_source_bad_inputs_and_report(messy_folder, tmp_path):
    out = tmp_path / 'out'
    (summary,) = convert('folder', str(out), input=str(messy_folder), options=QUIET)
    samples = read_mds(out)
    assert [s['key'] for s in samples] == GOOD  # sorted, recursive
    for sample in samples:  # every stored image decodes, as the loader will, to RGB without special cases
        assert Image.open(io.BytesIO(sample['image'])).convert('RGB').mode == 'RGB'
    assert samples[2]['image'] == (messy_folder / 'a' / 'rgb.jpg').read_bytes()  # JPEG bytes as-is
    rotated = Image.open(io.BytesIO(samples[-1]['image']))
    assert rotated.size == (30, 60)
    assert summary.written == len(GOOD) and summary.ignored == {'.txt': 1}
    assert summary.actions['kept'] == 3  # rgb.jpg, gray.jpg, tiny.jpg; the rest re-encoded
    report = read_skipped(out / 'skipped.jsonl')
    assert len(report) == len(BAD) == len(summary.skipped)
    for record in report:
        key = os.path.relpath(record['path'], messy_folder)
        assert BAD[key] in record['reason']


def test_cli_prints_summary_and_exit_codes(messy_folder, tmp_path, capsys):
    out = tmp_path / 'cli'
    assert (
        convert_dataset.main(
            ['--source', 'folder', '--input', str(messy_folder), '--out', str(out), '--no-progress', '--workers', '1']
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert '8 images written' in printed and 'skipped: 3' in printed
    # Same output, other options: refused with how to restart; exit 2.
    assert (
        convert_dataset.main(
            ['--source', 'folder', '--input', str(messy_folder), '--out', str(out), '--no-progress', '--min-side', '16']
        )
        == 2
    )
    assert '--overwrite' in capsys.readouterr().err
    # Nothing usable: exit 1, with the report written.
    bad = tmp_path / 'bad'
    _write_bytes(bad / 'x.jpg', b'')
    assert (
        convert_dataset.main(
            ['--source', 'folder', '--input', str(bad), '--out', str(tmp_path / 'o2'), '--no-progress']
        )
        == 1
    )
    assert read_skipped(tmp_path / 'o2' / 'skipped.jsonl') == [{'path': str(bad / 'x.jpg'), 'reason': 'empty file'}]
    assert (
        convert_dataset.main(
            ['--source', 'folder', '--input', str(tmp_path / 'missing'), '--out', str(tmp_path / 'o3'), '--no-progress']
        )
        == 1
    )


def _imagenet_tree(root, flat_val: bool):
    wnids = ['n02', 'n01', 'n03']  # deliberately unsorted creation order
    for i, wnid in enumerate(wnids):
        for j in range(2):
            write_image(root / 'train' / wnid / f'{wnid}_{j}.JPEG', photo(32, 24, 10 * i + j), 'JPEG')
    val_labels = {'ILSVRC2012_val_00000001': 'n03', 'ILSVRC2012_val_00000002': 'n01'}
    for image_id, wnid in val_labels.items():
        folder = root / 'val' if flat_val else root / 'val' / wnid
        write_image(folder / f'{image_id}.JPEG', photo(32, 24, 99), 'JPEG')
    if flat_val:
        write_image(root / 'val' / 'ILSVRC2012_val_00000003.JPEG', photo(32, 24, 98), 'JPEG')  # no label
        with open(root / 'LOC_val_solution.csv', 'w', newline='') as f:
            writer = csv.writer(f)
            writer.writerow(['ImageId', 'PredictionString'])
            for image_id, wnid in val_labels.items():
                writer.writerow([image_id, f'{wnid} 1 2 30 20 {wnid} 3 4 10 10'])


@pytest.mark.parametrize('flat_val', [False, True])
def test_imagenet_source_labels(tmp_path, flat_val):
    _imagenet_tree(tmp_path / 'in', flat_val)
    summaries = convert('imagenet', str(tmp_path / 'out'), input=str(tmp_path / 'in'), options=QUIET)
    assert [s.name for s in summaries] == ['train', 'val']
    train = read_mds(tmp_path / 'out' / 'train')
    assert [(s['key'], s['label']) for s in train] == [
        ('train/n01/n01_0.JPEG', 0),
        ('train/n01/n01_1.JPEG', 0),
        ('train/n02/n02_0.JPEG', 1),
        ('train/n02/n02_1.JPEG', 1),
        ('train/n03/n03_0.JPEG', 2),
        ('train/n03/n03_1.JPEG', 2),
    ]
    val = {s['key'].split('/')[-1]: s['label'] for s in read_mds(tmp_path / 'out' / 'val')}
    assert val == {'ILSVRC2012_val_00000001.JPEG': 2, 'ILSVRC2012_val_00000002.JPEG': 0}
    if flat_val:
        (record,) = read_skipped(tmp_path / 'out' / 'val' / 'skipped.jsonl')
        assert record['path'].endswith('ILSVRC2012_val_00000003.JPEG') and 'no known label' in record['reason']


def test_imagenet_split_selection_and_limit(tmp_path):
    _imagenet_tree(tmp_path / 'in', flat_val=False)
    (summary,) = convert(
        'imagenet', str(tmp_path / 'out'), input=str(tmp_path / 'in'), splits=['train'], limit=3, options=QUIET
    )
    keys = [s['key'] for s in read_mds(tmp_path / 'out' / 'train')]
    assert keys == ['train/n01/n01_0.JPEG', 'train/n02/n02_0.JPEG', 'train/n03/n03_0.JPEG']  # spans classes
    assert not (tmp_path / 'out' / 'val').exists()


def test_openimages_source_split_folders_and_flat(tmp_path):
    root = tmp_path / 'oi'
    for split, n in (('train', 3), ('validation', 2)):
        for i in range(n):
            write_image(root / split / f'{i:016x}.jpg', photo(40, 30, i))
    summaries = convert('openimages', str(tmp_path / 'out'), input=str(root), options=QUIET)
    assert {s.name: s.written for s in summaries} == {'train': 3, 'validation': 2}
    assert [s['key'] for s in read_mds(tmp_path / 'out' / 'validation')] == [
        'validation/0000000000000000.jpg',
        'validation/0000000000000001.jpg',
    ]
    assert 'label' not in read_mds(tmp_path / 'out' / 'train')[0]
    (flat,) = convert('openimages', str(tmp_path / 'flat'), input=str(root / 'train'), options=QUIET)
    assert flat.name is None and len(read_mds(tmp_path / 'flat')) == 3


def test_demo_conversion(tmp_path):
    summaries = convert('demo', str(tmp_path / 'mds'), options=QUIET)
    assert {s.name: s.written for s in summaries} == {'train': 7 * 48, 'val': 2 * 20}
    train_photos = {s['key'].split('/')[0] for s in read_mds(tmp_path / 'mds' / 'train')}
    val_samples = read_mds(tmp_path / 'mds' / 'val')
    val_photos = {s['key'].split('/')[0] for s in val_samples}
    assert train_photos == {p.split('.')[0] for p in DEMO_TRAIN_PHOTOS}
    assert val_photos == {p.split('.')[0] for p in DEMO_EVAL_PHOTOS} and not train_photos & val_photos
    img = Image.open(io.BytesIO(val_samples[0]['image']))
    assert img.format == 'PNG' and img.mode == 'RGB' and 96 <= min(img.size) and max(img.size) <= 192
    # Running the same command again finds the output complete and leaves it as it was.
    before = (tmp_path / 'mds' / 'train' / 'index.json').read_bytes()
    again = convert('demo', str(tmp_path / 'mds'), options=QUIET)
    # every part of the finished output is resumed (none redone), and nothing is rewritten
    assert again[0].resumed_parts == -(-7 * 48 // ConvertOptions().part_size) and again[0].processed == 0
    assert (tmp_path / 'mds' / 'train' / 'index.json').read_bytes() == before


@pytest.fixture
def many_images(tmp_path):
    return write_many_images(tmp_path / 'many')


def test_parallel_output_equals_serial_and_shards_split(many_images, tmp_path):
    listing = list_folder(str(many_images))[0]
    serial = convert_split(listing, str(tmp_path / 'serial'), _options(part_size=5, size_limit=1 << 12))
    parallel = convert_split(listing, str(tmp_path / 'parallel'), _options(part_size=5, size_limit=1 << 12, workers=2))
    assert serial.written == parallel.written == 23 and len(parallel.skipped) == 1
    assert dataset_files(tmp_path / 'serial') == dataset_files(tmp_path / 'parallel')  # byte for byte
    index = json.loads((tmp_path / 'parallel' / 'index.json').read_text())
    assert len(index['shards']) > 5  # tiny size_limit: several shards per part
    expected = [f.key for f in listing.files if 'broken' not in f.key]
    assert [s['key'] for s in read_mds(tmp_path / 'parallel')] == expected


def test_interrupted_run_resumes_and_other_outputs_are_refused(many_images, tmp_path):
    out = tmp_path / 'out'
    options = _options(part_size=8)
    listing = list_folder(str(many_images))[0]
    convert_split(listing, str(out), options)
    complete = dataset_files(out)
    # Simulate a crash while writing part 1: no finish marker, a half-written shard, no index yet.
    os.remove(out / '.convert' / 'part_00001.json')
    os.remove(out / 'index.json')
    (out / 'part_00001' / 'shard.00000.mds').write_bytes(b'half a shard')
    resumed = convert_split(listing, str(out), options)
    assert resumed.resumed_parts == 2 and resumed.processed == 8 and resumed.written == 23
    assert dataset_files(out) == complete
    # Other options over the same output: refused, nothing touched.
    with pytest.raises(OutputExistsError, match='--overwrite'):
        convert_split(listing, str(out), _options(part_size=8, min_side=32))
    assert dataset_files(out) == complete
    # A folder with unrelated content: refused.
    (tmp_path / 'other').mkdir()
    (tmp_path / 'other' / 'keep.txt').write_text('mine')
    with pytest.raises(OutputExistsError):
        convert_split(listing, str(tmp_path / 'other'), options)
    # --overwrite starts over.
    assert convert_split(listing, str(out), _options(part_size=8, overwrite=True)).resumed_parts == 0
    assert dataset_files(out) == complete


def test_nothing_usable_raises_with_summaries(tmp_path):
    _write_bytes(tmp_path / 'in' / 'a.jpg', b'')
    with pytest.raises(NoUsableImagesError) as info:
        convert('folder', str(tmp_path / 'out'), input=str(tmp_path / 'in'), options=QUIET)
    assert info.value.summaries[0].written == 0
    assert not (tmp_path / 'out' / 'index.json').exists()


def test_min_side_option_writes_smaller_images(tmp_path):
    write_image(tmp_path / 'in' / 'big.jpg', photo(300, 200))
    convert('folder', str(tmp_path / 'out'), input=str(tmp_path / 'in'), options=_options(min_side=64))
    (sample,) = read_mds(tmp_path / 'out')
    assert Image.open(io.BytesIO(sample['image'])).size == (96, 64)


def test_unwritable_output_exit_code(many_images, tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('a file where the output folder should go')
    assert (
        convert_dataset.main(
            ['--source', 'folder', '--input', str(many_images), '--out', str(blocker / 'sub'), '--no-progress']
        )
        == 2
    )
    shutil.rmtree(many_images)


@pytest.mark.parametrize(
    'hashes, compression',
    [
        ([], None),
        (['md5', 'sha1', 'xxh3_64', 'xxh64'], None),  # hashlib's and xxhash's, updated piece by piece
        (['sha1'], 'zstd'),  # compression: the one-buffer path
    ],
)
def test_lean_writer_writes_the_same_files_as_mdswriter(tmp_path, hashes, compression):
    from streaming import MDSWriter

    from eqvae_composer.data.mds_writer import LeanMDSWriter

    rng = np.random.default_rng(0)
    samples = [
        {'image': rng.bytes(int(n)), 'key': f'img/{i}.JPEG', 'label': i, 'x': rng.bytes(16)}
        for i, n in enumerate(rng.integers(0, 5000, size=40))
    ]
    columns = {'image': 'bytes', 'key': 'str', 'label': 'int', 'x': 'bytes'}
    for name, writer in (('mds', MDSWriter), ('lean', LeanMDSWriter)):
        with writer(
            out=str(tmp_path / name), columns=columns, hashes=hashes, compression=compression, size_limit=30_000
        ) as out:
            for sample in samples:
                out.write(sample)
    files = sorted(os.listdir(tmp_path / 'mds'))
    assert len(files) > 3 and files == sorted(os.listdir(tmp_path / 'lean'))  # several shards, same names
    for name in files:
        assert (tmp_path / 'mds' / name).read_bytes() == (tmp_path / 'lean' / name).read_bytes(), name
