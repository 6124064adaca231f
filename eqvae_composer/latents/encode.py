"""Encode an image dataset with a VAE into an MDS dataset of latents: the library side of ``scripts/encode_latents.py``.

Layout of the output (``storage`` describes the columns)::

    index.json          merged index over the parts (written last: its presence means complete)
    latents.json        the VAE (source, class, weights' sha256, scaling/shift factors), preprocessing, columns
    part_00000/ ...     one MDS dataset per block of ``part_size`` input samples
    skipped.jsonl       one {"key", "reason"} line per input that could not be encoded
    .encode/            plan.json (what is being encoded) and one marker per finished part

Under the composer launcher every rank encodes the parts ``i`` with ``i % world_size == rank`` and
rank 0 merges the parts' indexes with ``merge_index`` once all are done (across nodes, ``out`` must
be a shared filesystem). Parts are fixed blocks of
the input in order, so the output is the same for any number of ranks, and a killed run resumes:
finished parts are kept, unfinished ones redone. Posterior samples (``store='sample'``) draw their
noise from a generator seeded by ``(seed, sample index)``, so they too do not depend on ranks or batches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from streaming import MDSWriter
from streaming.base.util import merge_index
from tqdm import tqdm

from eqvae_composer.checkpoints import load_autoencoder
from eqvae_composer.data.convert import is_remote
from eqvae_composer.data.parts import finished_parts, part_name, prepare_output, write_json_atomic
from eqvae_composer.introspection import vae_downsample_factor
from eqvae_composer.latents.inputs import FolderImages, MDSImages, ShardReadError, open_images
from eqvae_composer.latents.preprocess import CROPS, preprocess_image
from eqvae_composer.latents.storage import (
    DTYPES,
    FORMAT_VERSION,
    METADATA_FILE,
    STORES,
    latent_columns,
    to_stored,
    write_metadata,
)
from eqvae_composer.padding import recorded_padding_mode

__all__ = [
    'EncodeOptions',
    'EncodeSummary',
    'NothingEncodedError',
    'ShardReadError',
    'encode_latents',
    'format_summary',
]

SKIPPED_REPORT = 'skipped.jsonl'
#: Values of ``compute_dtype``.
COMPUTE_DTYPES = ('float32', 'bfloat16')
_STATE_DIR = '.encode'
# A rank that finishes its parts early waits at the final barrier for the slowest one.
_BARRIER_TIMEOUT_S = 7 * 24 * 3600.0


class NothingEncodedError(RuntimeError):
    """Every input sample was skipped: no dataset is written (``skipped.jsonl`` says why each was)."""


@dataclass(frozen=True)
class EncodeOptions:
    """How to encode.

    Attributes:
        resolution: Image side after the crop, a multiple of the VAE's downsampling factor (8 for SD-VAE; checked
            once the VAE is loaded). Default: ``256``.
        crop: Preprocessing: ``'adm'`` (DiT/ADM's centre crop). Default: ``'adm'``.
        store: ``'mean_std'`` (posterior mean and std) or ``'sample'`` (one posterior sample). Default: ``'mean_std'``.
        dtype: ``'float16'``, ``'bfloat16'`` or ``'float32'``. Default: ``'float16'``.
        flip: Also store the latents of the horizontally flipped image. Default: ``False``.
        batch_size: Images per encoder call (per rank). Default: ``32``.
        part_size: Input samples per part (the unit of resumption and of work per rank). Default: ``1024``.
        seed: Seeds the noise of ``store='sample'``. Default: ``0``.
        limit: Encode only the first ``limit`` samples. Default: all.
        size_limit: Shard size limit. Default: ``1 << 26``.
        device: Torch device. Default: this rank's GPU when there is one, else the CPU.
        compute_dtype: The encoder's precision: ``'float32'`` or ``'bfloat16'`` (autocast; ~2x faster on a
            CPU with AVX512-BF16 and on GPUs, at ~1e-2 error on latents of magnitude ~1: docs/BENCHMARKS.md).
            Default: ``'float32'``.
        channels_last: Run the encoder on NHWC tensors (on CPU oneDNN's convolutions were ~1.1x faster,
            docs/BENCHMARKS.md; the latents differ by float rounding only). Default: ``False``.
        overwrite: Delete an existing output instead of resuming or refusing. Default: ``False``.
        progress: Show a progress bar (rank 0). Default: ``True``.
    """

    resolution: int = 256
    crop: str = 'adm'
    store: str = 'mean_std'
    dtype: str = 'float16'
    flip: bool = False
    batch_size: int = 32
    part_size: int = 1024
    seed: int = 0
    limit: int | None = None
    size_limit: int | str = 1 << 26
    device: str | None = None
    compute_dtype: str = 'float32'
    channels_last: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ('compute_dtype', self.compute_dtype, COMPUTE_DTYPES),
            ('crop', self.crop, CROPS),
            ('store', self.store, STORES),
            ('dtype', self.dtype, DTYPES),
        ):
            if value not in allowed:
                raise ValueError(f'{name} must be one of {", ".join(allowed)}, got {value!r}.')
        for name in ('resolution', 'batch_size', 'part_size', 'limit'):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f'{name} must be positive, got {getattr(self, name)}.')
        if self.seed < 0:
            raise ValueError(f'seed must be non-negative (numpy seeds the posterior noise), got {self.seed}.')


@dataclass
class EncodeSummary:
    """What happened (``written``/``skipped`` cover the whole output, ``processed`` this rank's share of this run).

    Attributes:
        out: The output folder.
        written: Samples in the output.
        skipped: ``(key, reason)`` per input that could not be encoded.
        resumed_parts: Parts an earlier run had finished.
        processed: Input samples this rank read in this run.
        seconds: Wall time of this rank.
        rank: This process's rank.
        world_size: Number of ranks.
    """

    out: str
    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    resumed_parts: int = 0
    processed: int = 0
    seconds: float = 0.0
    rank: int = 0
    world_size: int = 1


def _weights_sha256(vae: torch.nn.Module) -> str:
    """A fingerprint of the weights, so a resumed run cannot mix the latents of two VAEs."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _input_fingerprint(records: MDSImages | FolderImages) -> str:
    """What identifies the input: its MDS index (shard names, sizes, hashes) or its sorted file keys."""
    digest = hashlib.sha256()
    if isinstance(records, FolderImages):
        for file in records.files:
            digest.update(f'{file.key}\n'.encode())
    else:  # streaming has the index in its local folder by now, remote or not
        with open(os.path.join(records.dataset.streams[0].local, 'index.json'), 'rb') as f:
            digest.update(f.read())
    return digest.hexdigest()


def _vae_record(source: str, vae: torch.nn.Module) -> dict[str, Any]:
    config = dict(vae.config)
    return {
        'source': source,
        'class': type(vae).__name__,
        'scaling_factor': float(config.get('scaling_factor') or 1.0),
        'shift_factor': float(config.get('shift_factor') or 0.0),
        'latent_channels': int(config['latent_channels']),
        'downsample_factor': vae_downsample_factor(vae),
        'padding_mode': recorded_padding_mode(config),  # what a decoder must apply (plain diffusers does not)
        'weights_sha256': _weights_sha256(vae),
        'config': json.loads(json.dumps(config, default=str)),
    }


def _rank_and_world() -> tuple[int, int]:
    from composer.utils import dist

    return dist.get_global_rank(), dist.get_world_size()


def _barrier(world_size: int) -> None:
    if world_size > 1:
        from composer.utils import dist

        dist.barrier()


def _device(options: EncodeOptions) -> torch.device:
    if options.device:
        return torch.device(options.device)
    if torch.cuda.is_available():
        from composer.utils import dist

        return torch.device('cuda', dist.get_local_rank())
    return torch.device('cpu')


def _batches(records: MDSImages | FolderImages, indices: list[int], options: EncodeOptions) -> Iterator[Any]:
    """``(pixels, [(index, key, label)], [(key, reason)])`` per batch, the next one read and cropped in a thread.

    PIL decodes and resizes without the GIL, so reading batch ``b + 1`` overlaps encoding batch ``b``
    in the same process.
    """

    def load(chunk: list[int]) -> tuple[torch.Tensor | None, list[tuple[int, str, int | None]], list[tuple[str, str]]]:
        pixels, kept, skipped = [], [], []
        for index in chunk:
            record = records[index]
            if record.error is None:
                try:
                    pixels.append(preprocess_image(record.image, options.resolution))
                    kept.append((index, record.key, record.label))
                    continue
                except Exception as error:  # truncated or corrupt data shows up at decode time
                    record.error = f'cannot decode image ({type(error).__name__}: {error})'
            skipped.append((record.key, record.error))
        return (torch.stack(pixels) if pixels else None), kept, skipped

    chunks = [indices[i : i + options.batch_size] for i in range(0, len(indices), options.batch_size)]
    if not chunks:
        return
    with ThreadPoolExecutor(max_workers=1) as reader:
        pending = reader.submit(load, chunks[0])
        for chunk in chunks[1:]:
            ready, pending = pending.result(), reader.submit(load, chunk)
            yield ready
        yield pending.result()


def _noise(shape: torch.Size, seed: int, index: int, flipped: int) -> torch.Tensor:
    """The posterior noise of one sample (or its flipped copy): a function of the seed and the sample only."""
    state = int(np.random.SeedSequence([seed, index, flipped]).generate_state(1, np.uint64)[0])
    return torch.randn(shape, generator=torch.Generator().manual_seed(state))


@torch.inference_mode()
def _encode_batch(
    vae: torch.nn.Module, pixels: torch.Tensor, indices: list[int], options: EncodeOptions
) -> dict[str, torch.Tensor]:
    """The latent columns of one batch: originals and (``flip``) flipped copies in one encoder call."""
    n = len(pixels)
    if options.flip:
        pixels = torch.cat([pixels, pixels.flip(-1)])
    with torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=options.compute_dtype == 'bfloat16'):
        posterior = vae.encode(pixels).latent_dist
    if options.store == 'mean_std':
        values = {'mean': posterior.mean, 'std': posterior.std}
    else:
        draws = [(i, 0) for i in indices] + ([(i, 1) for i in indices] if options.flip else [])
        noise = torch.stack([_noise(posterior.mean.shape[1:], options.seed, *draw) for draw in draws])
        noise = noise.to(posterior.mean)
        values = {'sample': posterior.mean + posterior.std * noise}
    columns = {}
    for name, value in values.items():
        columns[name] = value[:n]
        if options.flip:
            columns[f'{name}_flip'] = value[n:]
    return columns


