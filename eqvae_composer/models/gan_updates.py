"""The reference's alternating GAN updates, with Composer's single optimizer.

Lightning 1.4 runs the reference's ``training_step`` once per optimizer for every batch
(``pytorch_lightning/loops/batch/training_batch_loop.py:140-148`` at 1.4.2): the autoencoder's pass
(``optimizer_idx`` 0) with its own forward and optimizer step, then the discriminator's pass
(``optimizer_idx`` 1), whose forward draws its own branch, transform and posterior noise from the
autoencoder just updated. Composer takes one optimizer and runs a batch's microbatches (forward,
loss, backward, all events) inside the closure it passes to ``optimizer.step``. ``AlternatingGANUpdates``
calls that closure once per pass: everything still runs through the model's own forward (FSDP-safe),
and ``EquivarianceAlgorithm`` draws afresh for the second pass (the model's ``draw_pass`` is 1 under
``gan_phase('discriminator')``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ['AlternatingAdam', 'AlternatingGANUpdates']


class AlternatingGANUpdates:
    """Optimizer mixin: each ``step(closure)`` is the autoencoder's pass and update, then the discriminator's.

    ``step(closure)`` runs the closure under ``model.gan_phase('autoencoder')`` (the loss gives the
    autoencoder's gradients only), steps the autoencoder's parameters, runs the closure again under
    ``gan_phase('discriminator')`` (a fresh reconstruction without autograd, the hinge loss only)
    and steps the discriminator's parameters. Each step updates only its side: gradients of the
    other side's parameters are dropped first (``grad = None``, which the optimizer skips), as
    Lightning's optimizer toggling leaves them out. Adam's per-parameter step counts therefore count
    once per batch on each side, as with the reference's two optimizers.

    Per pass, Composer zeroes the gradients, runs every microbatch and fires ``AFTER_TRAIN_BATCH``,
    so ``GradientClipping`` clips each side's gradients on their own (Lightning clips per optimizer)
    and the loss dict sums over the two passes (each logs 0 for the other's terms). Without a
    discriminator, or without a closure (PyTorch's optimizer-state initialisation calls
    ``step(closure=None)``), it is the plain optimizer step.

    Under DDP give the Trainer ``ddp_sync_strategy='forced_sync'``: each pass leaves the other side's
    parameters without gradients, which DDP's bucketed reduction does not allow; Composer's forced
    sync all-reduces every gradient there is after the last microbatch. FSDP2 needs nothing extra.

    Args:
        *args: the optimizer's arguments (e.g. ``model.param_groups(...)``).
        model (ComposerAutoencoderKL): the model whose ``gan_phase`` and discriminator the passes use.
        **kwargs: the optimizer's keyword arguments.
    """

    def __init__(self, *args: Any, model: Any, **kwargs: Any) -> None:
        if not hasattr(model, 'gan_phase') or not hasattr(model, 'loss_fn'):
            raise TypeError(f'AlternatingGANUpdates needs a ComposerAutoencoderKL, got {type(model).__name__}.')
        super().__init__(*args, **kwargs)
        self._model = model

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        discriminator = self._model.loss_fn.discriminator
        if closure is None or discriminator is None:
            return super().step(closure)  # type: ignore[misc]
        # Read at every step: FSDP replaces the parameters (and the optimizer's references) when it shards.
        disc_ids = {id(p) for p in discriminator.parameters()}
        with self._model.gan_phase('autoencoder'), torch.enable_grad():
            loss = closure()
        self._step_side(lambda p: id(p) not in disc_ids)
        with self._model.gan_phase('discriminator'), torch.enable_grad():
            try:
                closure()
            except RuntimeError as error:
                if 'finished reduction in the prior iteration' in str(error):  # DDP's bucketed all-reduce
                    raise RuntimeError(
                        'AlternatingGANUpdates under DDP needs Trainer(..., ddp_sync_strategy="forced_sync"): each '
                        "pass leaves the other side's parameters without gradients.",
                    ) from error
                raise
        self._step_side(lambda p: id(p) in disc_ids)
        return loss

    def _step_side(self, on_side: Callable[[torch.Tensor], bool]) -> None:
        for group in self.param_groups:  # type: ignore[attr-defined]
            for param in group['params']:
                if not on_side(param):
                    param.grad = None
        super().step()  # type: ignore[misc]


class AlternatingAdam(AlternatingGANUpdates, torch.optim.Adam):
    """``torch.optim.Adam`` with the reference's alternating updates (see ``AlternatingGANUpdates``).

    Example::

        optimizer = AlternatingAdam(model.param_groups(lr=7.2e-4, betas=(0.5, 0.9)), model=model)
    """
