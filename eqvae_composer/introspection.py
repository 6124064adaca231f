"""Finding things inside models: the ComposerModel inside a DDP wrapper, the autoencoder and its latent grid.

Neutral ground for the algorithm, the models, evaluation, checkpoints and callbacks alike, so that
none of them imports another's module just for these.

What the rest of the project needs to know of a diffusers autoencoder class is one
``AutoencoderAdapter``: where the latent enters its decoder (the algorithm's hook), how many pixels
a latent cell covers, and how to encode images to the latent grid the equivariance error compares.
``AutoencoderKL`` and ``VQModel`` have one each; ``register_adapter`` adds another class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL, VQModel
from torch import nn

__all__ = [
    'ADAPTERS',
    'AutoencoderAdapter',
    'adapter_for',
    'adapter_of_kind',
    'autoencoder_class',
    'find_autoencoder',
    'latent_entry_point',
    'register_adapter',
    'unwrap_model',
    'vae_downsample_factor',
]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ComposerModel a Trainer was given: DDP wraps it (``.module``); FSDP1 and FSDP2 shard it in place."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _encoder_downsample_factor(vae: nn.Module) -> int:
    # diffusers' Encoder downsamples after every block but the last.
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _kl_entry(vae: AutoencoderKL) -> nn.Module:
    # AutoencoderKL._decode: post_quant_conv when the config has one (SD, SDXL), else straight into the
    # decoder (use_post_quant_conv: false, as SD3 and FLUX).
    post_quant_conv = getattr(vae, 'post_quant_conv', None)
    return post_quant_conv if post_quant_conv is not None else vae.decoder


def _kl_encode(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    return vae.encode(images).latent_dist.mode()


def _kl_posterior(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    posterior = vae.encode(images).latent_dist
    return posterior.mean, posterior.std


def _vq_entry(vae: VQModel) -> nn.Module:
    # VQModel.decode(h) quantizes h itself: tau applies to the pre-quantization latent z_e and the
    # decoder sees the codes of tau(z_e) (the method card's "Discrete latents (VQ-GAN)" says why).
    return vae.quantize


def _vq_encode(vae: VQModel, images: torch.Tensor) -> torch.Tensor:
    return vae.encode(images).latents  # z_e: quant_conv's output, before quantization


def _vq_posterior(vae: VQModel, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    return _vq_encode(vae, images), None  # deterministic: nothing to sample


def _vq_codes(vae: VQModel, latents: torch.Tensor) -> torch.Tensor:
    _, _, (_, _, codes) = vae.quantize(latents)  # what vae.decode(latents) quantizes to
    return codes.reshape(len(latents), -1)


@dataclass(frozen=True)
class AutoencoderAdapter:
    """What the algorithm, the models and evaluation need to know of one diffusers autoencoder class.

    Attributes:
        kind: a short name (``'kl'``, ``'vq'``), as ``train.py``'s ``model.kind``.
        autoencoder_class: the diffusers class (subclasses match too).
        latent_entry: ``vae -> module`` whose forward input is the latent the decoder path starts
            from: ``EquivarianceAlgorithm`` replaces that input by tau(z) with a forward pre-hook.
        encode: ``(vae, images) -> latents``, deterministic (the posterior mode; z_e for VQ), the
            latent grid the equivariance error compares.
        downsample_factor: ``vae -> int``, pixels per latent cell.
        posterior: ``(vae, images) -> (mode, std)``: the latent ``vae.decode`` takes, as a posterior's
            mode and standard deviation (``std`` is ``None`` for a deterministic latent, so evaluation
            reconstructs from the mode whatever it is asked); ``encode`` without the std.
        codes: ``(vae, latents) -> LongTensor[B, cells]``, the code indices ``vae.decode(latents)``
            quantizes to, for the codebook metrics; ``None`` for continuous latents.
    """

    kind: str
    autoencoder_class: type[nn.Module]
    latent_entry: Callable[[Any], nn.Module]
    encode: Callable[[Any, torch.Tensor], torch.Tensor]
    downsample_factor: Callable[[Any], int] = _encoder_downsample_factor
    posterior: Callable[[Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]] | None = None
    codes: Callable[[Any, torch.Tensor], torch.Tensor] | None = None


#: The registered adapters by kind, in registration order.
ADAPTERS: dict[str, AutoencoderAdapter] = {}


def register_adapter(adapter: AutoencoderAdapter) -> AutoencoderAdapter:
    """Make ``adapter``'s class usable everywhere an autoencoder is looked for; returns it.

    Raises:
        ValueError: another adapter already has this kind or this class.
    """
    for other in ADAPTERS.values():
        if adapter.kind == other.kind or adapter.autoencoder_class is other.autoencoder_class:
            raise ValueError(
                f'an adapter for {other.kind!r} ({other.autoencoder_class.__name__}) is already registered.'
            )
    ADAPTERS[adapter.kind] = adapter
    return adapter


register_adapter(AutoencoderAdapter('kl', AutoencoderKL, _kl_entry, _kl_encode, posterior=_kl_posterior))
register_adapter(AutoencoderAdapter('vq', VQModel, _vq_entry, _vq_encode, posterior=_vq_posterior, codes=_vq_codes))


def _supported() -> str:
    return ', '.join(f'{a.autoencoder_class.__name__} ({a.kind})' for a in ADAPTERS.values())


def adapter_for(module: nn.Module) -> AutoencoderAdapter:
    """The adapter of ``module``'s class (or of the nearest registered base class).

    Raises:
        TypeError: no adapter is registered for the class; the message lists those that are.
    """
    for cls in type(module).__mro__:
        for adapter in ADAPTERS.values():
            if cls is adapter.autoencoder_class:
                return adapter
    raise TypeError(
        f'no autoencoder adapter for {type(module).__name__}; supported: {_supported()} '
        '(eqvae_composer.introspection.register_adapter adds one).'
    )


def adapter_of_kind(kind: str) -> AutoencoderAdapter:
    """The adapter named ``kind`` (``'kl'``, ``'vq'``, ...).

    Raises:
        ValueError: an unknown kind, naming the known ones.
    """
    if kind not in ADAPTERS:
        raise ValueError(f'unknown autoencoder kind {kind!r}; known: {sorted(ADAPTERS)}.')
    return ADAPTERS[kind]


def autoencoder_class(config: Mapping[str, Any]) -> type[nn.Module]:
    """The class a diffusers config describes: its ``_class_name`` (as in ``config.json``), else ``AutoencoderKL``.

    Raises:
        ValueError: a ``_class_name`` without a registered adapter.
    """
    name = config.get('_class_name') or AutoencoderKL.__name__
    for adapter in ADAPTERS.values():
        if adapter.autoencoder_class.__name__ == name:
            return adapter.autoencoder_class
    raise ValueError(f'the config describes a {name}, which this project cannot train; supported: {_supported()}.')


def find_autoencoder(model: nn.Module) -> nn.Module:
    """The single supported diffusers autoencoder inside ``model`` (which may be one itself).

    Raises:
        ValueError: none, or more than one.
    """
    classes = tuple(adapter.autoencoder_class for adapter in ADAPTERS.values())
    found = [m for m in model.modules() if isinstance(m, classes)]
    if len(found) != 1:
        raise ValueError(
            f'EquivarianceAlgorithm needs a model holding exactly one diffusers autoencoder ({_supported()}); '
            f'{type(model).__name__} holds {len(found)}.',
        )
    return found[0]


def latent_entry_point(vae: nn.Module) -> nn.Module:
    """The module whose input is the latent ``vae.decode`` starts from (see ``AutoencoderAdapter.latent_entry``)."""
    return adapter_for(vae).latent_entry(vae)


def vae_downsample_factor(vae: nn.Module) -> int:
    """Pixels per latent cell: 2 ** (number of encoder blocks - 1), i.e. 8 for SD-VAE, 16 for VQGAN f16."""
    return adapter_for(vae).downsample_factor(vae)
