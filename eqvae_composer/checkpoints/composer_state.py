"""The autoencoder inside this project's Composer checkpoints and Trainers: its weights (EMA or raw) and config.

Where things are in a Composer checkpoint (``torch.load(path)['state']``):

* ``state['model']``: ``ComposerAutoencoderKL.state_dict()`` (or ``ComposerVQModel``'s); the VAE is
  under ``autoencoder.vae.`` (the discriminator under ``loss_fn.discriminator.`` is not exported).
* ``state['algorithms']``: ``[(name, state_dict), ...]``; Composer's ``EMA`` stores
  ``ema_model = {named_parameters_dict, named_buffers_dict}`` and ``ema_weights_active``. EMA swaps
  its averages *into* the model before every checkpoint, so with ``ema_weights_active`` the model
  holds the EMA weights and ``ema_model`` the raw ones; otherwise the other way round. Before
  ``ema_start`` (``ema_started`` false) ``ema_model`` is a copy of the initial weights, not an average.
  Under FSDP2 the copies are DTensors, which Composer pickles whole, from rank 0 (rank 0's shard only:
  see ``sharded.py``). This project's ``EMA`` (``eqvae_composer.ema``) therefore leaves
  ``ema_model`` out of its state there and saves the copies under ``state['callbacks']['EMACopy']``
  (``EMA_COPY_CALLBACK``), the same two dicts, every rank's shard of them.
* ``state['callbacks'][name]``: callbacks' ``state_dict()``; ``AutoencoderConfigRecorder`` stores the
  VAE's diffusers config there, with its ``_class_name`` as in ``config.json``, so a checkpoint
  carries its own architecture.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from composer import Callback, State
from composer.algorithms import EMA
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from eqvae_composer.introspection import unwrap_model
from eqvae_composer.padding import apply_recorded_padding_mode, resume_padding_mode, tolerate_padding_key

__all__ = [
    'EMA_COPY_CALLBACK',
    'VAE_PREFIX',
    'AutoencoderConfigRecorder',
    'composer_vae_state',
    'full_vae',
    'is_composer_checkpoint',
    'recorded_vae_config',
    'trained_autoencoder',
]

#: Where ``ComposerAutoencoderKL`` keeps the diffusers VAE in its state dict.
VAE_PREFIX = 'autoencoder.vae.'
#: The callback (its class name) under whose state this project's ``EMA`` saves its copy of FSDP2-sharded weights.
EMA_COPY_CALLBACK = 'EMACopy'
# Name components that wrappers insert into parameter names: FSDP1 and activation checkpointing wrap
# submodules anywhere in the tree, torch.compile (`_orig_mod`) the model or any submodule. DDP's `module`
# wraps only the outermost model, and `module` may be a real submodule's name: only leading ones are DDP's.
_WRAPPER_COMPONENTS = frozenset({'_fsdp_wrapped_module', '_checkpoint_wrapped_module', '_orig_mod'})
_DDP_COMPONENT = 'module'


class AutoencoderConfigRecorder(Callback):
    """Stores the VAE's diffusers config in every Composer checkpoint (under ``state['callbacks']``).

    Add it to the Trainer's callbacks; ``load_autoencoder`` and ``scripts/export.py`` then need no
    config beside the checkpoint. The config is read from the model at ``state_dict()`` time, so it
    is always the one actually trained. A resumed run gets the padding mode the checkpoint recorded
    (``resume_padding_mode``), before its first step.
    """

    def __init__(self) -> None:
        self._config: dict[str, Any] | None = None
        self._resumed: dict[str, Any] | None = None

    def fit_start(self, state: State, logger: Any) -> None:
        vae = getattr(unwrap_model(state.model), 'vae', None)
        if vae is not None and self._resumed is not None:
            resume_padding_mode(vae, self._resumed)
        self._config = None if vae is None else {**vae.config, '_class_name': type(vae).__name__}

    def state_dict(self) -> dict[str, Any]:
        return {} if self._config is None else {'vae_config': self._config}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._config = state.get('vae_config', self._config)
        self._resumed = state.get('vae_config')


def _clean_name(name: str) -> str:
    parts = [part for part in name.split('.') if part not in _WRAPPER_COMPONENTS]
    while parts and parts[0] == _DDP_COMPONENT:
        parts.pop(0)
    return '.'.join(parts)


def _vae_part(named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    cleaned = {_clean_name(k): v for k, v in named.items()}
    return {k[len(VAE_PREFIX) :]: v for k, v in cleaned.items() if k.startswith(VAE_PREFIX)}


def is_composer_checkpoint(obj: Any) -> bool:
    """Whether ``obj`` (a loaded file) is a Composer checkpoint holding this project's autoencoder."""
    model = obj.get('state', {}).get('model') if isinstance(obj, Mapping) else None
    return isinstance(model, Mapping) and any(_clean_name(k).startswith(VAE_PREFIX) for k in model)


