"""Our MDS latents in the layouts other latent-diffusion codebases read, so they can train on them as-is.

- fast-DiT (``chuanyangjin/fast-DiT`` ``train.py`` ``CustomDataset``): ``imagenet256_features/<i>.npy``
  ``(1, C, h, w)`` float32 and ``imagenet256_labels/<i>.npy`` ``(1,)``, paired by sorted name; the
  latents already scaled (its ``extract_features.py`` stores ``sample().mul_(0.18215)``).
- REPA (``sihyun-yu/REPA`` ``dataset.py`` ``CustomDataset``): ``vae-sd/<5 digits>/img-mean-std-<8 digits>.npy``
  holding the posterior's mean and std concatenated on channels (its ``train.py`` samples and scales them with
  ``sample_posterior(moments, latents_scale, latents_bias)``), ``vae-sd/dataset.json`` with
  ``{"labels": [[name, label], ...]}``, and the centre-cropped images it aligns representations with,
  ``images/<5 digits>/img<8 digits>.png``.
- LightningDiT (``hustvl/LightningDiT`` ``datasets/img_latent_dataset.py`` ``ImgLatentDataset``):
  ``*.safetensors`` shards with ``latents``, ``latents_flip`` ``(N, C, h, w)`` and ``labels`` ``(N,)``,
  plus ``latents_stats.pt`` (per-channel mean/std, which it computes and caches on first use otherwise).

DiT and SiT themselves (``facebookresearch/DiT``, ``willisma/SiT``) read images (``ImageFolder``) and
encode them in every step: they have no latent layout; fast-DiT is DiT's code with this loader, REPA
SiT's. Every export writes ``handoff.json``: what was written and the scaling to set on their side.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from eqvae_composer.latents import StreamingLatentDataset, center_crop_arr
from eqvae_composer.latents.inputs import FolderImages, MDSImages, open_images
from eqvae_composer.latents.storage import from_stored

__all__ = ['TARGETS', 'export_fast_dit', 'export_latents', 'export_lightningdit', 'export_repa']


def _open(latents: str, **kwargs: Any) -> StreamingLatentDataset:
    return StreamingLatentDataset(local=latents, shuffle=False, **kwargs)


def _labels(dataset: StreamingLatentDataset) -> None:
    if not dataset.metadata['labelled']:
        raise ValueError(f'{dataset.streams[0].local} has no labels: class-conditional trainers need them.')


def _write_handoff(out: str, record: dict[str, Any]) -> None:
    with open(os.path.join(out, 'handoff.json'), 'w') as f:
        json.dump(record, f, indent=2)


def export_fast_dit(latents: str, out: str, seed: int = 0, sample_posterior: bool = True) -> int:
    """fast-DiT's ``features/`` layout: one scaled latent per image (a seeded posterior sample, random flip).

    Args:
        latents: A folder written by ``scripts/encode_latents.py``.
        out: fast-DiT's ``--feature-path``.
        seed: Seeds the posterior samples and flips (fast-DiT draws them once, at extraction). Default: 0.
        sample_posterior: ``False`` writes the posterior mean. Default: ``True``.

    Returns:
        The number of samples written.
    """
    dataset = _open(latents, shuffle_seed=seed, sample_posterior=sample_posterior, flip='random')
    _labels(dataset)
    features, labels = os.path.join(out, 'imagenet256_features'), os.path.join(out, 'imagenet256_labels')
    os.makedirs(features, exist_ok=True)
    os.makedirs(labels, exist_ok=True)
    for i in range(len(dataset)):
        sample = dataset[i]
        np.save(os.path.join(features, f'{i}.npy'), sample['latent'][None].numpy().astype(np.float32))
        np.save(os.path.join(labels, f'{i}.npy'), np.array([int(sample['label'])], dtype=np.int64))
    _write_handoff(out, {'target': 'fast-DiT', 'samples': len(dataset), 'latents': latents, 'scaled': True})
    return len(dataset)


def _input_index(records: MDSImages | FolderImages) -> dict[str, int]:
    """Input key -> input index, to find each latent's image (a latent's ``key`` is its input's key)."""
    if isinstance(records, FolderImages):
        return {file.key: i for i, file in enumerate(records.files)}
    if not records.has_key:
        return {str(i): i for i in range(len(records))}
    return {records[i].key: i for i in range(len(records))}  # keyed MDS input: one pass over it


