"""Build a wider photograph testbed than scikit-image's 9 demo photographs, from Debian's wallpaper packages.

    python scripts/photo_testbed.py                                  # -> runs/photo-testbed/{train,val,manifest.json}
    python scripts/replicate.py --photos testbed --out runs/replicate-testbed

Debian's desktop-background packages hold real photographs of 1365-6028 px under free licences, beside
illustrations and renders. This script

1. downloads the packages of ``ALLOW_LIST`` with ``apt-get download`` (after ``apt-get update``, unless
   ``--no-update``) into ``--cache`` and unpacks each with ``dpkg -x`` there: nothing is installed;
2. keeps the photographs of ``ALLOW_LIST`` only (picked by looking at every candidate: the illustrations,
   renders and logos are left out) and fails, naming the file, when a package no longer has one;
3. splits them by photograph: the ``HELD_OUT`` ones give the ``val`` split and never appear in ``train``;
4. shrinks each photograph to ``--work-side`` px on its shorter side (antialiased), so that a crop holds a
   part of a scene rather than a patch of texture, and cuts ``--train-per-photo`` / ``--val-per-photo``
   square-ish random crops of ``--crop-sides`` px from it (seeded by the photograph's name);
5. writes each split as image MDS shards through the project's converter (the folder source of
   ``convert_dataset.py``), and ``manifest.json``: every photograph's package, version, file, size, sha256,
   split and licence (from the package's ``/usr/share/doc/<pkg>/copyright``, whose full text it keeps).

The images are not part of the repository: they live in ``--cache`` and ``--out`` only. The demo set
(scikit-image's photographs) stays the default of the demo, of ``replicate.py`` and of CI; this testbed
is for runs that want a base whose latents say something (held-out PSNR well above the demo's 16.6 dB).
Needs ``apt-get`` and ``dpkg-deb`` (Debian or Ubuntu) and the network to the package mirror, once.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zlib
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from typing import Any

if __package__ in (None, ''):  # run as a file: make `eqvae_composer` importable from a checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image

from eqvae_composer.cli import run_cli
from eqvae_composer.data.convert import ConvertOptions, convert_split
from eqvae_composer.data.demo import random_crops
from eqvae_composer.data.sources import list_folder

__all__ = [
    'ALLOW_LIST',
    'DEFAULT_OUT',
    'HELD_OUT',
    'Photo',
    'CropSpec',
    'build_manifest',
    'licence_of',
    'locate_photos',
    'photo_crops',
    'split_photos',
    'write_testbed',
]

DEFAULT_OUT = 'runs/photo-testbed'
DEFAULT_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'eqvae-composer', 'debian-photos')


@dataclass(frozen=True)
class Photo:
    """One allow-listed photograph.

    Attributes:
        name: Unique short name (the crops' folder and the manifest's key).
        package: Debian package that ships it.
        path: Its path inside the package (as ``dpkg -x`` unpacks it).
    """

    name: str
    package: str
    path: str


def _lomiri(name: str, release: str = '16.04') -> Photo:
    return Photo(name.split('_by_')[0], f'lomiri-wallpapers-{release}', f'usr/share/backgrounds/{name}.jpg')


def _mate(name: str) -> Photo:
    return Photo(name, 'mate-backgrounds', f'usr/share/backgrounds/mate/nature/{name}.jpg')


def _plasma(name: str) -> Photo:
    # Every size in a Plasma wallpaper's images/ folder is the same 2560x1600 file.
    return Photo(name, 'plasma-workspace-wallpapers', f'usr/share/wallpapers/{name}/contents/images/2560x1600.jpg')


#: The real photographs among the packages' wallpapers, chosen by looking at each (Debian bookworm). Left out:
#: illustrations and renders (ukui-wallpapers, gnome-backgrounds, sway-backgrounds, xfdesktop4-data, most of
#: Plasma's and MATE's abstract/desktop folders, lomiri's Fossa, Infinite-Sea, Painting-Colors and umang) and
#: the ambiguous texture analogpattern_by_Peter_Nerlich.
ALLOW_LIST: tuple[Photo, ...] = (
    *(
        _lomiri(name)
        for name in (
            'Bridge_by_Sander_Klootwijk',
            'Dragonfly_by_Bolly',
            'Picture_0B_by_freespace',
            'Picture_1A_by_freespace',
            'Wine_by_Jakkub_Mede',
            'aitzgorri_by_Aitzol_Berasategi',
            'free_by_Peter_Nerlich',
            'friends_by_Aitzol_Berasategi',
            'greentock_by_Peter_Nerlich',
            'life_by_Aitzol_Berasategi',
            'picosdeeuropa_by_Aitzol_Berasategi',
            'seeding_by_Clements_Engelhardt',
            'sunset_by_Aitzol_Berasategi',
        )
    ),
    _lomiri('Kleiber_by_Lukas_Baubkus', '20.04'),
    *(
        _mate(name)
        for name in (
            'Aqua',
            'Blinds',
            'Dune',
            'FreshFlower',
            'Garden',
            'GreenMeadow',
            'LadyBird',
            'RainDrops',
            'Storm',
            'TwoWings',
            'Wood',
            'YellowFlower',
        )
    ),
    *(
        _plasma(name)
        for name in (
            'BytheWater',
            'ColdRipple',
            'ColorfulCups',
            'DarkestHour',
            'EveningGlow',
            'FallenLeaf',
            'Grey',
            'Kite',
            'OneStandsOut',
            'Path',
            'summer_1am',
        )
    ),
)

#: Held-out photographs (the ``val`` split): a landscape, animals, an object, a macro shot, a lake scene and
#: a forest, from all three packages, so evaluation covers the kinds of scene training has.
HELD_OUT = ('picosdeeuropa', 'friends', 'Picture_0B', 'LadyBird', 'EveningGlow', 'Path')


@dataclass(frozen=True)
class CropSpec:
    """How the crops are cut; the manifest records it, and ``replicate.py`` compares it between runs.

    Attributes:
        work_side: Shorter side, in pixels, each photograph is shrunk to before cropping. Default: ``512``
            (the scale of an ImageNet photograph: a crop shows part of a scene).
        crop_sides: Inclusive range of the crops' sides. Default: ``(160, 320)``: above 128 px, so training
            and evaluation images at 128 px are downsampled and sharp.
        train_per_photo: Crops per training photograph. Default: ``48``.
        val_per_photo: Crops per held-out photograph. Default: ``16``.
        seed: Mixed with each photograph's name into its crops' seed. Default: ``0``.
        jpeg_quality: Quality of the crops' JPEG files (4:4:4, no chroma subsampling; the sources are JPEGs).
            Default: ``95``.
    """

    work_side: int = 512
    crop_sides: tuple[int, int] = (160, 320)
    train_per_photo: int = 48
    val_per_photo: int = 16
    seed: int = 0
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        if not 1 <= self.crop_sides[0] <= self.crop_sides[1] <= self.work_side:
            raise ValueError(
                f'crop_sides {self.crop_sides} must be increasing and within [1, work_side {self.work_side}].'
            )
        if self.train_per_photo < 1 or self.val_per_photo < 1:
            raise ValueError('train_per_photo and val_per_photo must be at least 1.')


# ---------------------------------------------------------------------------------------------------------
# Pure parts: which files, which split, which crops, which licence


def locate_photos(root: str, allow: Sequence[Photo] = ALLOW_LIST) -> dict[Photo, str]:
    """The allow-listed photographs in an unpacked tree ``root/<package>/<path>``; every other file is ignored.

    Args:
        root: Folder with one unpacked package per subfolder.
        allow: The photographs to keep. Default: ``ALLOW_LIST``.

    Returns:
        dict[Photo, str]: Each allow-listed photograph -> its file, in ``allow``'s order.

    Raises:
        FileNotFoundError: An allow-listed photograph is missing (the package changed): names every one.
    """
    names = [photo.name for photo in allow]
    if len(set(names)) != len(names):
        raise ValueError(f'photo names must be unique in the allow-list, got {sorted(names)}.')
    found = {photo: os.path.join(root, photo.package, photo.path) for photo in allow}
    missing = [f'{photo.package}: /{photo.path}' for photo, path in found.items() if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(
            f'allow-listed photographs missing under {root}: {"; ".join(missing)}. The package may have changed: '
            'look at its images again and update ALLOW_LIST in scripts/photo_testbed.py.'
        )
    return found


def split_photos(photos: Sequence[Photo], held_out: Collection[str] = HELD_OUT) -> dict[str, list[Photo]]:
    """Split by photograph: ``val`` holds the ``held_out`` ones, ``train`` the rest, so no photograph is in both.

    Args:
        photos: The photographs.
        held_out: Names of the held-out photographs. Default: ``HELD_OUT``.

    Returns:
        dict[str, list[Photo]]: ``{'train': [...], 'val': [...]}``, each in ``photos``' order.

    Raises:
        ValueError: A held-out name is not among ``photos``, or a split would be empty.
    """
    names = {photo.name for photo in photos}
    unknown = sorted(set(held_out) - names)
    if unknown:
        raise ValueError(f'held-out photographs {unknown} are not in the allow-list.')
    splits = {
        'train': [photo for photo in photos if photo.name not in held_out],
        'val': [photo for photo in photos if photo.name in held_out],
    }
    empty = [split for split, members in splits.items() if not members]
    if empty:
        raise ValueError(f'the {" and ".join(empty)} split would have no photograph.')
    return splits


def photo_crops(image: Image.Image, name: str, count: int, spec: CropSpec) -> list[Image.Image]:
    """``count`` crops of one photograph: shrunk to ``spec.work_side`` on its shorter side, then cropped.

    Args:
        image: The photograph (any mode; converted to RGB).
        name: Its name, which seeds the crops together with ``spec.seed`` (adding a photograph to the
            allow-list changes no other photograph's crops).
        count: Number of crops.
        spec: Work side and crop sides.

    Returns:
        list[Image.Image]: RGB crops, sides within ``spec.crop_sides``.

    Raises:
        ValueError: The photograph is smaller than ``spec.work_side`` on its shorter side.
    """
    image = image.convert('RGB')
    short = min(image.size)
    if short < spec.work_side:
        raise ValueError(
            f'{name} is {image.size[0]}x{image.size[1]}: its shorter side is below work_side {spec.work_side}.'
        )
    size = (round(image.width * spec.work_side / short), round(image.height * spec.work_side / short))
    # Exact sides: rounding must not leave the shorter side at work_side - 1.
    size = tuple(spec.work_side if side == short else new for side, new in zip(image.size, size))
    shrunk = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    seed = zlib.crc32(name.encode()) ^ spec.seed
    return random_crops(shrunk, count, seed, spec.crop_sides, name=name)


def _dep5_stanzas(copyright_text: str) -> list[dict[str, str]]:
    stanzas = []
    for block in copyright_text.split('\n\n'):
        fields: dict[str, str] = {}
        key = None
        for line in block.splitlines():
            if line[:1] in (' ', '\t') and key:  # a continuation line
                fields[key] += '\n' + line.strip()
            elif ':' in line:
                key, value = line.split(':', 1)
                fields[key.strip()] = value.strip()
        if 'Files' in fields:
            stanzas.append(fields)
    return stanzas


def _pattern_matches(pattern: str, path: str) -> bool:
    """Whether a source-tree pattern names the installed ``path``: same file name, and the pattern's folder
    (if any) among the path's folders."""
    folder, name = os.path.split(pattern)
    if folder.split('/')[0] == 'debian':  # the packaging's own files
        return False
    parents = os.path.dirname(path).split('/')
    return fnmatch.fnmatchcase(os.path.basename(path), name) and (not folder or folder.split('/')[-1] in parents)


def licence_of(copyright_text: str, path: str) -> dict[str, str]:
    """The licence and copyright of one installed file, from a machine-readable (DEP-5) ``debian/copyright``.

    Patterns name files in the source tree, which the binary package installs elsewhere: a stanza naming the
    file exactly wins; otherwise the last stanza with a wildcard that matches (DEP-5's rule), ``debian/*``
    (the packaging) left out.

    Args:
        copyright_text: The package's ``/usr/share/doc/<pkg>/copyright``.
        path: The installed file, e.g. ``usr/share/backgrounds/mate/nature/Aqua.jpg``.

    Returns:
        dict[str, str]: ``{'licence': ..., 'copyright': ...}``; ``'unknown'`` where no stanza matches.
    """
    name = os.path.basename(path)
    exact, wildcard = None, None
    for stanza in _dep5_stanzas(copyright_text):
        patterns = stanza['Files'].split()
        if any(os.path.basename(pattern) == name for pattern in patterns):
            exact = stanza
        elif any(_pattern_matches(pattern, path) for pattern in patterns):
            wildcard = stanza
    found = exact or wildcard
    if found is None:
        return {'licence': 'unknown', 'copyright': 'unknown'}
    return {
        'licence': found.get('License', 'unknown').split('\n')[0],
        'copyright': ' / '.join(found.get('Copyright', 'unknown').splitlines()),
    }


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _kde_metadata(photo_file: str) -> dict[str, Any] | None:
    """A Plasma wallpaper's own author and licence (its ``metadata.json``, beside ``contents/``), if any."""
    if '/contents/' not in photo_file:
        return None
    metadata = os.path.join(photo_file.split('/contents/')[0], 'metadata.json')
    if not os.path.isfile(metadata):
        return None
    with open(metadata) as f:
        plugin = json.load(f).get('KPlugin', {})
    return {'authors': [a.get('Name') for a in plugin.get('Authors', [])], 'license': plugin.get('License')}


def build_manifest(
    files: dict[Photo, str],
    splits: dict[str, list[Photo]],
    packages: dict[str, dict[str, str]],
    spec: CropSpec,
    counts: dict[str, int],
) -> dict[str, Any]:
    """What the testbed is made of: the spec, every photograph with its licence, every package's copyright.

    Args:
        files: Photograph -> file (from ``locate_photos``).
        splits: ``split_photos``' result.
        packages: Package -> ``{'version': ..., 'copyright': <copyright file text>}``.
        spec: How the crops were cut.
        counts: Split -> images written.

    Returns:
        dict[str, Any]: JSON-ready; ``photos`` lists ``name, package, version, file, width, height, sha256,
        split, licence, copyright`` (and ``upstream_metadata`` for Plasma wallpapers).
    """
    photos = []
    for split, members in splits.items():
        for photo in members:
            path = files[photo]
            with Image.open(path) as image:
                width, height = image.size
            entry = {
                'name': photo.name,
                'package': photo.package,
                'version': packages[photo.package]['version'],
                'file': '/' + photo.path,
                'width': width,
                'height': height,
                'sha256': _sha256(path),
                'split': split,
                **licence_of(packages[photo.package]['copyright'], photo.path),
            }
            metadata = _kde_metadata(path)
            if metadata:
                entry['upstream_metadata'] = metadata
            photos.append(entry)
    return {
        'spec': {**asdict(spec), 'crop_sides': list(spec.crop_sides)},
        'splits': {split: [photo.name for photo in members] for split, members in splits.items()},
        'images': dict(counts),
        'photos': photos,
        'packages': packages,
    }


# ---------------------------------------------------------------------------------------------------------
# Side effects: packages, crops, shards


def _run(command: list[str], cwd: str | None = None) -> str:
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise SystemExit(
            f'error: {command[0]} not found; this script needs a Debian or Ubuntu system (apt, dpkg).'
        ) from None
    if result.returncode != 0:
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ['no output']
        raise SystemExit(f'error: {" ".join(command)} failed (exit {result.returncode}): {last[0]}')
    return result.stdout


def _candidate_version(package: str) -> str:
    candidate = _run(['apt-cache', 'policy', package]).split('Candidate:')[-1].split()[:1]
    if not candidate or candidate[0] == '(none)':
        raise SystemExit(f'error: apt knows no version of {package}; run without --no-update (apt-get update).')
    return candidate[0]


def _deb_version(deb: str) -> str:
    return _run(['dpkg-deb', '-f', deb, 'Version']).strip()


def _cached_deb(debs: str, package: str, version: str) -> str | None:
    names = sorted(n for n in os.listdir(debs) if n.startswith(f'{package}_') and n.endswith('.deb'))
    return next((os.path.join(debs, n) for n in names if _deb_version(os.path.join(debs, n)) == version), None)


def fetch_packages(packages: Collection[str], cache: str, update: bool = True) -> dict[str, dict[str, str]]:
    """Download and unpack ``packages`` into ``cache/debs`` and ``cache/root/<package>`` (nothing is installed).

    Args:
        packages: Debian package names.
        cache: Folder for the ``.deb`` files and the unpacked trees; reused by later runs.
        update: Run ``apt-get update`` first. Default: ``True``.

    Returns:
        dict[str, dict[str, str]]: Package -> ``{'version': ..., 'copyright': <its copyright file's text>}``.
    """
    debs = os.path.join(cache, 'debs')
    os.makedirs(debs, exist_ok=True)
    if update:
        _run(['apt-get', 'update'])
    info = {}
    for package in sorted(packages):
        version = _candidate_version(package)
        deb = _cached_deb(debs, package, version)
        if deb is None:
            _run(['apt-get', 'download', f'{package}={version}'], cwd=debs)
            deb = _cached_deb(debs, package, version)
        if deb is None:
            raise SystemExit(f'error: apt-get download {package}={version} left no .deb of that version in {debs}.')
        root = os.path.join(cache, 'root', package)
        marker = os.path.join(root, '.unpacked')
        if not os.path.isfile(marker) or open(marker).read() != version:
            shutil.rmtree(root, ignore_errors=True)
            os.makedirs(root)  # dpkg-deb creates the last folder only
            _run(['dpkg-deb', '-x', deb, root])
            with open(marker, 'w') as f:
                f.write(version)
        with open(os.path.join(root, 'usr', 'share', 'doc', package, 'copyright'), encoding='utf-8') as f:
            info[package] = {'version': version, 'copyright': f.read()}
    return info


def write_testbed(
    files: dict[Photo, str],
    splits: dict[str, list[Photo]],
    packages: dict[str, dict[str, str]],
    out: str,
    spec: CropSpec = CropSpec(),
) -> dict[str, Any]:
    """Crop every photograph and write ``out/train``, ``out/val`` (image MDS) and ``out/manifest.json``.

    Args:
        files: Photograph -> file (``locate_photos``).
        splits: ``split_photos``' result.
        packages: Package -> version and copyright text (``fetch_packages``).
        out: Output folder; must not exist yet, or hold an earlier, unfinished build (no manifest).
        spec: How to crop. Default: ``CropSpec()``.

    Returns:
        dict[str, Any]: The manifest (written last: a testbed without one is unfinished).
    """
    staging = os.path.join(out, 'crops')
    for split in splits:  # an unfinished build starts again from nothing
        shutil.rmtree(os.path.join(out, split), ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    counts = {}
    for split, members in splits.items():
        per_photo = spec.train_per_photo if split == 'train' else spec.val_per_photo
        for photo in members:
            folder = os.path.join(staging, split, photo.name)
            os.makedirs(folder)
            with Image.open(files[photo]) as image:
                crops = photo_crops(image, photo.name, per_photo, spec)
            for i, crop in enumerate(crops):
                crop.save(os.path.join(folder, f'{i:04d}.jpg'), quality=spec.jpeg_quality, subsampling=0)
        listing = list_folder(os.path.join(staging, split), split)[0]
        counts[split] = convert_split(
            listing, os.path.join(out, split), ConvertOptions(workers=1, progress=False)
        ).written
    shutil.rmtree(staging)
    manifest = build_manifest(files, splits, packages, spec, counts)
    with open(os.path.join(out, 'manifest.json.tmp'), 'w') as f:
        json.dump(manifest, f, indent=2)
    os.replace(os.path.join(out, 'manifest.json.tmp'), os.path.join(out, 'manifest.json'))
    return manifest


# ---------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = CropSpec()
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=DEFAULT_OUT, help=f'testbed folder (default: {DEFAULT_OUT})')
    parser.add_argument(
        '--cache', default=DEFAULT_CACHE, help=f'downloaded and unpacked packages (default: {DEFAULT_CACHE})'
    )
    parser.add_argument('--no-update', action='store_true', help='skip apt-get update')
    parser.add_argument('--work-side', type=int, default=defaults.work_side)
    parser.add_argument('--crop-sides', type=int, nargs=2, default=list(defaults.crop_sides), metavar=('MIN', 'MAX'))
    parser.add_argument('--train-per-photo', type=int, default=defaults.train_per_photo)
    parser.add_argument('--val-per-photo', type=int, default=defaults.val_per_photo)
    parser.add_argument('--seed', type=int, default=defaults.seed)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        spec = CropSpec(
            work_side=args.work_side,
            crop_sides=tuple(args.crop_sides),
            train_per_photo=args.train_per_photo,
            val_per_photo=args.val_per_photo,
            seed=args.seed,
        )
    except ValueError as error:
        raise SystemExit(f'error: {error}') from None
    manifest_file = os.path.join(args.out, 'manifest.json')
    if os.path.isfile(manifest_file):
        with open(manifest_file) as f:
            built = json.load(f)['spec']
        if built == {**asdict(spec), 'crop_sides': list(spec.crop_sides)}:
            print(f'{args.out} already holds this testbed ({manifest_file}).')
            return 0
        raise SystemExit(f'error: {args.out} holds a testbed built with {built}; use another --out or delete it.')
    packages = fetch_packages({photo.package for photo in ALLOW_LIST}, args.cache, update=not args.no_update)
    files = locate_photos(os.path.join(args.cache, 'root'))
    manifest = write_testbed(files, split_photos(ALLOW_LIST), packages, args.out, spec)
    splits = manifest['splits']
    print(
        f'Wrote {args.out}: train {manifest["images"]["train"]} crops of {len(splits["train"])} photographs, '
        f'val {manifest["images"]["val"]} crops of {len(splits["val"])} held-out ones; licences in {manifest_file}.'
    )
    return 0


if __name__ == '__main__':
    run_cli(main)
