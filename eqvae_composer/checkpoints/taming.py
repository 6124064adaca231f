"""taming-transformers VQGAN (``taming.models.vqgan.VQModel`` ``.ckpt``) key names <-> diffusers ``VQModel``, both ways.

diffusers ships no converter for taming's VQGAN, and its LDM converter (``convert_ldm_vae_checkpoint``,
the KL side's, ``checkpoints/ldm.py``) maps the middle block's attention only: taming also puts
attention blocks inside the levels listed in ``attn_resolutions`` (the ImageNet f16-16384 model at
16 px, its lowest resolution), which diffusers expresses as ``AttnDownEncoderBlock2D`` /
``AttnUpDecoderBlock2D``. So the names are mapped here, one rename per module kind, from the keys of a
diffusers ``VQModel`` built (on the meta device) from the config; the inverse is the same map read
backwards. The layout is taming's ``Encoder`` / ``Decoder`` (``taming/modules/diffusionmodules/model.py``)
and ``VectorQuantizer2`` (``taming/modules/vqvae/quantize.py``), which LDM's own VQ first stages share.

As for LDM, attention projections are 1x1 convolutions in taming and linear layers in diffusers.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import VQModel

from eqvae_composer.checkpoints.ldm import LDM_PREFIX, KeyMismatchError, format_keys

__all__ = [
    'diffusers_to_taming',
    'is_taming_vq_state_dict',
    'taming_key_map',
    'taming_to_diffusers',
    'taming_vq_config',
]

#: A key only a taming-layout VQGAN has: the codebook of its ``quantize`` module.
_CODEBOOK = 'quantize.embedding.weight'

# A taming training checkpoint also holds its loss (LPIPS + discriminator), not part of the autoencoder.
_IGNORED_PREFIXES = ('loss.',)

# diffusers module name -> taming's, inside resnets and attention blocks (and the encoder's/decoder's end).
_RENAMES = {
    'conv_shortcut': 'nin_shortcut',
    'group_norm': 'norm',
    'to_q': 'q',
    'to_k': 'k',
    'to_v': 'v',
    'to_out.0': 'proj_out',
    'conv_norm_out': 'norm_out',
}
_ATTENTION_WEIGHT = re.compile(r'\.(to_q|to_k|to_v|to_out\.0)\.weight$')


def _taming_name(key: str, num_levels: int) -> str:
    """The taming name of a diffusers ``VQModel`` key."""
    for diffusers_name, taming_name in _RENAMES.items():
        key = key.replace(f'.{diffusers_name}.', f'.{taming_name}.')
    key = re.sub(r'\.mid_block\.resnets\.(\d)\.', lambda m: f'.mid.block_{int(m[1]) + 1}.', key)
    key = key.replace('.mid_block.attentions.0.', '.mid.attn_1.')
    key = re.sub(r'^encoder\.down_blocks\.(\d+)\.', r'encoder.down.\1.', key)
    # diffusers lists the decoder's levels from the lowest resolution up; taming indexes them as the encoder's.
    key = re.sub(r'^decoder\.up_blocks\.(\d+)\.', lambda m: f'decoder.up.{num_levels - 1 - int(m[1])}.', key)
    key = re.sub(r'\.resnets\.(\d+)\.', r'.block.\1.', key)
    key = re.sub(r'\.attentions\.(\d+)\.', r'.attn.\1.', key)
    return key.replace('.downsamplers.0.', '.downsample.').replace('.upsamplers.0.', '.upsample.')


@functools.lru_cache(maxsize=16)
def _key_map(config_json: str) -> dict[str, str]:
    config = json.loads(config_json)
    with torch.device('meta'):  # only the key names are needed
        keys = list(VQModel.from_config(config).state_dict())
    mapping = {key: _taming_name(key, len(config['block_out_channels'])) for key in keys}
    if len(set(mapping.values())) != len(mapping):
        raise KeyMismatchError('this VQModel config has modules the taming layout cannot name apart.')
    return mapping


def taming_key_map(config: Mapping[str, Any]) -> dict[str, str]:
    """Diffusers key -> taming key for every tensor of a ``VQModel`` with this config.

    Args:
        config: the diffusers ``VQModel`` config.
    """
    return dict(_key_map(json.dumps(dict(config), sort_keys=True, default=str)))


def _strip_prefix(state: Mapping[str, Any]) -> dict[str, Any]:
    """The autoencoder's keys: those under ``first_stage_model.`` when there are any, else all but the loss's."""
    if any(key.startswith(LDM_PREFIX) for key in state):
        return {key[len(LDM_PREFIX) :]: value for key, value in state.items() if key.startswith(LDM_PREFIX)}
    return {key: value for key, value in state.items() if not key.startswith(_IGNORED_PREFIXES)}


def is_taming_vq_state_dict(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` is a taming-layout VQGAN (a codebook and taming's ``encoder.down.*``), any prefix."""
    state = _strip_prefix(state)
    return _CODEBOOK in state and any(key.startswith('encoder.down.') for key in state)


