"""DiT networks by name (``DiT-S/2`` .. ``DiT-XL/8``) as diffusers' ``DiTTransformer2DModel``, for any latent shape."""

from __future__ import annotations

import re
from typing import Any

from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding

__all__ = ['DIT_SIZES', 'build_dit', 'dit_config']

#: DiT's table 1: depth, hidden size, heads (SiT uses the same sizes).
DIT_SIZES = {'S': (12, 384, 6), 'B': (12, 768, 12), 'L': (24, 1024, 16), 'XL': (28, 1152, 16)}
_NAME = re.compile(r'^(?:DiT|SiT)-(S|B|L|XL)/(2|4|8)$')


def dit_config(
    name: str,
    in_channels: int,
    sample_size: int,
    num_classes: int,
    learn_sigma: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """``DiTTransformer2DModel`` kwargs for a named size.

    Args:
        name: ``DiT-<S|B|L|XL>/<2|4|8>`` (or ``SiT-...``: the same network).
        in_channels: Latent channels.
        sample_size: Latent side in pixels.
        num_classes: Number of classes (the null class for guidance is added on top).
        learn_sigma: Twice the channels out (epsilon and variance values, DiT's DDPM). Default: ``False``.
        **overrides: Any other ``DiTTransformer2DModel`` argument (e.g. ``num_layers`` for a tiny test model).

    Raises:
        ValueError: An unknown name, or a latent side the patch does not divide.
    """
    match = _NAME.match(name)
    if match is None:
        raise ValueError(f'unknown network {name!r}: use DiT-<S|B|L|XL>/<2|4|8>, e.g. DiT-B/2.')
    depth, hidden, heads = DIT_SIZES[match.group(1)]
    patch = int(match.group(2))
    if sample_size % patch:
        raise ValueError(f'{name}: the latent side {sample_size} is not divisible by the patch size {patch}.')
    config = dict(
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        in_channels=in_channels,
        out_channels=2 * in_channels if learn_sigma else in_channels,
        num_layers=depth,
        sample_size=sample_size,
        patch_size=patch,
        num_embeds_ada_norm=num_classes,
    )
    return {**config, **overrides}


def build_dit(config: dict[str, Any]) -> DiTTransformer2DModel:
    """The network, with diffusers' own label dropout switched off.

    diffusers gives every block its own label embedding, each dropping labels with probability 0.1 by
    its own draw in training mode: one block would see a sample's class while the next sees the null
    class. The probe drops labels itself, once per sample (``guidance.drop_labels``); the null row of
    each table (index ``num_classes``) stays.
    """
    model = DiTTransformer2DModel(**config)
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return model
