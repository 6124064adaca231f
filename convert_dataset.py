"""Convert images to MDS shards for training: ``python convert_dataset.py --out mds/`` writes the demo set.

See ``python convert_dataset.py --help`` and the README's data section. Exit status: 0 on success,
1 when no usable image was found (or the input does not exist), 2 when the output cannot be written.
"""

from __future__ import annotations

import argparse
import sys

from eqvae_composer.cli import error_line, run_cli
from eqvae_composer.data.convert import (
    SOURCE_NAMES,
    ConvertOptions,
    NoUsableImagesError,
    OutputExistsError,
    convert,
    default_workers,
    format_summary,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        '--source',
        choices=SOURCE_NAMES,
        default='demo',
        help='Kind of input. Default: demo (crops of scikit-image photographs, no --input needed).',
    )
    parser.add_argument('--input', help='Raw dataset root (folder tree, ImageNet root, OpenImages root).')
    parser.add_argument(
        '--out',
        required=True,
        help='Output folder, or a URI streaming can write (s3://, gs://, oci://, hf://, ...). '
        'Each split goes to <out>/<split>.',
    )
    parser.add_argument(
        '--split',
        action='append',
        help='Split to convert (repeatable). imagenet: train, val; openimages: train, validation, '
        'test; default: all found. folder: name of the output subfolder (default: none).',
    )
    parser.add_argument('--limit', type=int, help='Convert at most N files per split, evenly spaced (a quick subset).')
    parser.add_argument(
        '--workers', type=int, default=default_workers(), help='Worker processes. Default: all cores (%(default)s).'
    )
    parser.add_argument(
        '--min-side',
        type=int,
        help='Downsize images whose shorter side exceeds N (Lanczos, re-encoded once at high '
        'quality). Default: off, originals kept. 512 loses nothing for 256 px training.',
    )
    parser.add_argument('--size-limit', default='64mb', help='Shard size limit. Default: 64mb.')
    parser.add_argument('--hashes', default='', help='Comma-separated shard hashes, e.g. sha1,xxh64. Default: none.')
    parser.add_argument('--labels-csv', help='ImageNet LOC_val_solution.csv for a flat val/. Default: searched for.')
    parser.add_argument(
        '--local',
        help='Staging folder for a remote --out: empty, or left by an earlier conversion. Default: a temporary one.',
    )
    parser.add_argument(
        '--overwrite',
        action='store_true',
        help='Delete an existing output first. Without it, an interrupted run with the same '
        'inputs and options resumes, and anything else is refused.',
    )
    parser.add_argument('--no-progress', action='store_true', help='Hide the progress bar.')
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; return the exit status."""
    args = parse_args(argv)
    options = ConvertOptions(
        min_side=args.min_side,
        size_limit=args.size_limit,
        hashes=tuple(h for h in args.hashes.split(',') if h),
        workers=args.workers,
        overwrite=args.overwrite,
        local=args.local,
        progress=not args.no_progress,
    )
    try:
        summaries = convert(
            args.source, args.out, input=args.input, splits=args.split, limit=args.limit, options=options
        )
    except NoUsableImagesError as exc:
        for summary in exc.summaries:
            print(format_summary(summary))
        print(error_line(exc), file=sys.stderr)
        return 1
    except OutputExistsError as exc:
        print(error_line(exc), file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:  # the input is missing or the arguments do not fit it
        print(error_line(exc), file=sys.stderr)
        return 1
    except OSError as exc:
        print(error_line(f'cannot write the output: {exc}'), file=sys.stderr)
        return 2
    for summary in summaries:
        print(format_summary(summary))
    return 0


if __name__ == '__main__':
    run_cli(main)
