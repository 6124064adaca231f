"""LDM/CompVis (kl-f8 ``model.ckpt``) key names <-> diffusers ``AutoencoderKL`` key names, both ways.

LDM -> diffusers is diffusers' own ``convert_ldm_vae_checkpoint``. diffusers ships no inverse, so
the inverse is *derived* from that function rather than written by hand: every parameter name of
LDM's autoencoder module tree (``_ldm_module_names``; a superset, e.g. a shortcut conv in every
block) is given a tensor holding its own index, the forward conversion runs on that probe, and the
index that lands under each diffusers key names its LDM key. Names the forward conversion sends to
keys the model does not have (blocks without a shortcut, the last level's downsampler) drop out.

The one shape change: LDM's mid-block attention uses 1x1 convolutions where diffusers uses linear
layers (``conv_attn_to_linear``), and those linear weights are the only 2-D tensors of an
``AutoencoderKL``; the inverse gives them back their two trailing singleton dimensions.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import AutoencoderKL

from eqvae_composer.compat import LDM_VAE_PREFIXES, convert_ldm_vae_state_dict

__all__ = [
    'LDM_PREFIX',
    'KeyMismatchError',
    'diffusers_to_ldm',
    'format_keys',
    'is_diffusers_state_dict',
    'ldm_key_map',
    'ldm_to_diffusers',
]

#: The prefix of the autoencoder's keys inside a full LDM / Stable Diffusion checkpoint.
LDM_PREFIX = 'first_stage_model.'

# An LDM autoencoder's own training checkpoint also holds its loss (LPIPS + discriminator):
# not part of the autoencoder, so ignored rather than reported as unexpected.
_IGNORED_LDM_PREFIXES = ('loss.',)

_RESNET = ('norm1', 'conv1', 'norm2', 'conv2', 'nin_shortcut')
_ATTENTION = ('norm', 'q', 'k', 'v', 'proj_out')


class KeyMismatchError(RuntimeError):
    """A state dict does not match the autoencoder architecture; the message lists the keys."""


def _ldm_module_names(num_levels: int, layers_per_block: int) -> list[str]:
    """Parameter names of LDM's ``Encoder``/``Decoder`` (taming-transformers layout), a superset."""
    modules = ['quant_conv', 'post_quant_conv']
    for part in ('encoder', 'decoder'):
        modules += [f'{part}.{name}' for name in ('conv_in', 'norm_out', 'conv_out')]
        modules += [f'{part}.mid.block_{b}.{m}' for b in (1, 2) for m in _RESNET]
        modules += [f'{part}.mid.attn_1.{m}' for m in _ATTENTION]
    for level in range(num_levels):
        modules += [f'encoder.down.{level}.block.{j}.{m}' for j in range(layers_per_block) for m in _RESNET]
        modules.append(f'encoder.down.{level}.downsample.conv')
        # LDM's decoder has one more resnet per level than its encoder.
        modules += [f'decoder.up.{level}.block.{j}.{m}' for j in range(layers_per_block + 1) for m in _RESNET]
        modules.append(f'decoder.up.{level}.upsample.conv')
    return [f'{module}.{kind}' for module in modules for kind in ('weight', 'bias')]


@functools.lru_cache(maxsize=16)
def _key_map(config_json: str) -> dict[str, str]:
    config = json.loads(config_json)
    with torch.device('meta'):  # only the key names are needed: no memory, no initialisation
        model_keys = set(AutoencoderKL.from_config(config).state_dict())
    names = _ldm_module_names(len(config['block_out_channels']), config.get('layers_per_block', 2))
    probe = {name: torch.tensor([float(index)]) for index, name in enumerate(names)}
    converted = convert_ldm_vae_state_dict(probe, config)
    mapping = {key: names[int(value.item())] for key, value in converted.items() if key in model_keys}
    unmapped = sorted(model_keys - set(mapping))
    if unmapped or len(set(mapping.values())) != len(mapping):
        raise KeyMismatchError(
            f'diffusers cannot express this AutoencoderKL in LDM key names; unmapped diffusers keys: {unmapped}.',
        )
    return mapping


def ldm_key_map(config: Mapping[str, Any]) -> dict[str, str]:
    """Diffusers key -> LDM key for every tensor of an ``AutoencoderKL`` with this config.

    Args:
        config: the diffusers config of the architecture.

    Raises:
        KeyMismatchError: the architecture has tensors the LDM layout cannot name.
    """
    return dict(_key_map(json.dumps(dict(config), sort_keys=True, default=str)))


def is_diffusers_state_dict(state: Mapping[str, Any]) -> bool:
    """Whether ``state`` uses diffusers names (a bare ``AutoencoderKL.state_dict()``) rather than LDM ones."""
    return any(key.startswith(('encoder.down_blocks.', 'decoder.up_blocks.', 'encoder.mid_block.')) for key in state)


def format_keys(keys: list[str], limit: int = 24) -> str:
    """``keys`` as a list, the first ``limit`` of them and a count of the rest (an SD-VAE has 248).

    Args:
        keys: sorted key names.
        limit: how many to show. Default: ``24``.
    """
    if len(keys) <= limit:
        return str(keys)
    return f'{keys[:limit]} and {len(keys) - limit} more'


def _mismatch_message(what: str, missing: list[str], unexpected: list[str]) -> str:
    return f'{what}: missing keys {format_keys(missing)}; unexpected keys {format_keys(unexpected)}.'


def ldm_to_diffusers(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Convert an LDM autoencoder state dict to diffusers names with ``convert_ldm_vae_checkpoint``.

    The keys are checked first, because the conversion itself silently drops what it does not
    know: with a ``first_stage_model.`` (or ``vae.``) prefix only those keys are read (the rest of
    a Stable Diffusion checkpoint is not the autoencoder); without one, every key except the
    LDM training loss's ``loss.*`` must be an autoencoder key.

    Args:
        state: LDM-named tensors, with or without a prefix.
        config: the diffusers config of the architecture.

    Raises:
        KeyMismatchError: missing or unexpected keys, listed in LDM names.
    """
    prefix = next((p for p in LDM_VAE_PREFIXES if any(k.startswith(p) for k in state)), '')
    vae_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not prefix:
        vae_state = {k: v for k, v in vae_state.items() if not k.startswith(_IGNORED_LDM_PREFIXES)}
    expected = set(ldm_key_map(config).values())
    missing, unexpected = sorted(expected - set(vae_state)), sorted(set(vae_state) - expected)
    if missing or unexpected:
        raise KeyMismatchError(_mismatch_message('LDM state dict does not match the architecture', missing, unexpected))
    return convert_ldm_vae_state_dict(vae_state, dict(config))


def diffusers_to_ldm(
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    prefix: str = '',
) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict to the kl-f8 checkpoint's LDM keys.

    Args:
        state: ``AutoencoderKL.state_dict()``.
        config: the diffusers config of the architecture.
        prefix: prepended to every key, e.g. ``LDM_PREFIX`` for a full-LDM layout. Default: ``''``.

    Raises:
        KeyMismatchError: ``state`` has missing or unexpected keys for ``config``.
    """
    mapping = ldm_key_map(config)
    missing, unexpected = sorted(set(mapping) - set(state)), sorted(set(state) - set(mapping))
    if missing or unexpected:
        raise KeyMismatchError(_mismatch_message('diffusers state dict does not match its config', missing, unexpected))
    # Linear attention weights go back to LDM's 1x1 convolutions.
    return {
        prefix + mapping[key]: (tensor[:, :, None, None] if tensor.ndim == 2 else tensor).contiguous()
        for key, tensor in state.items()
    }
