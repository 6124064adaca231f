"""Composer's ``EMA``, with its copy of the weights checkpointed from every rank under FSDP2.

Composer's ``EMA`` keeps, beside the model, a copy of each trainable parameter and buffer: the averages,
or the raw weights while the averages are swapped into the model (as they are at every checkpoint).
Under FSDP2 the copies are DTensors, each rank holding its own shard. Composer 0.32 saves algorithms'
state as ``[(name, state_dict), ...]`` (``State.state_dict``), a list of tuples that
``torch.distributed.checkpoint`` stores as one pickled object, written by rank 0; a full checkpoint is
rank 0's ``torch.save``. Either way every rank resumes with rank 0's shard: a shape error in the first
batch where shards are uneven, silently wrong weights where they are even.

``EMA`` here moves the copy into the state of a callback, ``EMACopy``: Composer saves callbacks' state
as a dict, which ``torch.distributed.checkpoint`` walks, so a sharded checkpoint stores each copy as
every rank's shard and loads each rank's shard back in place. For a full checkpoint the copy is gathered
to full tensors (as the model's weights are) and each rank takes its own shard back on load. Without
DTensors (one process, DDP) nothing changes: the copy stays in the algorithm's state, as Composer's.

The class keeps the name ``EMA``: Composer files an algorithm's state under its class name, so
checkpoints of Composer's ``EMA`` reach this one's ``load_state_dict``, and export reads both alike.

It lives outside ``algorithms/`` because both sides use it: the autoencoder's training (re-exported as
``eqvae_composer.algorithms.EMA``) and the diffusion probe, which imports no autoencoder code. So it
imports nothing of this project.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from composer.algorithms import EMA as ComposerEMA
from composer.algorithms.ema.ema import EMAParameters
from composer.core import Callback, Event, State
from composer.loggers import Logger
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

__all__ = ['EMA', 'EMACopy', 'UnresumableEMACheckpointError', 'explain_unresumable_ema_checkpoint']

# The two dicts of EMA's copy (``EMAParameters``), named as in Composer's checkpoints.
_COPY_KINDS = ('named_parameters_dict', 'named_buffers_dict')


class UnresumableEMACheckpointError(ValueError):
    """An FSDP checkpoint saved by Composer's own ``EMA``: it holds rank 0's shard of EMA's copy only."""


def _pre_fix_checkpoint(checkpoint: str | None = None) -> str:
    path = checkpoint or '<checkpoint>'
    return (
        f'{checkpoint or "The checkpoint"} cannot be resumed with algorithms.ema under FSDP: it was saved by '
        "Composer's own EMA (before eqvae_composer.algorithms.EMA), which keeps rank 0's shard of EMA's copy of the "
        'weights only (or, if sharded, by a run without EMA). Its model weights are complete (with EMA: the EMA '
        f'weights): export them (python scripts/export.py --checkpoint {path} --out <folder>) and start a new run '
        'from them (model.vae.pretrained=<folder>) in another save_folder or under another run_name.'
    )


def _copies(store: EMAParameters) -> Iterator[torch.Tensor]:
    for kind in _COPY_KINDS:
        yield from getattr(store, kind).values()


def _holds_shards(store: EMAParameters | None) -> bool:
    return store is not None and any(isinstance(t, DTensor) for t in _copies(store))


