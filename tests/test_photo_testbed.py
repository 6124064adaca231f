"""scripts/photo_testbed.py: the allow-list, the split by photograph, the crops, the licences, the manifest."""

import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from scripts import photo_testbed
from scripts.photo_testbed import CropSpec, Photo
from tests.data_fixtures import photo as smooth_photo
from tests.data_fixtures import read_mds, write_image

COPYRIGHT = """Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: backgrounds

Files: *
Copyright: 2010, Everyone
License: GPL-2+

Files: nature/Aqua.jpg
       nature/Garden.jpg
Copyright: 2008, Charles Barbin
           2009, Someone Else
License: CC-BY-4.0
Comment: an exact name

Files: nature/*
Copyright: 2011, Nature Folks
License: MIT

Files: desktop/Stripes-*.png
Copyright: 2014, Stripe Maker
License: CC0-1.0

Files: debian/*
Copyright: 2020, The Packager
License: GPL-3+
 The licence's text, a continuation line.
"""


def test_locate_keeps_the_allow_listed_files_only_and_names_every_missing_one(tmp_path):
    write_image(tmp_path / 'pkg-a/usr/share/bg/sea.jpg', smooth_photo(40, 30))
    write_image(tmp_path / 'pkg-a/usr/share/bg/logo.png', smooth_photo(40, 30))  # an illustration: not listed
    write_image(tmp_path / 'pkg-b/usr/share/wp/Leaf/contents/images/2560x1600.jpg', smooth_photo(40, 30))
    sea = Photo('sea', 'pkg-a', 'usr/share/bg/sea.jpg')
    leaf = Photo('Leaf', 'pkg-b', 'usr/share/wp/Leaf/contents/images/2560x1600.jpg')
    found = photo_testbed.locate_photos(str(tmp_path), (sea, leaf))
    assert list(found) == [sea, leaf]
    assert found[sea] == str(tmp_path / 'pkg-a/usr/share/bg/sea.jpg')
    assert not any(path.endswith('logo.png') for path in found.values())

    gone = Photo('gone', 'pkg-b', 'usr/share/bg/gone.jpg')
    other = Photo('other', 'pkg-c', 'x.jpg')
    with pytest.raises(FileNotFoundError, match=r'pkg-b: /usr/share/bg/gone.jpg; pkg-c: /x.jpg.*ALLOW_LIST'):
        photo_testbed.locate_photos(str(tmp_path), (sea, gone, other))
    with pytest.raises(ValueError, match='unique'):
        photo_testbed.locate_photos(str(tmp_path), (sea, Photo('sea', 'pkg-b', leaf.path)))


def test_the_split_is_by_photograph_and_no_photograph_is_in_both():
    photos = [Photo(name, 'pkg', f'{name}.jpg') for name in ('a', 'b', 'c', 'd')]
    splits = photo_testbed.split_photos(photos, held_out=('d', 'b'))
    assert [p.name for p in splits['train']] == ['a', 'c'] and [p.name for p in splits['val']] == ['b', 'd']
    with pytest.raises(ValueError, match=r"\['e'\] are not in the allow-list"):
        photo_testbed.split_photos(photos, held_out=('a', 'e'))
    with pytest.raises(ValueError, match='train split would have no photograph'):
        photo_testbed.split_photos(photos, held_out=('a', 'b', 'c', 'd'))

    # The shipped allow-list: 37 photographs, unique names, 6 held out, none of them trained on.
    real = photo_testbed.split_photos(photo_testbed.ALLOW_LIST)
    train, val = ({p.name for p in real[s]} for s in ('train', 'val'))
    assert len(train) == 31 and val == set(photo_testbed.HELD_OUT) and not train & val
    assert len({p.name for p in photo_testbed.ALLOW_LIST}) == len(photo_testbed.ALLOW_LIST) == 37


