"""The reference's evaluation (zelaki/eqvae ``eval.py`` @ c34589c), step for step, for ``--protocol reference``.

What it does, with its line numbers (docs/REFERENCE_EVAL.md sets each beside our default):

- preprocessing (L60-65): ``ToTensor``, then torchvision ``Resize(256)`` and ``CenterCrop(256)`` on
  the float tensor (bilinear, antialiased by torchvision >= 0.17), ``Normalize(0.5, 0.5)``; the model sees the float
  image, never a uint8 one;
- reconstruction (L119-120): a posterior sample, decoded, not clamped;
- SSIM (L109, L126) and LPIPS (L108, L125) on that unclamped float reconstruction against the float
  input, one value per DataLoader batch (batch size 1, L72): SSIM by torchmetrics with its defaults,
  so its data range is inferred from each batch (max - min); the per-batch values are averaged
  across ranks elementwise and then over batches (L137-143);
- PSNR and rFID (L148-153) on the PNGs it writes, ``clamp(127.5 x + 128, 0, 255)`` truncated to
  uint8 (L98 references, L122 reconstructions): PSNR ``20 log10(255 / sqrt(MSE))`` per image
  (L170-172), averaged over images; rFID with pytorch-fid (``reference_fid``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torch import nn
from torchmetrics import Metric
from torchmetrics.functional.image import structural_similarity_index_measure
from torchvision import transforms

from eqvae_composer.evaluation.metrics import MeanPerImage
from eqvae_composer.evaluation.reference_fid import ReferenceFID
from eqvae_composer.models.lpips import lpips_distance

__all__ = [
    'REFERENCE_BATCH_SIZE',
    'REFERENCE_METRICS',
    'MeanPerBatch',
    'ReferenceMetrics',
    'ReferencePNGWriter',
    'reference_psnr',
    'reference_ssim',
    'reference_transform',
    'reference_uint8',
]

#: What the reference's eval.py measures.
REFERENCE_METRICS = ('rfid', 'psnr', 'ssim', 'lpips')
#: Its DataLoader's batch size (L72): the unit of its SSIM data range and of its SSIM/LPIPS means.
REFERENCE_BATCH_SIZE = 1


def reference_transform(resolution: int = 256) -> transforms.Compose:
    """The reference's eval transform (L60-65): PIL image -> ``FloatTensor[3, R, R]`` in [-1, 1], not quantized.

    ``antialias=True`` is torchvision's default for tensors from 0.17 on; it is spelled out so an
    older torchvision gives the same pixels (0.15-0.16 defaulted to no antialiasing for tensors).

    Args:
        resolution (int): the side of the resize and of the centre crop. Default: ``256``.
    """
    return transforms.Compose(
        [
            transforms.ToTensor(),
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
            transforms.CenterCrop(resolution),
            transforms.Normalize(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]),
        ]
    )


def reference_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images -> the uint8 pixels of the reference's PNGs: ``clamp(127.5 x + 128, 0, 255)``, truncated.

    Truncating ``127.5 x + 128`` rounds ``127.5 (x + 1)`` half up (ours, ``to_uint8``, rounds half
    to even); the expression is the reference's own (L98, L122), in float32, so the levels are its
    levels to the last bit.
    """
    return torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8)


