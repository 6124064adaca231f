"""Staged training: which parameters of the autoencoder train (``model.trainable``), the rest frozen.

EQ-SDXL-VAE's second stage trains the decoder alone after the EQ stage: reconstruction recovers while
the latent space, and every diffusion model trained on it, stays as it is. Freezing sets
``requires_grad=False`` before the Trainer wraps the model, so a frozen parameter gets no gradient, no
optimizer state (``param_groups`` skips it), no DDP/FSDP gradient traffic and no EMA copy (Composer's
EMA averages parameters that require gradients only).

A selection is ``'all'``, a named part (``PARTS``) or a list of parameter-name prefixes of the VAE
(``'decoder.up_blocks.3'``); a prefix matches a name equal to it or starting with it and a dot.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

__all__ = ['ALL', 'PARTS', 'freeze_except', 'trainable_prefixes', 'trains_encoder']

#: Every parameter trains: the paper's setting and the default.
ALL = 'all'
#: Named parts of a diffusers autoencoder. The encoder side is everything that shapes the latent: the
#: encoder, ``quant_conv`` (the posterior's moments; z_e for VQ) and a VQ codebook (``quantize``); the
#: decoder side is what reads it. A name a class lacks (``quantize`` in AutoencoderKL) matches nothing.
PARTS: dict[str, tuple[str, ...]] = {
    'encoder': ('encoder', 'quant_conv', 'quantize'),
    'decoder': ('post_quant_conv', 'decoder'),
}


def trainable_prefixes(trainable: str | Sequence[str]) -> tuple[str, ...]:
    """The parameter-name prefixes ``trainable`` selects; ``('',)`` (every name) for ``'all'``.

    Args:
        trainable: ``'all'``, a key of ``PARTS``, or a list of prefixes (and part names).

    Raises:
        ValueError: an empty list, or a single name that is neither ``'all'`` nor a part.
    """
    if isinstance(trainable, str):
        if trainable == ALL:
            return ('',)
        if trainable not in PARTS:
            raise ValueError(
                f'trainable: unknown part {trainable!r}; use {ALL!r}, {" or ".join(map(repr, PARTS))}, '
                "or a list of parameter-name prefixes such as ['decoder.up_blocks.3']."
            )
        return PARTS[trainable]
    if not trainable:
        raise ValueError('trainable: an empty list would train nothing; use a part name or prefixes.')
    prefixes: list[str] = []
    for item in trainable:
        prefixes.extend(PARTS.get(item, (str(item),)))
    return tuple(prefixes)


def _matches(name: str, prefix: str) -> bool:
    return prefix == '' or name == prefix or name.startswith(prefix + '.')


def trains_encoder(trainable: str | Sequence[str]) -> bool:
    """Whether the selection trains some parameter of the encoder proper (``encoder.*``).

    The equivariance regularizer shapes the latent through the encoder; without it, it has nothing to train.
    """
    return any(_matches('encoder', p) or p.startswith('encoder.') for p in trainable_prefixes(trainable))


def freeze_except(vae: nn.Module, trainable: str | Sequence[str]) -> list[str]:
    """Freeze (``requires_grad=False``) every parameter of ``vae`` that ``trainable`` does not select.

    ``'all'`` changes nothing. Call it before the model is wrapped (DDP, FSDP) and the optimizer built.

    Args:
        vae: the autoencoder.
        trainable: see ``trainable_prefixes``.

    Returns:
        The names of the frozen parameters.

    Raises:
        ValueError: a prefix that matches no parameter (a typo would otherwise freeze its part
            silently), or a selection that matches nothing at all.
    """
    prefixes = trainable_prefixes(trainable)
    if prefixes == ('',):
        return []
    names = [name for name, _ in vae.named_parameters()]
    explicit = () if isinstance(trainable, str) else [p for p in prefixes if p not in sum(PARTS.values(), ())]
    unmatched = [p for p in explicit if not any(_matches(name, p) for name in names)]
    if unmatched:
        raise ValueError(
            f'trainable: no parameter of the {type(vae).__name__} is named {unmatched[0]!r} or starts with '
            f'{unmatched[0] + "."!r}; top-level parts: {sorted({n.split(".")[0] for n in names})}.'
        )
    frozen = [name for name in names if not any(_matches(name, p) for p in prefixes)]
    if len(frozen) == len(names):
        raise ValueError(f'trainable: {trainable!r} selects no parameter of the {type(vae).__name__}.')
    parameters = dict(vae.named_parameters())
    for name in frozen:
        parameters[name].requires_grad_(False)
    return frozen
