"""Names for the YAML's ``callbacks``, ``loggers`` and ``schedulers`` sections: every Composer built-in, plus ours.

The names come from Composer's own public lists (``composer.callbacks.__all__``,
``composer.loggers.__all__``, ``composer.optim.__all__``) and the module each class lives in
(``lr_monitor``, ``optimizer_monitor``, ``early_stopper``; ``mlflow``, ``tensorboard``, ``wandb`` with
the ``_logger`` suffix dropped) or, for schedulers, which share one module, the class name in snake
case without ``Scheduler`` (``cosine_annealing``, ``linear_with_warmup``), so a callback, logger or
scheduler that a Composer release adds is available by its name without a hand-kept copy of the list.
"""

from __future__ import annotations

import inspect
import re
from types import ModuleType

import composer.callbacks
import composer.loggers
import composer.optim
from composer.core import Callback
from composer.loggers import LoggerDestination
from composer.optim import ComposerScheduler

from eqvae_composer.callbacks import ImageGridCallback

__all__ = ['CALLBACKS', 'LOGGERS', 'SCHEDULERS', 'composer_classes']


def composer_classes(package: ModuleType, base: type, suffix: str = '', by_class_name: bool = False) -> dict[str, type]:
    """``{name: class}`` for each public concrete subclass of ``base`` in ``package``.

    The name is the class's module name, or (``by_class_name``) its class name in snake case, without
    ``suffix`` either way.
    """
    classes = {}
    for name in package.__all__:
        obj = getattr(package, name)
        if inspect.isclass(obj) and issubclass(obj, base) and obj is not base:
            key = re.sub(r'(?<!^)(?=[A-Z])', '_', obj.__name__).lower() if by_class_name else obj.__module__
            classes[key.rsplit('.', 1)[-1].removesuffix(suffix)] = obj
    return classes


CALLBACKS: dict[str, type[Callback]] = {
    **composer_classes(composer.callbacks, Callback),
    'image_grid': ImageGridCallback,
}
LOGGERS: dict[str, type[LoggerDestination]] = composer_classes(composer.loggers, LoggerDestination, '_logger')
SCHEDULERS: dict[str, type[ComposerScheduler]] = composer_classes(
    composer.optim, ComposerScheduler, '_scheduler', by_class_name=True
)
