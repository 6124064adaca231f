"""``NaNGuard``: stop (or skip the batch) when a loss term or a gradient is not finite."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

__all__ = ['NaNGuard', 'NonFiniteError']

log = logging.getLogger(__name__)

_ON_NONFINITE = ('raise', 'skip')


class NonFiniteError(RuntimeError):
    """A loss term or a gradient was NaN or infinite; the message names the step and what."""


def _local(tensor: torch.Tensor) -> torch.Tensor:
    # FSDP2 gradients are DTensors: each rank checks its own shard (the verdict is all-reduced).
    return tensor.to_local() if hasattr(tensor, 'to_local') else tensor


class NaNGuard(Callback):
    """Checks every loss term (``AFTER_LOSS``) and the accumulated gradients (``AFTER_TRAIN_BATCH``).

    ``AFTER_TRAIN_BATCH`` is the last event before the optimizer updates the weights (Composer runs
    the microbatches inside ``optimizer.step``'s closure), and callbacks run after algorithms, so
    the gradients checked are the ones the step would use, after ``GradientClipping``. The verdict
    is all-reduced, so every rank raises or skips together (a NaN on one rank under DDP reaches all
    ranks through the gradient all-reduce anyway; FSDP ranks each see only their shard).

    On a non-finite value:

    * ``on_nonfinite='raise'``: raise ``NonFiniteError`` naming the batch and the non-finite loss
      terms (the keys of the model's loss dict) and gradients; the run stops, the last checkpoint
      is intact, and autoresume restarts from it.
    * ``on_nonfinite='skip'``: drop the gradients (``grad = None``), so the optimizer leaves the
      weights *and* its moments untouched - an exact no-op, unlike zeroing the gradients, which
      would still decay Adam's moments. The batch still counts (timestamp, LR schedule, data
      position). Skipped batches are counted, logged as ``nan_guard/skipped_batches`` and
      checkpointed; more than ``max_skipped`` raises.

    Args:
        on_nonfinite (str): ``'raise'`` or ``'skip'``. Default: ``'raise'``.
        max_skipped (int): with ``'skip'``, the number of skipped batches tolerated over the whole
            run; one more raises. Default: ``10``.
        check_gradients (bool): also check the gradients (one reduction over them per step).
            Default: ``True``.
    """

    def __init__(self, on_nonfinite: str = 'raise', max_skipped: int = 10, check_gradients: bool = True) -> None:
        if on_nonfinite not in _ON_NONFINITE:
            raise ValueError(f'on_nonfinite must be one of {_ON_NONFINITE}, got {on_nonfinite!r}.')
        if int(max_skipped) < 0:
            raise ValueError(f'max_skipped must be >= 0, got {max_skipped!r}.')
        self.on_nonfinite = on_nonfinite
        self.max_skipped = int(max_skipped)
        self.check_gradients = bool(check_gradients)
        self.skipped_batches = 0
        self._bad_terms: list[str] = []

    def state_dict(self) -> dict[str, Any]:
        return {'skipped_batches': self.skipped_batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_batches = int(state.get('skipped_batches', 0))

    def before_train_batch(self, state: State, logger: Logger) -> None:
        self._bad_terms = []

    def after_loss(self, state: State, logger: Logger) -> None:
        terms = state.loss if isinstance(state.loss, Mapping) else {'loss': state.loss}
        names = [k for k, v in terms.items() if isinstance(v, torch.Tensor)]
        if not names:
            return
        finite = torch.stack([torch.isfinite(terms[k].detach()).all() for k in names])
        if not bool(finite.all()):  # one host sync per microbatch
            self._bad_terms += [k for k, ok in zip(names, finite.tolist()) if not ok and k not in self._bad_terms]

    def after_train_batch(self, state: State, logger: Logger) -> None:
        grads = [(n, p.grad) for n, p in state.model.named_parameters() if p.grad is not None]
        bad_grad = False
        if self.check_gradients and grads:
            bad_grad = not bool(torch.stack([torch.isfinite(_local(g)).all() for _, g in grads]).all())
        verdict = state.device.tensor_to_device(torch.tensor([float(bool(self._bad_terms) or bad_grad)]))
        if dist.get_world_size() > 1:
            dist.all_reduce(verdict, reduce_operation='MAX')
        if verdict.item() == 0:
            logger.log_metrics({'nan_guard/skipped_batches': float(self.skipped_batches)})
            return

        step = int(state.timestamp.batch)
        what = []
        if self._bad_terms:
            what.append(f'loss terms {self._bad_terms}')
        if bad_grad:
            names = [n for n, g in grads if not bool(torch.isfinite(_local(g)).all())]
            shown = ', '.join(names[:5]) + (f' and {len(names) - 5} more' if len(names) > 5 else '')
            what.append(f'gradients of {len(names)} parameter(s) ({shown})')
        if not what:
            what.append('values on another rank')
        where = (
            f'at batch {step} (0-based; epoch {int(state.timestamp.epoch)}, '
            f'batch {int(state.timestamp.batch_in_epoch)} of the epoch)'
        )
        message = f'non-finite {" and ".join(what)} {where}'

        if self.on_nonfinite == 'raise':
            raise NonFiniteError(
                f'{message}. Stopping (nan_guard.on_nonfinite=raise); the last checkpoint is intact. '
                'Set nan_guard.on_nonfinite=skip to skip such batches instead.',
            )
        self.skipped_batches += 1
        for _, param in state.model.named_parameters():
            param.grad = None  # Adam skips parameters without gradients: weights and moments unchanged
        logger.log_metrics({'nan_guard/skipped_batches': float(self.skipped_batches)})
        log.warning('NaNGuard: skipped the optimizer step for %s (%d skipped so far).', message, self.skipped_batches)
        if self.skipped_batches > self.max_skipped:
            raise NonFiniteError(
                f'{message}: {self.skipped_batches} batches skipped, more than nan_guard.max_skipped='
                f'{self.max_skipped}. Stopping.',
            )