def reference_psnr(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR of uint8 images as the reference computes it (L170-172): ``20 log10(255 / sqrt(MSE))``."""
    mse = (target.float() - preds.float()).pow(2).mean(dim=(1, 2, 3))
    return 20 * torch.log10(255.0 / torch.sqrt(mse))


def reference_ssim(preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """One batch's SSIM as ``StructuralSimilarityIndexMeasure()(preds, target)`` returns it (L109, L126).

    torchmetrics' defaults: gaussian window 11, sigma 1.5, k1 0.01, k2 0.03, mean over the batch's
    images, and ``data_range=None``: the range is ``max(preds.max() - preds.min(), target.max() -
    target.min())`` over the whole batch, here of an unclamped reconstruction in about [-1, 1].
    """
    return structural_similarity_index_measure(preds.float(), target.float())


class MeanPerBatch(MeanPerImage):
    """Mean of one value per batch over all ranks' batches.

    The reference all-reduces its per-batch lists with ``AVG`` and then takes their mean (L137-143);
    its sampler gives every rank the same number of batches, so that equals this sum over batches
    divided by their count.
    """


class ReferencePNGWriter:
    """Writes the reference's two PNG folders (L98-99, L129-130), for pytorch-fid or its PSNR script to read.

    ``<root>/ref_images/ref_image_rank_<r>_<i>.png`` and ``<root>/decoded_images/decoded_image_rank_<r>_<i>.png``,
    ``i`` counting this rank's images from 0, so both folders sort into the same pairs.

    Args:
        root (str | PathLike): the output folder.
        rank (int): this process's rank.
    """

    def __init__(self, root: str | os.PathLike, rank: int) -> None:
        self.reference_dir = os.path.join(root, 'ref_images')
        self.decoded_dir = os.path.join(root, 'decoded_images')
        os.makedirs(self.reference_dir, exist_ok=True)
        os.makedirs(self.decoded_dir, exist_ok=True)
        self.rank = rank
        self.count = 0

    def write(self, reconstructions: torch.Tensor, references: torch.Tensor) -> None:
        """Save one batch of uint8 ``(B, 3, H, W)`` images (``reference_uint8``)."""
        for reconstruction, reference in zip(reconstructions, references):
            for folder, prefix, image in (
                (self.reference_dir, 'ref_image', reference),
                (self.decoded_dir, 'decoded_image', reconstruction),
            ):
                path = os.path.join(folder, f'{prefix}_rank_{self.rank}_{self.count}.png')
                Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(path)
            self.count += 1


class ReferenceMetrics:
    """rFID, PSNR, SSIM and LPIPS of ``--protocol reference``, fed one DataLoader batch at a time.

    A batch is split into groups of ``batch_size`` images, the reference's batches; each group
    gives one SSIM and one LPIPS value. Groups line up with the reference's as long as every
    DataLoader batch but the last holds a multiple of ``batch_size`` images (``evaluate`` checks).

    Args:
        metrics (Sequence[str]): names from ``REFERENCE_METRICS``.
        inception (nn.Module, optional): FID features (``load_reference_inception()``); needed for ``rfid``.
        lpips_net (nn.Module, optional): LPIPS network; needed for ``lpips``.
        batch_size (int): images per reference batch. Default: ``REFERENCE_BATCH_SIZE`` (1).
        writer (ReferencePNGWriter, optional): also write the PNG folders.
        device (torch.device | str): where the metric states live. Default: ``'cpu'``.
    """

    def __init__(
        self,
        metrics: Sequence[str],
        inception: nn.Module | None = None,
        lpips_net: nn.Module | None = None,
        batch_size: int = REFERENCE_BATCH_SIZE,
        writer: ReferencePNGWriter | None = None,
        device: torch.device | str = 'cpu',
    ) -> None:
        unknown = sorted(set(metrics) - set(REFERENCE_METRICS))
        if unknown:
            raise ValueError(
                f'--protocol reference measures {list(REFERENCE_METRICS)} (what the reference eval.py '
                f'measures); {unknown} exist only in the default protocol.'
            )
        if batch_size < 1:
            raise ValueError(f'the reference batch size must be positive, got {batch_size}.')
        self.batch_size = batch_size
        self.lpips_net = lpips_net
        self.writer = writer
        factories: dict[str, Callable[[], Metric]] = {
            'rfid': lambda: ReferenceFID(inception),
            'psnr': MeanPerImage,  # per image (L153)
            'ssim': MeanPerBatch,
            'lpips': MeanPerBatch,
        }
        self.table = {name: factories[name]().to(device) for name in REFERENCE_METRICS if name in metrics}

    def update(self, reconstructions: torch.Tensor, images: torch.Tensor) -> None:
        """Add a batch: the float reconstructions (unclamped) and the float inputs, both about [-1, 1]."""
        reconstructions, images = reconstructions.float(), images.float()
        table = self.table
        if 'psnr' in table or 'rfid' in table or self.writer is not None:
            decoded, references = reference_uint8(reconstructions), reference_uint8(images)
            if 'psnr' in table:
                table['psnr'].update(reference_psnr(decoded, references))
            if 'rfid' in table:
                table['rfid'].update(decoded, references)
            if self.writer is not None:
                self.writer.write(decoded, references)
        for start in range(0, len(images), self.batch_size):
            recon, image = reconstructions[start : start + self.batch_size], images[start : start + self.batch_size]
            if 'ssim' in table:
                table['ssim'].update(reference_ssim(recon, image))
            if 'lpips' in table:
                table['lpips'].update(lpips_distance(self.lpips_net, recon, image).mean())

    def compute(self) -> dict[str, float]:
        """Every metric over all ranks' images."""
        return {name: float(metric.compute()) for name, metric in self.table.items()}
