"""Raw images -> MDS shards: the library side of ``convert_dataset.py``.

Layout of one converted split (``<out>`` or ``<out>/<split>``)::

    index.json          merged index over the parts (written last: its presence means complete)
    part_00000/ ...     one MDS dataset per block of ``part_size`` input files
    skipped.jsonl       one {"path", "reason"} line per unusable file
    .convert/           plan.json (what is being converted) and one marker per finished part

Files are split into fixed-size parts in sorted order, so the output is identical for any number
of workers, each worker only holds the shard it is filling (memory is bounded by ``size_limit``
per worker), and an interrupted run resumes: finished parts are kept, unfinished ones redone.

A remote output (``s3://bucket/prefix``) has the same layout, ``.convert/`` included, and follows
the same rules: what the remote holds decides whether a run refuses, resumes or (``overwrite``)
deletes it and starts over. Files are staged in a local folder before they are uploaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from streaming.base.util import bytes_to_int, merge_index
from tqdm import tqdm

from eqvae_composer.compat import pending_uploads, reset_shard_cache
from eqvae_composer.data.demo import write_demo_folders
from eqvae_composer.data.images import PreparedImage, prepare_image
from eqvae_composer.data.mds_writer import LeanMDSWriter
from eqvae_composer.data.parts import (
    OutputExistsError,
    check_plan,
    finished_parts,
    part_name,
    prepare_output,
    write_json_atomic,
)
from eqvae_composer.data.remote_output import RemoteOutput
from eqvae_composer.data.sources import (
    SOURCES,
    SourceFile,
    SplitListing,
    list_folder,
    list_imagenet,
    list_openimages,
    subset,
)

__all__ = [
    'SOURCE_NAMES',
    'ConvertOptions',
    'NoUsableImagesError',
    'OutputExistsError',
    'SplitSummary',
    'convert',
    'convert_split',
    'default_workers',
    'format_summary',
    'is_remote',
]

#: Values of ``--source``.
SOURCE_NAMES = ('demo', *SOURCES)

SKIPPED_REPORT = 'skipped.jsonl'
_STATE_DIR = '.convert'
_PLAN = 'plan.json'  # the name data.parts gives it
# Bump when the stored bytes for the same input change, so old partial outputs are not resumed.
_FORMAT_VERSION = 1


class NoUsableImagesError(RuntimeError):
    """Not a single input file could be converted.

    Attributes:
        summaries: The per-split summaries (with their skip reports), for printing.
    """

    def __init__(self, message: str, summaries: Sequence[SplitSummary] = ()) -> None:
        super().__init__(message)
        self.summaries = list(summaries)


@dataclass(frozen=True)
class ConvertOptions:
    """How to convert; shared by every split.

    Attributes:
        min_side: Downsize images whose shorter side exceeds this (see
            :func:`~eqvae_composer.data.images.prepare_image`). Default: ``None`` (never).
        size_limit: Shard size limit, bytes or a string like ``'64mb'``. Default: ``1 << 26``.
        compression: MDS shard compression. Default: ``None`` (JPEG/PNG bytes do not compress).
        hashes: Shard hash algorithms, for ``validate_hash`` when streaming (any order: used sorted). Default: none.
        workers: Worker processes. Default: ``None`` (every core this process may use).
        part_size: Input files per part. Fixes the output layout independently of ``workers``.
            Default: ``250`` (fine enough to keep every worker busy; see docs/BENCHMARKS.md).
        overwrite: Delete an existing output (local or remote) instead of resuming or refusing.
            Default: ``False``.
        local: Staging folder for a remote output (a URI such as ``s3://bucket/path``): shards are
            written here before they are uploaded. Must be empty or an earlier staging folder; the
            remote, not this folder, decides what is resumed. Default: ``None`` (a temporary folder).
        progress: Show a progress bar. Default: ``True``.
    """

    min_side: int | None = None
    size_limit: int | str = 1 << 26
    compression: str | None = None
    hashes: tuple[str, ...] = ()
    workers: int | None = None
    part_size: int = 250
    overwrite: bool = False
    local: str | None = None
    progress: bool = True


@dataclass
class SplitSummary:
    """What happened to one split.

    Attributes:
        name: Split name (``None`` for the output root).
        out: Where the split was written (local folder or remote URI).
        report: Where the skipped-files report is: a local path, or for a remote output its URI (the
            local copy may be in a temporary staging folder, deleted at the end).
        written: Samples written.
        skipped: ``(path, reason)`` per unusable file.
        actions: Count per storage action (``kept`` = original bytes; others name the re-encode).
        ignored: Files without an image extension, per extension.
        resumed_parts: Parts found finished by an earlier run and kept.
        processed: Input files read by this run (excludes resumed parts).
        seconds: Wall time.
    """

    name: str | None
    out: str
    report: str
    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    actions: Counter = field(default_factory=Counter)
    ignored: dict[str, int] = field(default_factory=dict)
    resumed_parts: int = 0
    processed: int = 0
    seconds: float = 0.0


def default_workers() -> int:
    """Cores this process may run on (respects CPU affinity, e.g. under Slurm or taskset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def is_remote(out: str) -> bool:
    """Whether ``out`` is a URI (``s3://``, ``gs://``, ...) rather than a local path."""
    return urllib.parse.urlparse(out).scheme != ''


def _join(base: str, name: str) -> str:
    return f'{base.rstrip("/")}/{name}' if is_remote(base) else os.path.join(base, name)


def _fingerprint(listing: SplitListing, options: ConvertOptions) -> dict[str, Any]:
    """What must match for a re-run to resume: the inputs and every option that changes bytes."""
    digest = hashlib.sha256()
    for f in listing.files:
        digest.update(f'{f.key}\0{f.label}\n'.encode())
    return {
        'format_version': _FORMAT_VERSION,
        'files': len(listing.files),
        'files_sha256': digest.hexdigest(),
        'labelled': listing.labelled,
        'min_side': options.min_side,
        'size_limit': bytes_to_int(options.size_limit),  # '64mb' and 67108864 are the same plan
        'compression': options.compression,
        'hashes': sorted(options.hashes),  # the same plan whatever order they were given in
        'part_size': options.part_size,
    }


def _is_staging_file(name: str) -> bool:
    return name in (_STATE_DIR, 'index.json', SKIPPED_REPORT) or name.startswith('part_')


def _prepare_remote_output(
    out: str, staging: str, plan: dict[str, Any], overwrite: bool
) -> tuple[RemoteOutput, set[int]]:
    """The remote counterpart of ``parts.prepare_output``: the same rules, decided by what the remote holds.

    The staging folder is emptied of what an earlier run left in it, then given the remote's plan
    and finish markers (read back for the summary).

    Returns:
        tuple[RemoteOutput, set[int]]: The remote, and the parts a previous identical run finished.

    Raises:
        OutputExistsError: The remote holds other objects, or a conversion with other inputs/options;
            or the staging folder holds files a conversion did not write.
        RemoteOutputError: The remote cannot be opened, listed, or (``overwrite``) cleared.
    """
    if os.path.isdir(staging):
        foreign = sorted(name for name in os.listdir(staging) if not _is_staging_file(name))
        if foreign:
            raise OutputExistsError(
                f'The staging folder {staging} (--local) holds files a conversion did not write '
                f'({", ".join(foreign[:3])}{", ..." if len(foreign) > 3 else ""}): choose an empty or new folder.'
            )
        for name in os.listdir(staging):
            path = os.path.join(staging, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    remote = RemoteOutput(out, staging)
    os.makedirs(os.path.join(staging, _STATE_DIR), exist_ok=True)
    names = remote.names()
    if overwrite and names:
        remote.delete_all()
        names = []
    plan_name = f'{_STATE_DIR}/{_PLAN}'
    if not names:
        write_json_atomic(os.path.join(staging, plan_name), plan)
        remote.upload(plan_name)  # first, so that an interrupted run is recognised as this conversion
        return remote, set()
    previous = None
    if plan_name in names:
        with open(remote.download(plan_name)) as f:
            previous = json.load(f)
    check_plan(remote.remote, previous, plan)
    # Objects of unfinished parts are left: the redone part writes the same names over them.
    done = finished_parts([name[len(_STATE_DIR) + 1 :] for name in names if name.startswith(f'{_STATE_DIR}/')])
    for i in sorted(done):
        remote.download(f'{_STATE_DIR}/{part_name(i)}.json')
    return remote, done


@dataclass(frozen=True)
class _PartJob:
    index: int
    files: list[SourceFile]
    local: str
    remote: str | None
    columns: dict[str, str]
    options: ConvertOptions


# Per-process count of files processed, shared with the parent for the progress bar.
_progress_counter: Any = None


def _init_worker(counter: Any) -> None:
    global _progress_counter
    _progress_counter = counter


def _bump_progress(n: int) -> None:
    if _progress_counter is not None:
        with _progress_counter.get_lock():
            _progress_counter.value += n


def _drain_uploads(writer: LeanMDSWriter) -> None:
    """Flush the last shard and wait for its upload task to start, polling every millisecond.

    ``MDSWriter.finish`` polls the upload queue with ``sleep(1)``; with a task still queued (the
    usual case right after the last flush) that adds a second per part, which dominated small parts.
    """
    if writer.new_samples:
        writer.flush_shard()
        reset_shard_cache(writer)
    while pending_uploads(writer) > 0 and not writer.event.is_set():
        time.sleep(0.001)


def _convert_part(job: _PartJob) -> int:
    """Write one part with its own writer, then its finish marker; return its index. Runs in a worker."""
    name = part_name(job.index)
    part_local = os.path.join(job.local, name)
    out = (part_local, _join(job.remote, name)) if job.remote else part_local
    skipped: list[tuple[str, str]] = []
    actions: Counter = Counter()
    pending = 0
    with LeanMDSWriter(
        out=out,
        columns=job.columns,
        size_limit=job.options.size_limit,
        compression=job.options.compression,
        hashes=sorted(job.options.hashes),
        keep_local=False,
    ) as writer:
        for source in job.files:
            try:
                with open(source.path, 'rb') as f:
                    data = f.read()
            except OSError as exc:
                result: Any = None
                skipped.append((source.path, f'cannot read ({exc.strerror or exc})'))
            else:
                result = prepare_image(data, min_side=job.options.min_side)
            if isinstance(result, PreparedImage):
                sample: dict[str, Any] = {'image': result.data, 'key': source.key}
                if source.label is not None:
                    sample['label'] = source.label
                writer.write(sample)
                actions[result.action] += 1
            elif result is not None:
                skipped.append((source.path, result.reason))
            pending += 1
            if pending == 16:  # the shared counter takes a lock; do not pay it per image
                _bump_progress(pending)
                pending = 0
        _drain_uploads(writer)
    _bump_progress(pending)
    marker = {'written': sum(actions.values()), 'skipped': skipped, 'actions': dict(actions)}
    # read back by the parent, which also uploads it for a remote output
    write_json_atomic(os.path.join(job.local, _STATE_DIR, f'{name}.json'), marker)
    return job.index


def _run_jobs(
    jobs: list[_PartJob],
    workers: int,
    total: int,
    initial: int,
    desc: str,
    progress: bool,
    part_done: Callable[[int], None],
) -> None:
    """Convert the parts, calling ``part_done(index)`` in this process as each one finishes."""
    bar = tqdm(total=total, initial=initial, unit='img', desc=desc, disable=not progress, smoothing=0.1)
    counter = multiprocessing.Value('q', 0)

    def show_progress() -> None:
        bar.update(counter.value - (bar.n - initial))

    try:
        if workers <= 1 or len(jobs) <= 1:
            _init_worker(counter)
            try:
                for job in jobs:
                    part_done(_convert_part(job))
                    show_progress()
            finally:
                _init_worker(None)
            return
        with multiprocessing.Pool(min(workers, len(jobs)), initializer=_init_worker, initargs=(counter,)) as pool:
            results = pool.imap_unordered(_convert_part, jobs, chunksize=1)
            for _ in jobs:
                while True:
                    try:
                        index = results.next(timeout=0.25)  # re-raises a worker's exception here
                        break
                    except multiprocessing.TimeoutError:
                        show_progress()
                part_done(index)
                show_progress()
            # Let workers exit on their own: the context manager's terminate() SIGTERMs them, and a
            # worker that received it while idle on a pool lock was seen to hang the parent in join().
            pool.close()
            pool.join()
        show_progress()
    finally:
        bar.close()


def convert_split(listing: SplitListing, out: str, options: ConvertOptions = ConvertOptions()) -> SplitSummary:
    """Convert one split's files to an MDS dataset at ``out``.

    Args:
        listing: The files (see :mod:`eqvae_composer.data.sources`).
        out: Output folder, or remote URI (then staged in ``options.local`` or a temporary folder).
        options: Conversion options. Default: ``ConvertOptions()``.

    Returns:
        SplitSummary: Counts and the skipped files (also in ``skipped.jsonl`` next to the index).
        When ``written`` is 0 no ``index.json`` is written.

    Raises:
        OutputExistsError: ``out`` holds something that is not an unfinished run of the same job.
        RemoteOutputError: A remote ``out`` cannot be opened, listed or (``overwrite``) cleared.
        ValueError: ``options.local`` is set for a local ``out``.
    """
    start = time.perf_counter()
    remote = out if is_remote(out) else None
    if options.local is not None and not remote:
        raise ValueError(
            f'--local stages the uploads to a remote --out (s3://, gs://, ...); {out} is a local folder, '
            f'written directly: drop --local.'
        )
    staging = None if options.local is not None or not remote else tempfile.mkdtemp(prefix='mds-staging-')
    local = options.local or staging or out
    try:
        return _convert_split(listing, out, local, remote, options, start)
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)


def _convert_split(
    listing: SplitListing, out: str, local: str, remote: str | None, options: ConvertOptions, start: float
) -> SplitSummary:
    plan = _fingerprint(listing, options)
    remote_output: RemoteOutput | None = None
    if remote:
        remote_output, done = _prepare_remote_output(remote, local, plan, options.overwrite)
    else:
        done = prepare_output(
            local, plan, options.overwrite, state_dir=_STATE_DIR, final_files=('index.json', SKIPPED_REPORT)
        )

    columns = {'image': 'bytes', 'key': 'str'}
    if listing.labelled:
        columns['label'] = 'int'
    size = options.part_size
    parts = [listing.files[i : i + size] for i in range(0, len(listing.files), size)]
    jobs = [_PartJob(i, files, local, remote, columns, options) for i, files in enumerate(parts) if i not in done]
    done_files = sum(len(files) for i, files in enumerate(parts) if i in done)

    def part_done(index: int) -> None:
        # Its shards and index are uploaded by now: the marker is the remote's record of a finished part.
        if remote_output:
            remote_output.upload(f'{_STATE_DIR}/{part_name(index)}.json')

    _run_jobs(
        jobs,
        options.workers or default_workers(),
        len(listing.files),
        done_files,
        listing.name or 'convert',
        options.progress,
        part_done,
    )

    summary = SplitSummary(
        listing.name,
        out,
        os.path.join(local, SKIPPED_REPORT),
        skipped=list(listing.skipped),
        ignored=dict(listing.ignored),
        resumed_parts=len(done),
        processed=len(listing.files) - done_files,
    )
    for i in range(len(parts)):
        with open(os.path.join(local, _STATE_DIR, f'{part_name(i)}.json')) as f:
            marker = json.load(f)
        summary.written += marker['written']
        summary.skipped.extend((path, reason) for path, reason in marker['skipped'])
        summary.actions.update(marker['actions'])

    with open(summary.report, 'w') as f:
        f.writelines(json.dumps({'path': path, 'reason': reason}) + '\n' for path, reason in summary.skipped)
    if remote_output:
        remote_output.upload(SKIPPED_REPORT)
        summary.report = _join(remote_output.remote, SKIPPED_REPORT)
    if summary.written == 0:
        return summary  # no index: a dataset without samples is not a dataset
    index_urls = [os.path.join(local, part_name(i), 'index.json') for i in range(len(parts))]
    if remote_output:
        # Uploaded parts leave no local copy; merge_index would build an S3 client per download.
        for i in range(len(parts)):
            remote_output.download(f'{part_name(i)}/index.json')
    # merge_index logs routine warnings (temporary folders, non-empty output) on the root logger.
    logging.disable(logging.WARNING)
    try:
        merge_index(index_urls, (local, remote) if remote else local)
    finally:
        logging.disable(logging.NOTSET)
    summary.seconds = time.perf_counter() - start
    return summary


def format_summary(summary: SplitSummary) -> str:
    """A few human-readable lines about one converted split.

    Args:
        summary: The split's summary.

    Returns:
        str: Lines without a trailing newline.
    """
    rate = summary.processed / summary.seconds if summary.seconds else 0.0
    kept = summary.actions.get('kept', 0)
    reencoded = ', '.join(f'{n} {a}' for a, n in sorted(summary.actions.items()) if a != 'kept') or 'none'
    if not summary.written:
        return (
            f'{summary.name or "output"}: no usable image; nothing written to {summary.out} '
            f'({len(summary.skipped)} skipped, listed in {summary.report})'
        )
    lines = [
        (
            f'{summary.name or "output"}: {summary.written} images written to {summary.out} '
            f'({summary.seconds:.1f} s, {rate:.0f} files/s)'
        ),
        f'  original bytes kept: {kept}; re-encoded: {reencoded}',
        f'  skipped: {len(summary.skipped)} (listed in {summary.report})',
    ]
    if summary.skipped:
        reasons = Counter(reason.split(' (')[0].split(':')[0] for _, reason in summary.skipped)
        lines.append('    ' + '; '.join(f'{n} {r}' for r, n in reasons.most_common()))
    if summary.ignored:
        ignored = ', '.join(f'{n} {ext}' for ext, n in sorted(summary.ignored.items()))
        lines.append(f'  ignored (not an image extension): {ignored}')
    if summary.resumed_parts:
        lines.append(f'  resumed: {summary.resumed_parts} parts were already finished by an earlier run')
    return '\n'.join(lines)


def _listings(
    source: str, input: str | None, splits: Sequence[str] | None, labels_csv: str | None
) -> list[SplitListing]:
    if source != 'demo' and not input:
        raise ValueError(f'--input is required for --source {source}')
    if source == 'folder':
        if splits and len(splits) > 1:
            raise ValueError('--source folder converts one tree; give at most one --split (the output subfolder)')
        return list_folder(input, splits[0] if splits else None)  # type: ignore[arg-type]
    if source == 'imagenet':
        return list_imagenet(input, splits, labels_csv)  # type: ignore[arg-type]
    if source == 'openimages':
        return list_openimages(input, splits)  # type: ignore[arg-type]
    raise ValueError(f'Unknown source {source!r}; expected one of {", ".join(SOURCE_NAMES)}')


def convert(
    source: str = 'demo',
    out: str = 'mds',
    *,
    input: str | None = None,
    splits: Sequence[str] | None = None,
    limit: int | None = None,
    labels_csv: str | None = None,
    options: ConvertOptions = ConvertOptions(),
) -> list[SplitSummary]:
    """Convert a raw dataset (or the bundled demo set) to MDS, one dataset per split.

    A split named ``s`` is written to ``<out>/s``; an unnamed one (``folder`` without ``--split``, a flat
    OpenImages folder) to ``<out>``. A split without a single usable image is reported and left out.

    Args:
        source: One of ``demo``, ``folder``, ``imagenet``, ``openimages``. Default: ``'demo'``.
        out: Output folder or remote URI. Default: ``'mds'``.
        input: Raw dataset root (not used by ``demo``).
        splits: Splits to convert (see the ``list_*`` functions). Default: all found.
        limit: Convert at most this many files per split, evenly spaced. Default: all.
        labels_csv: ImageNet ``LOC_val_solution.csv`` for a flat ``val/``. Default: searched for.
        options: How to convert. Default: ``ConvertOptions()``.

    Returns:
        list[SplitSummary]: One per split; a split with ``written == 0`` has no ``index.json``.

    Raises:
        FileNotFoundError: The input (or an ImageNet label file it needs) does not exist.
        OutputExistsError: An output (folder or remote prefix) holds something that cannot be resumed.
        RemoteOutputError: A remote output cannot be opened, listed or (``overwrite``) cleared.
        NoUsableImagesError: No split had a single usable image.
    """
    with tempfile.TemporaryDirectory(prefix='eqvae-demo-') as demo_root:
        if source == 'demo':
            listings = [list_folder(folder, split)[0] for split, folder in write_demo_folders(demo_root).items()]
        else:
            listings = _listings(source, input, splits, labels_csv)
        summaries = []
        for listing in listings:
            listing.files = subset(listing.files, limit)
            split_out = _join(out, listing.name) if listing.name else out
            split_local = os.path.join(options.local, listing.name) if options.local and listing.name else options.local
            summaries.append(convert_split(listing, split_out, dataclasses.replace(options, local=split_local)))
    if not any(s.written for s in summaries):
        raise NoUsableImagesError(f'No usable image found in {input or source}.', summaries)
    return summaries