def _levels(state: Mapping[str, Any], part: str) -> int:
    return 1 + max(int(key.split('.')[2]) for key in state if key.startswith(f'{part}.'))


def taming_vq_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The diffusers ``VQModel`` config of a taming VQGAN state dict, read from its keys and shapes.

    taming's checkpoints carry no config (its ``ddconfig`` lives in a separate YAML): the levels,
    widths, resnets per level, attention levels, latent and codebook sizes are all in the tensors.
    GroupNorm has 32 groups in taming, always.

    Args:
        state: taming-named tensors, with or without ``first_stage_model.``.

    Raises:
        KeyMismatchError: a tensor the config is read from is missing.
    """
    state = _strip_prefix(state)
    required = [
        'encoder.conv_in.weight',
        'encoder.conv_out.weight',
        'decoder.conv_out.weight',
        'quant_conv.weight',
        _CODEBOOK,
        'encoder.down.0.block.0.conv1.weight',
    ]
    missing = [key for key in required if key not in state]
    if missing:
        raise KeyMismatchError(f'not a taming VQGAN state dict: missing keys {missing}.')
    levels = _levels(state, 'encoder.down')
    block_out_channels = [int(state[f'encoder.down.{i}.block.0.conv1.weight'].shape[0]) for i in range(levels)]
    layers_per_block = len({key.split('.')[4] for key in state if key.startswith('encoder.down.0.block.')})

    def attends(part: str, level: int) -> bool:
        return any(key.startswith(f'{part}.{level}.attn.') for key in state)

    return {
        '_class_name': VQModel.__name__,
        'in_channels': int(state['encoder.conv_in.weight'].shape[1]),
        'out_channels': int(state['decoder.conv_out.weight'].shape[0]),
        'down_block_types': [
            'AttnDownEncoderBlock2D' if attends('encoder.down', i) else 'DownEncoderBlock2D' for i in range(levels)
        ],
        'up_block_types': [  # diffusers' up blocks go from the lowest resolution up
            'AttnUpDecoderBlock2D' if attends('decoder.up', levels - 1 - i) else 'UpDecoderBlock2D'
            for i in range(levels)
        ],
        'block_out_channels': block_out_channels,
        'layers_per_block': layers_per_block,
        'act_fn': 'silu',
        'latent_channels': int(state['encoder.conv_out.weight'].shape[0]),
        'vq_embed_dim': int(state['quant_conv.weight'].shape[0]),
        'num_vq_embeddings': int(state[_CODEBOOK].shape[0]),
        'norm_num_groups': 32,
        'mid_block_add_attention': 'encoder.mid.attn_1.q.weight' in state,
    }


def _check_keys(what: str, expected: set[str], found: set[str]) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        raise KeyMismatchError(
            f'{what}: missing keys {format_keys(missing)}; unexpected keys {format_keys(unexpected)}.'
        )


def taming_to_diffusers(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Rename a taming VQGAN state dict (a ``.ckpt``'s ``state_dict``) to a diffusers ``VQModel``'s keys.

    With a ``first_stage_model.`` prefix only those keys are read (a taming transformer or an LDM
    holds the VQGAN there); without one, every key except the training loss's ``loss.*``.

    Args:
        state: taming-named tensors.
        config: the diffusers ``VQModel`` config (``taming_vq_config(state)`` reads it from the tensors).

    Raises:
        KeyMismatchError: missing or unexpected keys, listed in taming names (e.g. ``quantize.used``
            of a quantizer with index remapping, which diffusers' ``VQModel`` does not build).
    """
    state = _strip_prefix(state)
    to_taming = taming_key_map(config)
    _check_keys('taming VQGAN state dict does not match the architecture', set(to_taming.values()), set(state))
    converted = {}
    for key, taming_key in to_taming.items():
        tensor = state[taming_key]
        if _ATTENTION_WEIGHT.search(key) and tensor.ndim == 4:
            tensor = tensor[:, :, 0, 0]  # 1x1 convolution -> linear
        converted[key] = tensor
    return converted


def diffusers_to_taming(
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    prefix: str = '',
) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``VQModel`` state dict to taming's VQGAN keys (what ``VQModel.init_from_ckpt`` loads).

    Args:
        state: ``VQModel.state_dict()``.
        config: its config.
        prefix: prepended to every key, e.g. ``first_stage_model.``. Default: ``''``.

    Raises:
        KeyMismatchError: ``state`` has missing or unexpected keys for ``config``.
    """
    to_taming = taming_key_map(config)
    _check_keys('diffusers state dict does not match its config', set(to_taming), set(state))
    return {
        prefix + to_taming[key]: (tensor[:, :, None, None] if _ATTENTION_WEIGHT.search(key) else tensor).contiguous()
        for key, tensor in state.items()
    }