def export_repa(latents: str, out: str, images: str | None = None) -> int:
    """REPA's layout: raw posterior mean and std per image, its labels, and its centre-cropped image.

    Args:
        latents: A folder written by ``scripts/encode_latents.py`` with ``--store mean_std`` (the default).
        out: REPA's ``--data-dir``.
        images: The images the latents were encoded from. Default: ``latents.json``'s ``input.data``.

    Returns:
        The number of samples written.
    """
    dataset = _open(latents, sample_posterior=False, flip='never')
    _labels(dataset)
    metadata = dataset.metadata
    if metadata['store'] != 'mean_std':
        raise ValueError(f'{latents} stores posterior samples: REPA reads mean and std (encode with --store mean_std).')
    records = open_images(images or metadata['input']['data'])
    index = _input_index(records)
    resolution = int(metadata['preprocessing']['resolution'])
    labels = []
    for i in range(len(dataset)):
        sample = dataset.get_item(i)
        folder = f'{i // 1000:05d}'
        for sub in ('vae-sd', 'images'):
            os.makedirs(os.path.join(out, sub, folder), exist_ok=True)
        moments = torch.cat(
            [from_stored(sample['mean'], metadata['dtype']), from_stored(sample['std'], metadata['dtype'])]
        )
        name = f'{folder}/img-mean-std-{i:08d}.npy'
        np.save(os.path.join(out, 'vae-sd', name), moments.numpy().astype(np.float32))
        labels.append([name, int(sample['label'])])
        key = str(sample['key'])
        if key not in index:
            raise ValueError(f'latent {i} comes from input {key!r}, which {images or metadata["input"]["data"]} lacks.')
        record = records[index[key]]
        if record.image is None:
            raise ValueError(f'input {key!r} cannot be read ({record.error}).')
        image = center_crop_arr(record.image.convert('RGB'), resolution)
        image.save(os.path.join(out, 'images', folder, f'img{i:08d}.png'))
    with open(os.path.join(out, 'vae-sd', 'dataset.json'), 'w') as f:
        json.dump({'labels': labels}, f)
    scale, shift = dataset.scaling_factor, dataset.shift_factor
    _write_handoff(
        out,
        {
            'target': 'REPA',
            'samples': len(dataset),
            'latents': latents,
            # REPA's train.py: z = sample * latents_scale + latents_bias; ours: (sample - shift) * scale.
            'latents_scale': scale,
            'latents_bias': -shift * scale,
        },
    )
    return len(dataset)


def export_lightningdit(
    latents: str, out: str, shard_size: int = 4096, seed: int = 0, sample_posterior: bool = True
) -> int:
    """LightningDiT's safetensors shards of scaled latents, their flips and labels, and ``latents_stats.pt``.

    Set ``latent_norm: false`` and ``latent_multiplier: 1.0`` in LightningDiT's config to train on exactly
    our scaling; with ``latent_norm: true`` it standardizes each channel with ``latents_stats.pt``. Without
    stored flip copies (``--flip`` at encoding) ``latents_flip`` repeats ``latents``: no flip augmentation.

    Args:
        latents: A folder written by ``scripts/encode_latents.py``.
        out: LightningDiT's ``data_path``.
        shard_size: Samples per shard. Default: 4096 (theirs).
        seed: Seeds the posterior samples. Default: 0.
        sample_posterior: ``False`` writes the posterior mean. Default: ``True``.

    Returns:
        The number of samples written.
    """
    views = {'latents': _open(latents, shuffle_seed=seed, sample_posterior=sample_posterior, flip='never')}
    _labels(views['latents'])
    has_flips = bool(views['latents'].metadata['flip'])
    if has_flips:
        views['latents_flip'] = _open(latents, shuffle_seed=seed, sample_posterior=sample_posterior, flip='always')
    os.makedirs(out, exist_ok=True)
    total = len(views['latents'])
    sums = None
    for shard, start in enumerate(range(0, total, shard_size)):
        batch = {name: [] for name in ('latents', 'latents_flip', 'labels')}
        for i in range(start, min(start + shard_size, total)):
            sample = views['latents'][i]
            batch['latents'].append(sample['latent'])
            batch['latents_flip'].append(views['latents_flip'][i]['latent'] if has_flips else sample['latent'])
            batch['labels'].append(sample['label'])
        tensors = {name: torch.stack(values).contiguous() for name, values in batch.items()}
        save_file(tensors, os.path.join(out, f'latents_rank00_shard{shard:03d}.safetensors'))
        z = tensors['latents'].double()
        moments = torch.stack([z.sum(dim=(0, 2, 3)), z.pow(2).sum(dim=(0, 2, 3))])
        sums = moments if sums is None else sums + moments
    count = total * views['latents'].metadata['latent_shape'][1] * views['latents'].metadata['latent_shape'][2]
    mean = sums[0] / count
    std = ((sums[1] - count * mean**2) / (count - 1)).sqrt()  # unbiased, as torch.std in their compute_latent_stats
    shape = (1, -1, 1, 1)
    torch.save(
        {'mean': mean.float().view(shape), 'std': std.float().view(shape)}, os.path.join(out, 'latents_stats.pt')
    )
    _write_handoff(
        out,
        {'target': 'LightningDiT', 'samples': total, 'latents': latents, 'flip_copies': has_flips, 'scaled': True},
    )
    return total


#: ``scripts/export_latents.py``'s targets.
TARGETS = {'fast-dit': export_fast_dit, 'repa': export_repa, 'lightningdit': export_lightningdit}


def export_latents(target: str, latents: str, out: str, **kwargs: Any) -> int:
    """Export to ``target`` (one of ``TARGETS``)."""
    if target not in TARGETS:
        raise ValueError(f'unknown target {target!r}; known: {", ".join(TARGETS)}.')
    return TARGETS[target](latents, out, **kwargs)
