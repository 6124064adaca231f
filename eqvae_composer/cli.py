"""How the command-line entry points end on an error a person can fix: one line saying what to do, no traceback.

``train.py``, ``convert_dataset.py`` and ``scripts/*.py`` end with ``run_cli(main)``. The errors in
``USER_ERRORS`` carry a message that names the thing and the fix; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn

from eqvae_composer.checkpoints import AutoencoderLoadError
from eqvae_composer.data.dataset import EmptyDatasetError
from eqvae_composer.ema import UnresumableEMACheckpointError
from eqvae_composer.train import ConfigError
from eqvae_composer.weights import MissingWeightsError

__all__ = ['USER_ERRORS', 'USER_ERROR_STATUS', 'error_line', 'run_cli']

#: Errors whose message says what to change: a configuration key, a missing file or folder (weight
#: files, datasets, checkpoints: ``MissingWeightsError`` is a ``FileNotFoundError``), an unloadable autoencoder.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    AutoencoderLoadError,
    MissingWeightsError,
    FileNotFoundError,
    EmptyDatasetError,
    UnresumableEMACheckpointError,
)
#: Exit status of a run stopped by one of ``USER_ERRORS`` (as argparse's for a bad command line).
USER_ERROR_STATUS = 2


def error_line(error: BaseException | str) -> str:
    """``'error: <message>'`` on one line (line breaks inside the message become spaces)."""
    return 'error: ' + ' '.join(str(error).split())


def run_cli(main: Callable[[], int | None], extra_errors: tuple[type[Exception], ...] = ()) -> NoReturn:
    """Run an entry point's ``main()`` and exit with its status; a known error exits with one line on stderr.

    Args:
        main (Callable): the entry point; returns its exit status (``None`` means 0).
        extra_errors (tuple[type[Exception], ...]): more error types this entry point's messages
            explain well enough to stand alone. Default: none.
    """
    try:
        status = main()
    except (*USER_ERRORS, *extra_errors) as error:
        print(error_line(error), file=sys.stderr)
        sys.exit(USER_ERROR_STATUS)
    sys.exit(status or 0)
