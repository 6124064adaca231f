"""Keep ``ComposerAutoencoderKL.global_step`` equal to the Trainer's batch count (for ``disc_start``)."""

from __future__ import annotations

from composer.core import Callback, State
from composer.loggers import Logger
from composer.models import ComposerModel

from eqvae_composer.introspection import unwrap_model

__all__ = ['GlobalStepCallback']


class GlobalStepCallback(Callback):
    """Sets ``global_step`` on the model at every batch start; exact after resumption too.

    A ComposerModel cannot see the Trainer's timestamp, and counting calls inside the model would
    count microbatches rather than optimizer steps.
    """

    def batch_start(self, state: State, logger: Logger) -> None:
        model = unwrap_model(state.model)
        if isinstance(model, ComposerModel) and hasattr(model, 'global_step'):
            model.global_step = int(state.timestamp.batch)
