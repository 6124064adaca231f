"""``ResumableCheckpointSaver``: Composer's ``CheckpointSaver`` made crash-consistent for autoresume.

What Composer 0.32 does by itself (``composer/callbacks/checkpoint_saver.py``): rank 0 writes a
monolithic checkpoint *in place* under its final name (``ep0-ba8-rank0.pt``), then deletes and
recreates the ``latest-rank0.pt`` symlink that autoresume reads, then rotates old files. A run
killed during a save therefore leaves a truncated file under a real checkpoint name, and a run
killed between the delete and the re-create leaves no ``latest`` link at all. On restart Composer
refuses to start (``FileExistsError``: the orphan "may conflict with a future checkpoint") unless
``save_overwrite`` is set, and keep-N rotation only counts the files the current process wrote, so
every restart leaks the previous process's checkpoints.

This subclass changes only the local-file protocol, for monolithic checkpoints:

* the checkpoint is written as ``.partial-<name>`` and renamed (``os.replace``, atomic within a
  filesystem) once complete; the ``latest`` link is swapped atomically (new link, then
  ``os.replace``). A reader sees the previous checkpoint or the new one, never half of one.
* at ``fit_start``, leftover ``.partial-*`` files of this rank are deleted; with
  ``autoresume=True`` (the folder belongs to this run) checkpoints newer than the point the run
  resumed from are deleted too (a killed run's unpublished saves; the resumed run recomputes them
  exactly), and the older ones are adopted, so ``num_checkpoints_to_keep`` holds across restarts.

Uploads to a remote ``save_folder`` are Composer's, unchanged: the local file is copied and
uploaded under its final name (an object-store PUT is atomic), and the ``latest`` ``.symlink``
object is uploaded only after every rank's file exists remotely. FSDP sharded checkpoints
(directories written by ``torch.distributed.checkpoint``) keep Composer's protocol as is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from pathlib import PurePosixPath
from typing import Any

from composer import Trainer
from composer.callbacks import CheckpointSaver
from composer.core import Callback, State, Timestamp
from composer.loggers import Logger
from composer.utils import PartialFilePath, dist, format_name_with_dist, parse_uri, reproducibility

from eqvae_composer.compat import (
    SaveCheckpointHook,
    forget_loaded_rng_state,
    loaded_rng_state,
    rename_saved_checkpoint,
    save_checkpoint_unlinked,
)

__all__ = [
    'PARTIAL_PREFIX',
    'RestoreRNGMidEpoch',
    'ResumableCheckpointSaver',
    'checkpoint_saver',
    'list_checkpoints',
    'restore_rng_mid_epoch',
]

log = logging.getLogger(__name__)

#: Prefix of a checkpoint still being written.
PARTIAL_PREFIX = '.partial-'

_TIME_UNITS = ('epoch', 'batch', 'sample', 'token', 'batch_in_epoch', 'sample_in_epoch', 'token_in_epoch')


def list_checkpoints(folder: str, filename: str, run_name: str, prefix: str = '') -> list[tuple[str, dict[str, int]]]:
    """Files in ``folder`` named by the ``filename`` template for this rank, with their time fields.

    Args:
        folder: The local checkpoint folder.
        filename: A Composer checkpoint file-name template, e.g. ``'ep{epoch}-ba{batch}-rank{rank}.pt'``.
        run_name: The run's name, for a ``{run_name}`` placeholder.
        prefix: Match ``prefix + name`` instead (e.g. ``PARTIAL_PREFIX``). Default: ``''``.

    Returns:
        ``(path, {unit: value})`` for each match, sorted by batch (then epoch) when the template has them.
    """
    if not os.path.isdir(folder):
        return []
    pattern = re.escape(prefix)
    for part in re.split(r'(\{\w+\})', os.path.basename(filename)):
        if part.startswith('{') and part[1:-1] in _TIME_UNITS:
            pattern += f'(?P<{part[1:-1]}>\\d+)'
        elif part.startswith('{'):  # {rank}, {run_name}, ...: this process's values
            pattern += re.escape(format_name_with_dist(part, run_name))
        else:
            pattern += re.escape(part)
    template = re.compile(f'^{pattern}$')
    found = []
    for name in os.listdir(folder):
        match = template.match(name)
        if match is not None:
            found.append((os.path.join(folder, name), {k: int(v) for k, v in match.groupdict().items()}))
    return sorted(found, key=lambda item: (item[1].get('batch', 0), item[1].get('epoch', 0)))


class ResumableCheckpointSaver(SaveCheckpointHook, CheckpointSaver):
    """A ``CheckpointSaver`` whose local checkpoints are complete or absent, and whose keep-N survives restarts.

    Args:
        *args: ``CheckpointSaver`` arguments.
        autoresume (bool): the folder belongs to this run: at ``fit_start`` delete checkpoints
            newer than the resumed timestamp and count the older ones towards
            ``num_checkpoints_to_keep``. Default: ``False`` (Composer's behaviour: a later
            checkpoint in the folder is an error unless ``overwrite``).
        **kwargs: ``CheckpointSaver`` keyword arguments.
    """

    def __init__(self, *args: Any, autoresume: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.autoresume = autoresume

    def fit_start(self, state: State, logger: Logger) -> None:
        if not state.fsdp_sharded_state_dict_enabled:
            self._tidy_folder(format_name_with_dist(self.folder, state.run_name), state.run_name, state.timestamp)
        dist.barrier()  # every rank has tidied before any rank runs Composer's conflict check
        super().fit_start(state, logger)

    def _tidy_folder(self, folder: str, run_name: str, now: Timestamp) -> None:
        subfolder, template = os.path.split(self.filename.filename)
        if '{' in subfolder:  # a per-checkpoint folder template: nothing to list reliably
            return
        folder = os.path.join(folder, subfolder)
        for path, _ in list_checkpoints(folder, template, run_name, prefix=PARTIAL_PREFIX):
            log.warning('Removing %s, a checkpoint left half-written by a killed run.', path)
            os.remove(path)
        if not self.autoresume or '{batch}' not in template:
            return
        adopted = []
        for path, fields in list_checkpoints(folder, template, run_name):
            if fields['batch'] > int(now.batch):
                log.warning(
                    'Removing %s: newer than the checkpoint this run resumed from (batch %d); it will be recomputed.',
                    path,
                    int(now.batch),
                )
                os.remove(path)
            elif path not in self.saved_checkpoints:
                adopted.append(path)
        self.saved_checkpoints[:0] = adopted
        if adopted:
            log.info(
                'Counting %d existing checkpoint(s) towards num_checkpoints_to_keep=%d.',
                len(adopted),
                self.num_checkpoints_to_keep,
            )

    def save_checkpoint(self, state: State, logger: Logger) -> None:
        if state.fsdp_sharded_state_dict_enabled:
            super().save_checkpoint(state, logger)
            return
        final, latest, keep = self.filename, self.latest_filename, self.num_checkpoints_to_keep
        head, tail = os.path.split(final.filename)
        # Composer writes, uploads (a copy, under the final remote name) and records; the link and
        # the rotation are done below, after the rename.
        partial = PartialFilePath(os.path.join(head, PARTIAL_PREFIX + tail), final.folder)
        staged = save_checkpoint_unlinked(self, state, logger, partial)
        if staged is None:  # this rank writes no file (monolithic: rank > 0)
            return
        path = final.format(state)
        os.replace(staged, path)
        rename_saved_checkpoint(self, staged, path, state.timestamp)
        if latest is not None and keep != 0:
            link = latest.format(state)
            os.makedirs(os.path.dirname(link) or '.', exist_ok=True)
            staged_link = os.path.join(os.path.dirname(link), PARTIAL_PREFIX + os.path.basename(link))
            with contextlib.suppress(FileNotFoundError):
                os.remove(staged_link)
            os.symlink(os.path.relpath(path, os.path.dirname(link)), staged_link)
            os.replace(staged_link, link)
        if keep >= 0:
            while len(self.saved_checkpoints) > keep:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(self.saved_checkpoints.pop(0))


class RestoreRNGMidEpoch(Callback):
    """Restores the checkpoint's RNG state at the first batch of a run resumed mid-epoch.

    Composer 0.32 restores the checkpointed RNG only at an epoch boundary or while spinning a
    dataloader forward; a dataset that resumes itself (``StreamingDataset``) skips both paths, so a
    run resumed mid-epoch would continue with the RNG as freshly seeded: different posterior
    samples, and different weights than the uninterrupted run. The checkpoint's RNG was captured
    after the last batch (and its evaluation); the next use is the next batch's forward, so it is
    restored at ``BATCH_START``, after the dataloader iterator (which draws a seed) is created.

    Args:
        rng_state (list[dict]): ``reproducibility.get_rng_state()`` as saved in the checkpoint (one per rank).
    """

    def __init__(self, rng_state: list[dict[str, Any]]) -> None:
        self.rng_state: list[dict[str, Any]] | None = rng_state

    def batch_start(self, state: State, logger: Logger) -> None:
        if self.rng_state is not None:
            reproducibility.load_rng_state(self.rng_state)
            self.rng_state = None


def restore_rng_mid_epoch(trainer: Trainer) -> None:
    """Hand the loaded checkpoint's RNG to ``RestoreRNGMidEpoch`` when Composer would drop it (see there)."""
    rng_state = loaded_rng_state(trainer)
    timestamp, resumption = trainer.state.timestamp, trainer.state.dataset_resumption
    if rng_state is not None and int(timestamp.batch_in_epoch) > 0 and 'train' in resumption:
        trainer.state.callbacks.insert(0, RestoreRNGMidEpoch(rng_state))
        forget_loaded_rng_state(trainer)


def checkpoint_saver(
    save_folder: str | None,
    save_interval: str,
    num_checkpoints_to_keep: int,
    overwrite: bool,
    autoresume: bool,
) -> ResumableCheckpointSaver | None:
    """The Trainer's own ``CheckpointSaver`` arguments (composer 0.32 ``Trainer.__init__``), crash-consistent.

    None without a ``save_folder``. Rank-suffixed file names, as the Trainer's, so autoresume finds them.
    """
    if save_folder is None:
        return None
    filename, latest = 'ep{epoch}-ba{batch}-rank{rank}.pt', 'latest-rank{rank}.pt'
    _, _, path = parse_uri(save_folder)
    # As the Trainer: a bare bucket URI puts the files at the bucket's root.
    remote, remote_latest = (
        (filename, latest) if path == '' else (str(PurePosixPath(path) / filename), str(PurePosixPath(path) / latest))
    )
    return ResumableCheckpointSaver(
        folder=save_folder,
        filename=filename,
        remote_file_name=remote,
        latest_filename=latest,
        latest_remote_file_name=remote_latest,
        overwrite=overwrite,
        save_interval=save_interval,
        num_checkpoints_to_keep=num_checkpoints_to_keep,
        autoresume=autoresume,
    )
