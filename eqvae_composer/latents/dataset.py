"""The latents ``scripts/encode_latents.py`` wrote, streamed into a diffusion trainer."""

from __future__ import annotations

import os
import uuid
from typing import Any

import torch
from streaming import StreamingDataset
from streaming.base.storage import CloudDownloader

from eqvae_composer.compat import ResumeMemoryHook, init_streaming_dataset
from eqvae_composer.data.dataset import check_local_dataset, sample_rng
from eqvae_composer.latents.storage import METADATA_FILE, from_stored, read_metadata

__all__ = ['FLIPS', 'StreamingLatentDataset']

#: Values of ``flip``: pick the flipped copy half the time, never, or always (when the dataset stores one).
FLIPS = ('random', 'never', 'always')


class StreamingLatentDataset(ResumeMemoryHook, StreamingDataset):
    """Scaled latents from an MDS dataset of ``scripts/encode_latents.py``, ready for a diffusion trainer.

    Each sample is ``z = mean + std * eps`` (or the stored sample, or the mean with
    ``sample_posterior=False``), scaled as diffusers does for diffusion: ``(z - shift_factor) *
    scaling_factor``, with the VAE's factors from ``latents.json``. Noise and the flip choice are a
    pure function of ``(shuffle_seed, epoch, sample index)``, like the image dataset's crops.

    Args:
        sample_posterior: Draw from the posterior when mean and std are stored (DiT's
            ``latent_dist.sample()``); ``False`` takes the mean. Default: ``True``.
        flip: ``'random'`` (the stored flipped copy half the time, as DiT's random flip), ``'never'``
            or ``'always'``; a dataset without flip copies only allows ``'never'`` and ``'random'`` (then never).
            Default: ``'random'``.
        output_key: Key of the latent in each sample. Default: ``'latent'``.
        **streaming_kwargs: Passed to ``StreamingDataset`` (``local``, ``remote``, ``split``, ``batch_size``,
            ``shuffle``, ...). Default set here: ``shuffle=True``.

    Returns samples ``{output_key: FloatTensor[C, h, w], 'label': LongTensor[]}`` (``label`` when the
    dataset has labels).

    Attributes:
        metadata: The dataset's ``latents.json``.
        scaling_factor: The VAE's ``scaling_factor``.
        shift_factor: The VAE's ``shift_factor`` (0 when it has none).

    Raises:
        FileNotFoundError: No ``index.json`` (local) or no ``latents.json``.
        ValueError: ``flip`` is not one of ``FLIPS``, or ``'always'`` without stored flip copies.
    """

    def __init__(
        self,
        *,
        sample_posterior: bool = True,
        flip: str = 'random',
        output_key: str = 'latent',
        **streaming_kwargs: Any,
    ) -> None:
        if flip not in FLIPS:
            raise ValueError(f'flip must be one of {", ".join(FLIPS)}, got {flip!r}.')
        if streaming_kwargs.get('streams'):
            raise ValueError('StreamingLatentDataset reads one dataset: pass local/remote, not streams.')
        if streaming_kwargs.get('remote') is None:
            check_local_dataset(streaming_kwargs.get('local'), streaming_kwargs.get('split'))
        streaming_kwargs.setdefault('shuffle', True)
        init_streaming_dataset(super().__init__, **streaming_kwargs)
        self.metadata = self._read_metadata()
        if flip == 'always' and not self.metadata['flip']:
            raise ValueError("flip='always' needs flipped copies: encode with --flip.")
        self.sample_posterior = sample_posterior
        self.flip = flip if self.metadata['flip'] else 'never'
        self.output_key = output_key
        self.scaling_factor = float(self.metadata['vae']['scaling_factor'])
        self.shift_factor = float(self.metadata['vae']['shift_factor'])

    def _read_metadata(self) -> dict[str, Any]:
        stream = self.streams[0]
        folder = os.path.join(stream.local, stream.split or '')
        path = os.path.join(folder, METADATA_FILE)
        if not os.path.isfile(path) and stream.remote:
            remote = f'{stream.remote.rstrip("/")}/{stream.split + "/" if stream.split else ""}{METADATA_FILE}'
            # Every rank (and worker) may download it at once: each to its own file, then an atomic rename.
            # The file is not created first: the downloader leaves an existing file as it is.
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, f'.{METADATA_FILE}.{uuid.uuid4().hex}')
            try:
                CloudDownloader.get(remote).download(remote, tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        return read_metadata(path)

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (a diffusion model's output) back to what the VAE's decoder takes."""
        return latents / self.scaling_factor + self.shift_factor

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Sample ``index``: its latent, drawn and scaled; its label.

        Args:
            index: Sample index.

        Returns:
            dict[str, torch.Tensor]: ``{output_key: FloatTensor[C, h, w]}`` (+ ``label``).
        """
        sample = super().__getitem__(index)
        rng = sample_rng(self, index)
        flipped = self.flip == 'always' or (self.flip == 'random' and rng.random() < 0.5)
        suffix = '_flip' if flipped else ''
        dtype = self.metadata['dtype']
        if self.metadata['store'] == 'sample':
            z = from_stored(sample[f'sample{suffix}'], dtype)
        else:
            z = from_stored(sample[f'mean{suffix}'], dtype)
            if self.sample_posterior:
                std = from_stored(sample[f'std{suffix}'], dtype)
                z = z + std * torch.from_numpy(rng.standard_normal(z.shape, dtype='float32'))
        out = {self.output_key: (z - self.shift_factor) * self.scaling_factor}
        if 'label' in sample:
            out['label'] = torch.tensor(int(sample['label']))
        return out