def test_crops_come_from_the_photograph_shrunk_to_the_work_side():
    # Brightness = row / (height - 1): a crop's brightness range tells how many of the photograph's rows it spans.
    height, width = 600, 900
    rows = np.repeat(np.linspace(0, 255, height)[:, None], width, axis=1)
    image = Image.fromarray(np.stack([rows] * 3, axis=-1).round().astype(np.uint8))
    spec = CropSpec(work_side=120, crop_sides=(60, 100))
    crops = photo_testbed.photo_crops(image, 'gradient', 6, spec)
    assert len(crops) == 6
    for crop in crops:
        assert crop.mode == 'RGB' and all(60 <= side <= 100 for side in crop.size)
        assert max(crop.size) / min(crop.size) <= 1.25 + 1e-9
        values = np.asarray(crop)[..., 0].astype(float)
        # Shrunk to 120 rows, a crop of h rows spans (h - 1) / 119 of the range; cut from the 600-row original
        # it would span only (h - 1) / 599 of it.
        span = values[-1].mean() - values[0].mean()
        assert span == pytest.approx(255 * (crop.height - 1) / 119, abs=6)
    again = photo_testbed.photo_crops(image, 'gradient', 6, spec)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(crops, again))  # seeded by the name
    other = photo_testbed.photo_crops(image, 'another name', 6, spec)
    assert not all(a.size == b.size for a, b in zip(crops, other))
    with pytest.raises(ValueError, match=r'small is 100x90: its shorter side is below work_side 120'):
        photo_testbed.photo_crops(Image.new('RGB', (100, 90)), 'small', 1, spec)
    with pytest.raises(ValueError, match='crop_sides'):
        CropSpec(work_side=120, crop_sides=(60, 130))


def test_licence_of_reads_the_debian_copyright_file():
    licence = lambda path: photo_testbed.licence_of(COPYRIGHT, path)  # noqa: E731
    # an exact name wins over a later wildcard; continuation lines join the list of names and holders
    assert licence('usr/share/backgrounds/mate/nature/Aqua.jpg') == {
        'licence': 'CC-BY-4.0',
        'copyright': '2008, Charles Barbin / 2009, Someone Else',
    }
    assert licence('usr/share/backgrounds/mate/nature/Garden.jpg')['licence'] == 'CC-BY-4.0'
    assert licence('usr/share/backgrounds/mate/nature/Dune.jpg')['licence'] == 'MIT'  # the last wildcard
    assert licence('usr/share/backgrounds/mate/desktop/Stripes-Dark.png')['licence'] == 'CC0-1.0'
    # the folder must match too; debian/* is the packaging's, not every file's
    assert licence('usr/share/backgrounds/mate/abstract/Stripes-Dark.png')['licence'] == 'GPL-2+'
    assert licence('usr/share/backgrounds/other.jpg') == {'licence': 'GPL-2+', 'copyright': '2010, Everyone'}
    assert photo_testbed.licence_of('Format: x\n\nFiles: *.png\nLicense: MIT\n', 'a.jpg')['licence'] == 'unknown'


def test_write_testbed_writes_shards_of_both_splits_and_a_manifest(tmp_path):
    root = tmp_path / 'root'
    sizes = {'hill': (240, 160), 'lake': (200, 200), 'dog': (160, 220)}
    photos = [Photo(name, 'pkg', f'usr/share/backgrounds/nature/{name}.jpg') for name in sizes]
    for p, (name, size) in zip(photos, sizes.items()):
        write_image(root / 'pkg' / p.path, smooth_photo(*size, seed=len(name)), quality=90)
    files = photo_testbed.locate_photos(str(root), photos)
    splits = photo_testbed.split_photos(photos, held_out=('dog',))
    packages = {'pkg': {'version': '1.0-1', 'copyright': COPYRIGHT}}
    spec = CropSpec(work_side=120, crop_sides=(40, 60), train_per_photo=3, val_per_photo=2)
    out = tmp_path / 'testbed'

    manifest = photo_testbed.write_testbed(files, splits, packages, str(out), spec)

    train, val = read_mds(out / 'train'), read_mds(out / 'val')
    assert len(train) == 6 and len(val) == 2
    assert {s['key'].split('/')[0] for s in train} == {'hill', 'lake'} and {s['key'] for s in val} == {
        'dog/0000.jpg',
        'dog/0001.jpg',
    }
    for sample in train + val:
        with Image.open(io.BytesIO(sample['image'])) as crop:
            assert crop.format == 'JPEG' and all(40 <= side <= 60 for side in crop.size)
    assert not (out / 'crops').exists()  # the staging folder is gone
    assert json.loads((out / 'manifest.json').read_text()) == manifest
    assert manifest['images'] == {'train': 6, 'val': 2}
    assert manifest['splits'] == {'train': ['hill', 'lake'], 'val': ['dog']}
    assert manifest['spec']['crop_sides'] == [40, 60] and manifest['packages'] == packages
    by_name = {entry['name']: entry for entry in manifest['photos']}
    dog = by_name['dog']
    assert (dog['width'], dog['height'], dog['split'], dog['version']) == (160, 220, 'val', '1.0-1')
    assert dog['file'] == '/usr/share/backgrounds/nature/dog.jpg' and dog['licence'] == 'MIT'
    assert dog['sha256'] == hashlib.sha256((root / 'pkg' / photos[2].path).read_bytes()).hexdigest()
