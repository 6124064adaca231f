"""Names for the YAML's ``callbacks`` and ``loggers`` sections: every Composer built-in, plus ours.

The names come from Composer's own public lists (``composer.callbacks.__all__``,
``composer.loggers.__all__``) and the module each class lives in (``lr_monitor``,
``optimizer_monitor``, ``early_stopper``; ``mlflow``, ``tensorboard``, ``wandb`` with the ``_logger``
suffix dropped), so a callback or logger that a Composer release adds is available by its name
without a hand-kept copy of the list.
"""

from __future__ import annotations

import inspect
from types import ModuleType

import composer.callbacks
import composer.loggers
from composer.core import Callback
from composer.loggers import LoggerDestination

from eqvae_composer.callbacks import ImageGridCallback

__all__ = ['CALLBACKS', 'LOGGERS', 'composer_classes']


def composer_classes(package: ModuleType, base: type, suffix: str = '') -> dict[str, type]:
    """``{module name without suffix: class}`` for each public concrete subclass of ``base`` in ``package``."""
    classes = {}
    for name in package.__all__:
        obj = getattr(package, name)
        if inspect.isclass(obj) and issubclass(obj, base) and obj is not base:
            module = obj.__module__.rsplit('.', 1)[-1]
            classes[module.removesuffix(suffix)] = obj
    return classes


CALLBACKS: dict[str, type[Callback]] = {
    **composer_classes(composer.callbacks, Callback),
    'image_grid': ImageGridCallback,
}
LOGGERS: dict[str, type[LoggerDestination]] = composer_classes(composer.loggers, LoggerDestination, '_logger')