def _encode_part(
    vae: torch.nn.Module,
    records: MDSImages | FolderImages,
    index: int,
    indices: list[int],
    out: str,
    columns: dict[str, str],
    options: EncodeOptions,
    device: torch.device,
    memory_format: torch.memory_format,
    bar: tqdm,
) -> None:
    """Write part ``index`` (samples ``indices``) and then its finish marker."""
    written, skipped = 0, []
    with MDSWriter(out=os.path.join(out, part_name(index)), columns=columns, size_limit=options.size_limit) as writer:
        for pixels, kept, bad in _batches(records, indices, options):
            skipped.extend(bad)
            if pixels is not None:
                pixels = pixels.to(device, memory_format=memory_format)
                latents = _encode_batch(vae, pixels, [i for i, _, _ in kept], options)
                stored = {name: to_stored(value, options.dtype) for name, value in latents.items()}
                for row, (_, key, label) in enumerate(kept):
                    sample: dict[str, Any] = {name: array[row] for name, array in stored.items()}
                    sample['key'] = key
                    if 'label' in columns:
                        sample['label'] = label
                    writer.write(sample)
                written += len(kept)
            bar.update(len(kept) + len(bad))
    write_json_atomic(
        os.path.join(out, _STATE_DIR, f'{part_name(index)}.json'), {'written': written, 'skipped': skipped}
    )


