"""How latents are stored in MDS, and the metadata file written beside the index.

Columns (one sample per image)::

    mean, std            the posterior's mean and standard deviation   (store='mean_std', the default)
    sample               one posterior sample                          (store='sample')
    mean_flip, std_flip  / sample_flip: the same for the horizontally flipped image (flip=True)
    label                the integer class, when the input has one
    key                  the input's key (relative path, or sample index)

Latent columns are fixed-shape ``ndarray`` columns, readable by any streaming user: ``float16`` as
such; ``bfloat16``, which numpy lacks, as its bit pattern in ``uint16`` (``metadata['dtype']`` says
which). The values are the VAE's raw latents: ``scaling_factor`` and ``shift_factor`` are recorded
in ``latents.json``, not applied, so one encoding serves any normalisation.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from eqvae_composer.data.parts import write_json_atomic

__all__ = [
    'DTYPES',
    'METADATA_FILE',
    'STORES',
    'from_stored',
    'latent_columns',
    'read_metadata',
    'to_stored',
    'write_metadata',
]

METADATA_FILE = 'latents.json'
#: Values of ``--store``: what of the posterior is kept.
STORES = {'mean_std': ('mean', 'std'), 'sample': ('sample',)}
#: Values of ``--dtype``, and the numpy dtype each is stored as.
DTYPES = {'float16': 'float16', 'bfloat16': 'uint16', 'float32': 'float32'}
_TORCH_DTYPES = {'float16': torch.float16, 'bfloat16': torch.bfloat16, 'float32': torch.float32}
#: ``format_version`` of ``latents.json``; bumped when the layout changes.
FORMAT_VERSION = 1


def latent_columns(store: str, flip: bool) -> list[str]:
    """Names of the latent columns for a ``store`` mode, with the flip copies after the originals."""
    names = list(STORES[store])
    return names + [f'{name}_flip' for name in names] if flip else names


def to_stored(latents: torch.Tensor, dtype: str) -> np.ndarray:
    """A batch of float latents as the numpy array a column holds (``bfloat16``: its bits as ``uint16``)."""
    stored = latents.detach().to('cpu', _TORCH_DTYPES[dtype]).contiguous()
    if dtype == 'bfloat16':
        stored = stored.view(torch.int16)  # numpy has no bfloat16: keep the bits
    return stored.numpy().view(DTYPES[dtype])


def from_stored(array: np.ndarray, dtype: str) -> torch.Tensor:
    """A column's array back as a ``float32`` tensor (the inverse of :func:`to_stored`)."""
    tensor = torch.from_numpy(np.array(array))  # a writable copy: MDS hands out read-only views
    if dtype == 'bfloat16':
        tensor = tensor.view(torch.bfloat16)
    return tensor.float()


def write_metadata(folder: str, metadata: dict[str, Any]) -> None:
    """Write ``latents.json`` into ``folder`` (atomically: a reader never sees half of it)."""
    write_json_atomic(os.path.join(folder, METADATA_FILE), metadata)


def read_metadata(path: str) -> dict[str, Any]:
    """Read a ``latents.json`` file.

    Raises:
        FileNotFoundError: There is none: the folder was not written by ``scripts/encode_latents.py``.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f'{path} does not exist: the dataset was not written by scripts/encode_latents.py, or its encoding '
            f'did not finish (run the same command again to resume it).'
        )
    with open(path) as f:
        return json.load(f)