def _ema_state(algorithms: Any, callbacks: Mapping[str, Any] | None = None) -> Mapping[str, Any] | None:
    for name, algorithm_state in algorithms or ():
        if name != EMA.__name__:
            continue
        copy = algorithm_state.get('ema_model') or (callbacks or {}).get(EMA_COPY_CALLBACK)
        # Before `ema_start`, EMA holds a copy of the initial weights, not an average: no EMA weights yet.
        if copy and algorithm_state.get('ema_started', True):
            return {**algorithm_state, 'ema_model': copy}
    return None


def composer_vae_state(checkpoint: Mapping[str, Any], ema: bool = True) -> tuple[dict[str, torch.Tensor], str]:
    """The diffusers-named VAE tensors of a Composer checkpoint, and which weights they are.

    Args:
        checkpoint: ``torch.load`` of a Composer checkpoint file.
        ema: the EMA weights when the run used Composer's ``EMA``; ``False`` gives the raw
            (training) weights. Without EMA both give the raw weights. Default: ``True``.

    Returns:
        ``(state_dict, 'EMA' | 'raw')``.
    """
    state = checkpoint['state']
    return _select(state['model'], _ema_state(state.get('algorithms'), state.get('callbacks')), ema)


def _select(
    model_state: Mapping[str, torch.Tensor],
    ema_state: Mapping[str, Any] | None,
    ema: bool,
) -> tuple[dict[str, torch.Tensor], str]:
    vae_state = _vae_part(model_state)
    if ema_state is None:
        return vae_state, 'raw'
    model_holds_ema = bool(ema_state.get('ema_weights_active'))
    if ema == model_holds_ema:
        return vae_state, 'EMA' if ema else 'raw'
    stored = ema_state['ema_model']
    # EMA averages trainable parameters and copies buffers; anything it lacks is the model's.
    other = {**_vae_part(stored['named_buffers_dict']), **_vae_part(stored['named_parameters_dict'])}
    return {**vae_state, **other}, 'EMA' if ema else 'raw'


def recorded_vae_config(checkpoint: Mapping[str, Any]) -> dict[str, Any] | None:
    """The VAE config ``AutoencoderConfigRecorder`` stored in a Composer checkpoint, if any.

    Args:
        checkpoint: ``torch.load`` of a Composer checkpoint file.
    """
    recorded = checkpoint['state'].get('callbacks', {}).get(AutoencoderConfigRecorder.__name__, {})
    return recorded.get('vae_config')


def _standalone(live: torch.nn.Module, vae_state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """A new autoencoder of ``live``'s class and config holding ``vae_state``."""
    with tolerate_padding_key():
        vae = apply_recorded_padding_mode(type(live).from_config(dict(live.config)))
    # EMA's copies of FSDP2-sharded parameters are DTensors: gathered (a collective, in the same order on every rank).
    full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in vae_state.items()}
    vae.load_state_dict({k: v.detach().to('cpu', copy=True) for k, v in full.items()}, strict=True)
    return vae


def _full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Full (unsharded) tensors on every rank: a VAE is small, and every rank can then build it.
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def full_vae(model: torch.nn.Module) -> torch.nn.Module:
    """A standalone, full-weight copy of the VAE of a (possibly FSDP/DDP-wrapped) ``ComposerAutoencoderKL`` (or VQ).

    Collective under FSDP (parameters are gathered): call it on every rank.

    Args:
        model: ``trainer.state.model``.
    """
    return _standalone(unwrap_model(model).vae, _vae_part(_full_model_state(model)))


def _saved_ema_state(algorithm: EMA) -> dict[str, Any]:
    """``algorithm.state_dict()`` as Composer's ``EMA`` writes it, copy included (this project's ``EMA`` leaves
    the copy of FSDP2-sharded weights to a callback)."""
    copy = algorithm.ema_model
    return {
        'ema_model': {
            'named_parameters_dict': copy.named_parameters_dict,
            'named_buffers_dict': copy.named_buffers_dict,
        },
        'ema_weights_active': algorithm.ema_weights_active,
        'ema_started': algorithm.ema_started,
    }


def trained_autoencoder(state: State, ema: bool = True) -> tuple[torch.nn.Module, str]:
    """Like ``full_vae(state.model)``, with the EMA weights when the Trainer runs Composer's ``EMA``.

    Collective under FSDP: call it on every rank.

    Args:
        state: ``trainer.state``.
        ema: the EMA weights when an ``EMA`` algorithm is present; ``False``: the raw training
            weights. Default: ``True``.

    Returns:
        ``(vae, 'EMA' | 'raw')``.
    """
    # As Composer lists them in a checkpoint, so that a run's EMA reads the same in and out of one.
    emas = [a for a in state.algorithms if isinstance(a, EMA) and a.ema_model is not None]
    algorithms = [(EMA.__name__, _saved_ema_state(a)) for a in emas]
    vae_state, which = _select(_full_model_state(state.model), _ema_state(algorithms), ema)
    return _standalone(unwrap_model(state.model).vae, vae_state), which