def encode_latents(
    vae_source: str,
    data: str,
    out: str,
    options: EncodeOptions = EncodeOptions(),
    *,
    local: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
) -> EncodeSummary:
    """Encode ``data`` with the VAE at ``vae_source`` into an MDS dataset of latents at ``out``.

    Run it in every rank of a ``composer -n N`` launch (or alone): each rank encodes its parts; rank 0
    then merges the index and writes ``latents.json``.

    Args:
        vae_source: Anything ``load_autoencoder`` reads (diffusers folder, LDM ``.ckpt``, Composer checkpoint, hub id).
        data: Image MDS folder or URL, or image folder (see :func:`~eqvae_composer.latents.inputs.open_images`).
        out: Local output folder.
        options: How to encode. Default: ``EncodeOptions()``.
        local: Cache folder for a remote ``data``. Default: one streaming picks.
        image_column: MDS column with the image. Default: found among the usual names.
        label_column: MDS column with the label. Default: found among the usual names, if any.

    Returns:
        EncodeSummary: On rank 0 the whole output's counts; on other ranks their own share's.

    Raises:
        OutputExistsError: ``out`` holds something other than an unfinished run of the same encoding.
        ValueError: The autoencoder has no Gaussian posterior (e.g. a ``VQModel``), ``out`` is a URL, or the
            resolution is not a multiple of the VAE's downsampling factor.
        NothingEncodedError: Every input sample was skipped (on rank 0).
        ShardReadError: A shard of ``data`` could not be downloaded or read.
    """
    if is_remote(out):
        # Ranks write parts side by side and rank 0 merges them in place: that needs a folder
        # (shared by all nodes in a multi-node run); upload it afterwards.
        raise ValueError(
            f'--out {out}: the output must be a local (or shared) folder; encode there and upload it, '
            'e.g. with `aws s3 sync`, then stream it with StreamingLatentDataset(remote=...).'
        )
    start = time.perf_counter()
    rank, world_size = _rank_and_world()
    device = _device(options)
    if world_size > 1:
        from composer.utils import dist

        dist.initialize_dist('gpu' if device.type == 'cuda' else 'cpu', timeout=_BARRIER_TIMEOUT_S)
    vae = load_autoencoder(vae_source)
    if not isinstance(vae, AutoencoderKL):
        raise ValueError(
            f'{vae_source} is a {type(vae).__name__}: encoding stores the Gaussian posterior of an AutoencoderKL.'
        )
    factor = vae_downsample_factor(vae)
    if options.resolution % factor:
        raise ValueError(
            f'--resolution {options.resolution} must be a multiple of {factor}, the downsampling factor of the VAE '
            f'{vae_source} (pixels per latent cell): e.g. {max(factor, options.resolution // factor * factor)}.'
        )
    vae_record = _vae_record(vae_source, vae)  # hashed before any change of memory format or device
    vae.eval().requires_grad_(False).to(device)
    memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
    vae.to(memory_format=memory_format)
    records = open_images(data, local, image_column, label_column)
    num_samples = min(len(records), options.limit) if options.limit is not None else len(records)

    preprocessing = {'crop': options.crop, 'resolution': options.resolution, 'pixels': 'x / 127.5 - 1 (RGB)'}
    encoding_keys = ('store', 'dtype', 'flip', 'compute_dtype', 'channels_last', 'seed')
    encoding = {key: getattr(options, key) for key in encoding_keys}
    if options.store != 'sample':
        del encoding['seed']
    plan = {
        'format_version': FORMAT_VERSION,
        'input': {
            'data': data if is_remote(data) else os.path.abspath(data),
            'samples': num_samples,
            'sha256': _input_fingerprint(records),
        },
        'labelled': records.labelled,
        'vae_weights_sha256': vae_record['weights_sha256'],
        'preprocessing': preprocessing,
        'encoding': encoding,
        'part_size': options.part_size,
        'size_limit': options.size_limit,
    }
    final_files = ('index.json', METADATA_FILE, SKIPPED_REPORT)
    if rank == 0:
        done = prepare_output(out, plan, options.overwrite, state_dir=_STATE_DIR, final_files=final_files)
    _barrier(world_size)  # rank 0 has removed unfinished parts before anyone writes
    if rank != 0:
        done = finished_parts(os.listdir(os.path.join(out, _STATE_DIR)))

    latent_shape = [vae_record['latent_channels'], options.resolution // factor, options.resolution // factor]
    ndarray = f'ndarray:{DTYPES[options.dtype]}:{",".join(map(str, latent_shape))}'
    columns = {name: ndarray for name in latent_columns(options.store, options.flip)}
    columns['key'] = 'str'
    if records.labelled:
        columns['label'] = 'int'

    parts = [list(range(i, min(i + options.part_size, num_samples))) for i in range(0, num_samples, options.part_size)]
    mine = [i for i in range(len(parts)) if i % world_size == rank and i not in done]
    summary = EncodeSummary(out, resumed_parts=len(done), rank=rank, world_size=world_size)
    summary.processed = sum(len(parts[i]) for i in mine)
    desc = 'encode' if world_size == 1 else f'encode (rank 0 of {world_size})'
    with tqdm(total=summary.processed, unit='img', desc=desc, disable=not options.progress or rank != 0) as bar:
        for i in mine:
            _encode_part(vae, records, i, parts[i], out, columns, options, device, memory_format, bar)
    _barrier(world_size)
    if rank == 0:
        _finish(out, len(parts), summary, plan, vae_record, latent_shape, columns, records, device)
    summary.seconds = time.perf_counter() - start
    return summary


def _finish(
    out: str,
    num_parts: int,
    summary: EncodeSummary,
    plan: dict[str, Any],
    vae_record: dict[str, Any],
    latent_shape: list[int],
    columns: dict[str, str],
    records: MDSImages | FolderImages,
    device: torch.device,
) -> None:
    """Rank 0, once every part is finished: the skipped report, ``latents.json``, then the merged index.

    Raises:
        NothingEncodedError: No part wrote a sample (the report is written; no index, so no dataset).
    """
    for i in range(num_parts):
        with open(os.path.join(out, _STATE_DIR, f'{part_name(i)}.json')) as f:
            marker = json.load(f)
        summary.written += marker['written']
        summary.skipped.extend((key, reason) for key, reason in marker['skipped'])
    with open(os.path.join(out, SKIPPED_REPORT), 'w') as f:
        f.writelines(json.dumps({'key': key, 'reason': reason}) + '\n' for key, reason in summary.skipped)
    if not summary.written:
        data = plan['input']['data']
        if not summary.skipped:
            raise NothingEncodedError(f'{data} holds no samples: nothing to encode.')
        key, reason = summary.skipped[0]
        raise NothingEncodedError(
            f'No sample of {data} could be encoded: all {len(summary.skipped)} were skipped (the first, {key}: '
            f'{reason}); see {os.path.join(out, SKIPPED_REPORT)}.'
        )
    write_metadata(
        out,
        {
            'format_version': FORMAT_VERSION,
            'samples': summary.written,
            'skipped': len(summary.skipped),
            'latent_shape': latent_shape,
            'columns': columns,
            **plan['encoding'],
            'labelled': records.labelled,
            'vae': vae_record,
            'preprocessing': plan['preprocessing'],
            'input': plan['input'],
            'device': device.type,  # of the run that finished the output
        },
    )
    logging.disable(logging.WARNING)  # merge_index warns about its temporary folder and the non-empty output
    try:
        merge_index([os.path.join(out, part_name(i), 'index.json') for i in range(num_parts)], out)
    finally:
        logging.disable(logging.NOTSET)


def format_summary(summary: EncodeSummary) -> str:
    """A few human-readable lines about an encoding (rank 0's summary)."""
    lines = [f'{summary.written} latents written to {summary.out} ({summary.seconds:.1f} s)']
    if summary.world_size > 1:
        lines.append(f'  this rank (0 of {summary.world_size}) encoded {summary.processed}; the others the rest')
    if summary.resumed_parts:
        lines.append(f'  resumed: {summary.resumed_parts} parts were already finished by an earlier run')
    lines.append(f'  skipped: {len(summary.skipped)} (listed in {os.path.join(summary.out, SKIPPED_REPORT)})')
    for key, reason in summary.skipped[:5]:
        lines.append(f'    {key}: {reason}')
    if len(summary.skipped) > 5:
        lines.append(f'    ... and {len(summary.skipped) - 5} more')
    return '\n'.join(lines)