def _is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def _reshard(model: torch.nn.Module) -> None:
    """Put back FSDP2's shards where a forward left full parameters.

    FSDP2 keeps the root module's parameters gathered after its forward until the backward; a forward without
    one (an evaluation, a callback that samples) leaves them as plain tensors, into which the copy's shards
    cannot be swapped ("got mixed torch.Tensor and DTensor"). ``reshard`` does nothing where they are sharded.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _gathered(tensor: torch.Tensor) -> torch.Tensor:
    # On the CPU, as Composer offloads the model's full state dict.
    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()


@torch.no_grad()
def _restore(target: torch.Tensor, saved: torch.Tensor) -> None:
    """Copy ``saved`` (this rank's shard, or the full tensor) into ``target`` (this rank's copy)."""
    if saved is target:  # a sharded checkpoint was loaded in place
        return
    if isinstance(target, DTensor) and not isinstance(saved, DTensor):
        # No communication: every rank holds the full tensor and cuts out its own shard.
        saved = distribute_tensor(
            saved.to(target.device), target.device_mesh, target.placements, src_data_rank=None
        ).to_local()
        target = target.to_local()
    target.copy_(saved)


class EMACopy(Callback):
    """Saves and restores an ``EMA``'s copy of the weights as part of the callbacks' state (see the module doc).

    ``EMA`` adds it to the Trainer's callbacks at ``INIT``; it holds nothing of its own.

    Args:
        ema: the algorithm whose copy this saves.
        state: the Trainer's state, read for the checkpoint kind (sharded or full).
    """

    def __init__(self, ema: EMA, state: State) -> None:
        self._ema = ema
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        store = self._ema.ema_model
        if not _holds_shards(store):
            return {}  # the copy is in the algorithm's state, as Composer saves it
        # Sharded checkpoints store each rank's shard of a DTensor; full ones need the whole tensor (a collective:
        # Composer builds the state dict on every rank, the same order everywhere).
        full = not self._state.fsdp_sharded_state_dict_enabled
        return {
            kind: {name: _gathered(t) if full else t for name, t in getattr(store, kind).items()}
            for kind in _COPY_KINDS
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        store = self._ema.ema_model
        if not state or store is None:
            return
        for kind in _COPY_KINDS:
            targets = getattr(store, kind)
            if targets.keys() != state[kind].keys():
                raise ValueError(
                    f'the checkpoint holds EMA copies of other {kind.split("_")[1]} than this model: '
                    f'{sorted(targets.keys() ^ state[kind].keys())[:5]}.'
                )
            for name, saved in state[kind].items():
                _restore(targets[name], saved)


class EMA(ComposerEMA):
    """Composer's ``EMA`` (same arguments), whose copy of the weights survives FSDP2 checkpoints on every rank.

    Args:
        half_life: see ``composer.algorithms.EMA``. Default: ``'1000ba'``.
        smoothing: see ``composer.algorithms.EMA``. Default: ``None``.
        ema_start: see ``composer.algorithms.EMA``. Default: ``'0.0dur'``.
        update_interval: see ``composer.algorithms.EMA``. Default: ``None``.
    """

    def match(self, event: Event, state: State) -> bool:
        return event == Event.BEFORE_LOAD or super().match(event, state)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT and not any(isinstance(c, EMACopy) for c in state.callbacks):
            state.callbacks.append(EMACopy(self, state))
        if event == Event.BEFORE_LOAD:
            # The copy made at INIT is of the unwrapped model; a sharded checkpoint loads into each rank's shard,
            # so the copy must have the shards' shapes before Composer loads one.
            if _is_sharded(state.model):
                self.ema_model = EMAParameters(state.model)
            return
        if event != Event.INIT:
            _reshard(state.model)
        super().apply(event, state, logger)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if _holds_shards(self.ema_model):
            del state['ema_model']  # EMACopy saves it
        return state

    def load_state_dict(self, state: dict[str, Any], strict: bool = False) -> None:
        copy = state.get('ema_model')
        if copy is None:  # saved by EMACopy, which loads it after the algorithms: keep the shards it loads into
            state = {k: v for k, v in state.items() if k in self.serialized_attributes}
            for name, value in state.items():
                setattr(self, name, value)
            return
        if any(isinstance(t, DTensor) for kind in _COPY_KINDS for t in copy.get(kind, {}).values()):
            raise UnresumableEMACheckpointError(_pre_fix_checkpoint())
        super().load_state_dict(state, strict)


@contextlib.contextmanager
def explain_unresumable_ema_checkpoint(checkpoint: str) -> Iterator[None]:
    """Turns a failed load of a checkpoint saved by Composer's own ``EMA`` under FSDP into one clear error.

    Wrap the ``Trainer`` construction that loads ``checkpoint``: a full checkpoint stops in
    ``EMA.load_state_dict``; a sharded one earlier, in ``torch.distributed.checkpoint``, which finds no
    ``EMACopy`` entries to load into the shards (nor does it in a sharded checkpoint of a run without EMA).

    Args:
        checkpoint: the checkpoint the Trainer loads, for the message.

    Raises:
        UnresumableEMACheckpointError: naming ``checkpoint`` and what to do instead.
    """
    try:
        yield
    except UnresumableEMACheckpointError:
        raise UnresumableEMACheckpointError(_pre_fix_checkpoint(checkpoint)) from None
    except CheckpointException as error:
        if f'Missing key in checkpoint state_dict: state.callbacks.{EMACopy.__name__}.' not in str(error):
            raise
        raise UnresumableEMACheckpointError(_pre_fix_checkpoint(checkpoint)) from None
