"""The evaluation protocol (spec section 5) as one function: a VAE and a dataset in, a dict of numbers out.

Each rank evaluates its own shard of the first N images; every metric is a torchmetrics ``Metric``
whose states are summed or concatenated across ranks at ``compute``, and posterior noise is seeded
per image index, so 1 process and W processes give the same numbers up to float summation order.
``EvalProtocol(name='reference')`` measures as the reference's eval.py does instead (``reference``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from composer.utils import dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Metric
from tqdm.auto import tqdm

from eqvae_composer.algorithms.equivariance.transforms import SpatialTransform, apply_to_image, apply_to_latent
from eqvae_composer.evaluation.codebook import CodebookPerplexity, DeadCodeFraction
from eqvae_composer.evaluation.datasets import PROTOCOLS, IndexedDataset, dataset_size, rank_shard, reference_shard
from eqvae_composer.evaluation.fid import ReconstructionFID
from eqvae_composer.evaluation.intrinsic_dim import LatentIntrinsicDimension
from eqvae_composer.evaluation.metrics import (
    EVAL_ROTATIONS,
    EVAL_SCALES,
    MeanPerImage,
    ReconstructionPSNR,
    ReconstructionSSIM,
    equivariance_errors,
)
from eqvae_composer.evaluation.reference import REFERENCE_BATCH_SIZE, ReferenceMetrics, ReferencePNGWriter
from eqvae_composer.introspection import AutoencoderAdapter, adapter_for
from eqvae_composer.models.lpips import lpips_distance

__all__ = ['ALL_METRICS', 'DEFAULT_METRICS', 'EvalProtocol', 'evaluate', 'posterior_noise']

#: What ``evaluate`` can measure; ``rfid`` and ``lpips`` need pretrained weights, ``codebook`` a
#: vector-quantized autoencoder (``VQModel``).
ALL_METRICS = ('rfid', 'psnr', 'ssim', 'lpips', 'equivariance', 'intrinsic_dim', 'codebook')
DEFAULT_METRICS = ('rfid', 'psnr', 'ssim', 'lpips', 'equivariance')


@dataclass(frozen=True)
class EvalProtocol:
    """How the numbers are measured; recorded verbatim in the results.

    Args:
        resolution (int): images are resized (shorter side) to this and centre-cropped. Default: ``256``.
        sample_posterior (bool): reconstruct from z ~ q(z|x) (the paper) or from its mode. Default: ``True``.
        seed (int): seeds each image's posterior noise together with its index. Default: ``0``.
        rotations (tuple[int, ...]): quarter turns of the rotation equivariance error. Default: 1, 2, 3.
        scales (tuple[float, ...]): scales of the scale equivariance error and of the per-scale
            reconstruction metrics. Default: 0.25, 0.5, 0.75.
        interpolation (str): resize mode of tau, as in training. Default: ``'bilinear'``.
        name (str): ``'default'`` (ours, above) or ``'reference'``: the reference eval.py's
            preprocessing, sharding, quantization and averaging (``evaluation.reference``; the
            dataset must come from ``build_eval_dataset(..., protocol='reference')``). Default: ``'default'``.
        reference_batch_size (int): with ``'reference'``, images per SSIM data range and per SSIM /
            LPIPS value. Default: ``1``, the reference's.
    """

    resolution: int = 256
    sample_posterior: bool = True
    seed: int = 0
    rotations: tuple[int, ...] = EVAL_ROTATIONS
    scales: tuple[float, ...] = EVAL_SCALES
    interpolation: str = 'bilinear'
    name: str = 'default'
    reference_batch_size: int = REFERENCE_BATCH_SIZE

    def __post_init__(self) -> None:
        if self.name not in PROTOCOLS:
            raise ValueError(f'unknown protocol {self.name!r}; choose from {list(PROTOCOLS)}.')
        if self.reference_batch_size < 1:
            raise ValueError(f'reference_batch_size must be positive, got {self.reference_batch_size}.')

    def describe(self) -> dict[str, Any]:
        """The protocol as JSON-ready values, with the fixed parts spelled out."""
        if self.name == 'reference':
            return self._describe_reference()
        return {
            **{key: value for key, value in asdict(self).items() if key != 'reference_batch_size'},
            'rotations_degrees': [90 * k for k in self.rotations],
            'preprocessing': f'resize shorter side to {self.resolution} (antialiased bicubic), center crop',
            'reconstruction_latent': 'posterior sample' if self.sample_posterior else 'posterior mode',
            'quantization': 'reconstructions and references rounded to uint8 before PSNR, SSIM and FID',
            'ssim': 'torchmetrics SSIM on [0, 1] images (gaussian kernel 11, sigma 1.5)',
            'psnr': 'per image on [0, 1] images, averaged over images',
            'fid': 'torchmetrics FID, Inception-v3 2048-d pool features, statistics summed over ranks',
            'equivariance_error': '||tau(E(x)) - E(tau(x))||^2 / ||E(tau(x))||^2 with E = posterior mode, '
            'averaged over images per transform; R and S average the rotation / scale transforms',
            'scaled_reconstruction': 'D(tau(z)) against tau(x) per scale, z as for reconstruction',
            'intrinsic_dim': 'TwoNN (Facco et al. 2017, 10% largest ratios discarded) on flattened posterior modes',
        }

    def _describe_reference(self) -> dict[str, Any]:
        r, k = self.resolution, self.reference_batch_size
        return {
            'name': self.name,
            'resolution': r,
            'sample_posterior': self.sample_posterior,
            'seed': self.seed,
            'reference_batch_size': k,
            'source': 'zelaki/eqvae eval.py @ c34589c (docs/REFERENCE_EVAL.md)',
            'preprocessing': f'torchvision ImageFolder; ToTensor, Resize({r}) bilinear antialiased and '
            f'CenterCrop({r}) on the float tensor, Normalize(0.5, 0.5); not quantized',
            'sharding': 'torch DistributedSampler (shuffle, seed 0), padded with repeats to a multiple of '
            'the number of processes',
            'reconstruction_latent': 'posterior sample' if self.sample_posterior else 'posterior mode',
            'quantization': 'clamp(127.5 x + 128, 0, 255) truncated to uint8, for PSNR and rFID only',
            'ssim': f'torchmetrics SSIM defaults, data range inferred per batch of {k}, on the unclamped float '
            'reconstruction; mean over batches',
            'lpips': f'LPIPS-VGG on the unclamped float reconstruction, mean per batch of {k}, then over batches',
            'psnr': '20 log10(255 / sqrt(MSE)) per uint8 image, averaged over images',
            'fid': 'pytorch-fid Inception-v3 2048-d pool features of the uint8 images, np.cov statistics, '
            'pytorch-fid calculate_frechet_distance',
        }


def posterior_noise(indices: Sequence[int], shape: Sequence[int], seed: int) -> torch.Tensor:
    """Standard normal noise for each image, a function of ``(seed, index)`` only (not of batch or rank).

    Args:
        indices (Sequence[int]): dataset indices of the batch's images.
        shape (Sequence[int]): one image's latent shape ``(C, h, w)``.
        seed (int): the protocol's seed.
    """
    # numpy's seed sequence mixes (seed, index) fully; torch.Generator would keep only 32 bits of one int.
    noise = [np.random.default_rng((seed, int(i))).standard_normal(tuple(shape), dtype=np.float32) for i in indices]
    return torch.from_numpy(np.stack(noise))


def _transform_name(tau: SpatialTransform) -> str:
    return f'rot{90 * tau.quarter_turns}' if tau.quarter_turns else f'scale{tau.scale_h:g}'


class _Metrics:
    """The metric objects one evaluation needs, keyed by their result name."""

    def __init__(
        self,
        metrics: Sequence[str],
        protocol: EvalProtocol,
        inception: nn.Module | None,
        device: torch.device,
        num_codes: int | None = None,
    ) -> None:
        self.rotations = [SpatialTransform(quarter_turns=k) for k in protocol.rotations]
        self.scales = [SpatialTransform(s, s) for s in protocol.scales]
        self.equivariance = 'equivariance' in metrics
        table: dict[str, Metric] = {}
        if 'rfid' in metrics:
            table['rfid'] = ReconstructionFID(inception)
        if 'psnr' in metrics:
            table['psnr'] = ReconstructionPSNR()
        if 'ssim' in metrics:
            table['ssim'] = ReconstructionSSIM()
        if 'lpips' in metrics:
            table['lpips'] = MeanPerImage()
        if 'equivariance' in metrics:
            for tau in self.rotations + self.scales:
                table[f'equivariance_error/{_transform_name(tau)}'] = MeanPerImage()
            for tau in self.scales:
                table[f'scaled_psnr/{tau.scale_h:g}'] = ReconstructionPSNR()
                if 'rfid' in metrics:  # one Inception shared by all FIDs
                    table[f'scaled_rfid/{tau.scale_h:g}'] = ReconstructionFID(inception)
        if 'intrinsic_dim' in metrics:
            table['intrinsic_dim'] = LatentIntrinsicDimension()
        if 'codebook' in metrics:
            table['codebook_perplexity'] = CodebookPerplexity(num_codes)
            table['dead_code_fraction'] = DeadCodeFraction(num_codes)
        self.table = {name: metric.to(device) for name, metric in table.items()}

    def compute(self) -> dict[str, float]:
        results = {name: float(metric.compute()) for name, metric in self.table.items()}
        for kind, taus in (('R', self.rotations), ('S', self.scales)):
            names = [f'equivariance_error/{_transform_name(tau)}' for tau in taus]
            if names and all(name in results for name in names):
                # Every transform sees every image, so the mean of per-transform means is the
                # mean over (image, transform) pairs, as the paper averages.
                results[f'equivariance_error/{kind}'] = sum(results[name] for name in names) / len(names)
        return results


@torch.no_grad()
def evaluate(
    vae: nn.Module,
    dataset: Dataset,
    metrics: Sequence[str] = DEFAULT_METRICS,
    protocol: EvalProtocol = EvalProtocol(),
    num_images: int | None = None,
    batch_size: int = 16,
    inception: nn.Module | None = None,
    lpips_net: nn.Module | None = None,
    device: torch.device | str | None = None,
    num_workers: int = 0,
    progress: bool = True,
    image_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate ``vae`` on the first ``num_images`` samples of ``dataset``, sharded over the ranks.

    Args:
        vae (nn.Module): the autoencoder, any kind with an adapter (``AutoencoderKL``, ``VQModel``; see
            ``eqvae_composer.introspection``), put in eval mode here. A deterministic latent (VQ's z_e)
            is reconstructed as it is, whatever ``protocol.sample_posterior`` says.
        dataset (Dataset): indexable, samples ``{'image': FloatTensor[3, R, R]}`` in [-1, 1]
            (see ``build_eval_dataset``).
        metrics (Sequence[str]): names from ``ALL_METRICS``. Default: ``DEFAULT_METRICS``.
        protocol (EvalProtocol): how to measure. Default: the paper's.
        num_images (int, optional): evaluate the first N samples. Default: all.
        batch_size (int): images per forward on each rank. Default: ``16``.
        inception (nn.Module, optional): FID feature extractor (``load_inception()``, or
            ``load_reference_inception()`` for the reference protocol); needed for ``rfid``.
        lpips_net (nn.Module, optional): LPIPS network (``load_lpips()``); needed for ``lpips``.
        device (torch.device | str, optional): where to compute. Default: the VAE's device.
        num_workers (int): dataloader worker processes. Default: ``0``.
        progress (bool): show a progress bar on rank 0. Default: ``True``.
        image_dir (str | PathLike, optional): with the reference protocol, also write its PNG
            folders (``ReferencePNGWriter``) here. Default: none written.

    Returns:
        dict: ``metrics`` (name -> value), ``num_images``, ``num_evaluated`` (with the reference
        protocol's repeats), ``world_size``, ``seconds`` and ``images_per_second`` (all ranks
        together), and ``protocol`` (``EvalProtocol.describe()``).

    Raises:
        ValueError: an unknown metric, ``rfid`` / ``lpips`` without its network, ``codebook`` for an
            autoencoder without a codebook; with the reference
            protocol, a metric it does not measure or a ``batch_size`` that is not a multiple of
            ``protocol.reference_batch_size``; ``image_dir`` without it.
    """
    unknown = sorted(set(metrics) - set(ALL_METRICS))
    if unknown:
        raise ValueError(f'unknown metrics {unknown}; choose from {list(ALL_METRICS)}.')
    if 'rfid' in metrics and inception is None:
        raise ValueError("the 'rfid' metric needs an Inception network (see load_inception).")
    if 'lpips' in metrics and lpips_net is None:
        raise ValueError("the 'lpips' metric needs an LPIPS network (see load_lpips).")
    adapter = adapter_for(vae)
    if 'codebook' in metrics and adapter.codes is None:
        raise ValueError(
            f"the 'codebook' metric needs a vector-quantized autoencoder, not a {type(vae).__name__}; leave it out."
        )
    reference = protocol.name == 'reference'
    if reference and 'codebook' in metrics:
        raise ValueError("the reference protocol does not measure 'codebook'; use the default protocol.")
    if reference and batch_size % protocol.reference_batch_size:
        raise ValueError(
            f'batch_size {batch_size} must be a multiple of the reference batch size '
            f'{protocol.reference_batch_size}, so each batch splits into whole reference batches.'
        )
    if image_dir is not None and not reference:
        raise ValueError("image_dir writes the reference protocol's PNG folders; use it with the reference protocol.")
    device = torch.device(device) if device is not None else next(vae.parameters()).device
    vae.to(device).eval()
    factor = adapter.downsample_factor(vae)
    rank, world_size = dist.get_global_rank(), dist.get_world_size()
    total = dataset_size(dataset) if num_images is None else min(num_images, dataset_size(dataset))
    indices = (reference_shard if reference else rank_shard)(total, rank, world_size)
    loader = DataLoader(IndexedDataset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    if reference:
        writer = ReferencePNGWriter(image_dir, rank) if image_dir is not None else None
        state: _Metrics | ReferenceMetrics = ReferenceMetrics(
            metrics, inception, lpips_net, protocol.reference_batch_size, writer, device
        )
    else:
        num_codes = vae.config.num_vq_embeddings if 'codebook' in metrics else None
        state = _Metrics(metrics, protocol, inception, device, num_codes)

    start = time.perf_counter()
    bar = tqdm(total=total, desc='eval', unit='img', disable=not progress or dist.get_global_rank() != 0)
    deterministic = False
    for batch in loader:
        images = batch['image'].to(device)
        mode, std = _posterior(adapter, vae, images)
        deterministic = std is None
        z = mode
        if protocol.sample_posterior and std is not None:
            noise = posterior_noise(batch['index'].tolist(), mode.shape[1:], protocol.seed).to(device, mode.dtype)
            z = mode + std * noise
        if isinstance(state, ReferenceMetrics):
            state.update(vae.decode(z).sample, images)
        else:
            _update(state, vae, adapter, images, z, mode, factor, protocol, lpips_net)
        bar.update(len(images) * world_size)  # rank 0's pace stands for all ranks
    bar.close()
    results = state.compute()
    dist.barrier()
    seconds = time.perf_counter() - start
    return {
        'metrics': results,
        'num_images': total,
        'num_evaluated': len(indices) * world_size,
        'world_size': world_size,
        'seconds': seconds,
        'images_per_second': total / seconds if seconds > 0 else float('nan'),
        'protocol': _describe(protocol, deterministic),
    }


def _describe(protocol: EvalProtocol, deterministic: bool) -> dict[str, Any]:
    """``protocol.describe()``, saying so when the latent had no posterior to sample from (VQ's z_e)."""
    description = protocol.describe()
    if deterministic:
        description['reconstruction_latent'] = 'deterministic latent (no posterior to sample)'
    return description


def _posterior(
    adapter: AutoencoderAdapter, vae: nn.Module, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(mode, std)`` of the latent (``std`` ``None`` when it is deterministic)."""
    if adapter.posterior is None:
        return adapter.encode(vae, images), None
    return adapter.posterior(vae, images)


def _update(
    state: _Metrics,
    vae: nn.Module,
    adapter: AutoencoderAdapter,
    images: torch.Tensor,
    z: torch.Tensor,
    mode: torch.Tensor,
    factor: int,
    protocol: EvalProtocol,
    lpips_net: nn.Module | None,
) -> None:
    """Feed one batch to every metric in ``state``."""
    table = state.table

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return vae.decode(latents).sample

    def encode(x: torch.Tensor) -> torch.Tensor:
        return adapter.encode(vae, x)

    if {'rfid', 'psnr', 'ssim', 'lpips'} & set(table):
        reconstruction = decode(z)
        for name in ('rfid', 'psnr', 'ssim'):
            if name in table:
                table[name].update(reconstruction, images)
        if 'lpips' in table:
            table['lpips'].update(lpips_distance(lpips_net, images, reconstruction))
    if 'intrinsic_dim' in table:
        table['intrinsic_dim'].update(mode)
    if 'codebook_perplexity' in table:
        codes = adapter.codes(vae, z)
        table['codebook_perplexity'].update(codes)
        table['dead_code_fraction'].update(codes)
    taus = state.rotations + state.scales
    if state.equivariance:
        errors = equivariance_errors(encode, images, taus, factor, mode, protocol.interpolation)
        for tau, per_image in zip(taus, errors):
            table[f'equivariance_error/{_transform_name(tau)}'].update(per_image)
        for tau in state.scales:
            target = apply_to_image(images, tau, factor, protocol.interpolation)
            scaled = decode(apply_to_latent(z, tau, protocol.interpolation))
            table[f'scaled_psnr/{tau.scale_h:g}'].update(scaled, target)
            if f'scaled_rfid/{tau.scale_h:g}' in table:
                table[f'scaled_rfid/{tau.scale_h:g}'].update(scaled, target)
