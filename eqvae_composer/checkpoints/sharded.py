"""Composer's FSDP sharded checkpoints (``torch.distributed.checkpoint`` folders), read in one process.

With ``fsdp.state_dict_type: sharded``, Composer 0.32 (``composer/utils/checkpoint.py: _save_checkpoint``)
saves ``{'state': state.state_dict(), 'rng': ...}`` with ``torch.distributed.checkpoint.save`` into one
folder per checkpoint, ``<save_folder>/ep{epoch}-ba{batch}/``: a ``__{rank}_0.distcp`` file per rank and
a ``.metadata`` index, written last; ``latest-rank0.pt`` is a link to that folder. DCP flattens the nested
state to dotted keys (``state.model.autoencoder.vae.encoder.conv_in.weight``): each tensor is stored as
its ranks' shards and reassembled on load; every other value (the algorithms list, each callback
setting) is pickled whole and written once, by rank 0.

Export needs only the model's tensors, the algorithms (EMA), the EMA copy this project's ``EMA`` saves
as a callback's state (``EMA_COPY_CALLBACK``, every rank's shard) and the recorded VAE config; the Adam
moments (twice the model's size), the RNG and the rest stay on disk.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

from eqvae_composer.checkpoints.composer_state import EMA_COPY_CALLBACK, AutoencoderConfigRecorder

__all__ = ['is_sharded_checkpoint', 'read_sharded_checkpoint']

# The DCP keys export reads (prefixes of the flattened names).
_EXPORT_KEYS = (
    'state.model.',
    'state.algorithms',
    f'state.callbacks.{AutoencoderConfigRecorder.__name__}.',
    f'state.callbacks.{EMA_COPY_CALLBACK}.',
)


class _WeightsOnlyLoadPlanner(dcp.DefaultLoadPlanner):
    """Loads into a flat ``{DCP key: value}`` dict, unpickling non-tensor values with ``weights_only=True``.

    ``DefaultLoadPlanner.load_bytes`` unpickles with ``weights_only=False`` (it can run any pickled
    code); the values export reads are plain Python objects, tensors and DTensors, all of which the
    weights-only unpickler accepts.
    """

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, map_location='cpu', weights_only=True)


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is (or links to) a folder written by ``torch.distributed.checkpoint``.

    A folder with shard files but no ``.metadata`` counts too: a save killed before its index was
    written, which ``read_sharded_checkpoint`` then reports as incomplete.

    Args:
        path: a checkpoint folder such as ``ep0-ba2000/``, or ``latest-rank0.pt``.
    """
    path = Path(path).expanduser()
    return path.is_dir() and ((path / '.metadata').is_file() or any(path.glob('*.distcp')))


def read_sharded_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """What export needs of a sharded Composer checkpoint, nested as ``torch.load`` of a monolithic one.

    Runs in one process, without a process group (or ignoring one that is initialised).

    Args:
        path: the checkpoint folder, or a link to it.

    Returns:
        ``{'state': {'model': {...}, 'algorithms': [...], 'callbacks': {...}}}`` with full (unsharded)
        tensors. Values that Composer pickles whole (the algorithms' state) keep whatever they held
        on rank 0: a DTensor there (Composer's own ``EMA`` under FSDP2) holds rank 0's shard only.

    Raises:
        Exception: whatever ``torch.distributed.checkpoint`` raises for a missing index or a missing
            or truncated shard file.
    """
    reader = dcp.FileSystemReader(Path(path).expanduser())
    metadata = reader.read_metadata()
    flat: dict[str, Any] = {
        key: torch.empty(item.size, dtype=item.properties.dtype) if isinstance(item, TensorStorageMetadata) else None
        for key, item in metadata.state_dict_metadata.items()
        if key.startswith(_EXPORT_KEYS)
    }
    with warnings.catch_warnings():  # one process is the intent, not an accident
        warnings.filterwarnings('ignore', message='torch.distributed is disabled')
        dcp.load(flat, storage_reader=reader, planner=_WeightsOnlyLoadPlanner(), no_dist=True)
    checkpoint: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, leaf = metadata.planner_data[key]  # the key's path in the saved nested dict
        node = checkpoint
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return checkpoint
