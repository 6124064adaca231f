"""Resumable outputs written as numbered parts: the bookkeeping ``convert_dataset.py`` and the latent encoder share.

An output folder holds ``part_00000/``, ``part_00001/``, ... (one MDS dataset each), a state folder
with ``plan.json`` (what is being written: inputs and every option that changes bytes) and one
finish marker ``part_NNNNN.json`` per finished part, and final files (the merged ``index.json``,
reports) written once every part is done. A re-run with the same plan keeps the finished parts and
redoes the others; a different plan is refused unless the caller overwrites.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from typing import Any

__all__ = ['OutputExistsError', 'check_plan', 'finished_parts', 'part_name', 'prepare_output', 'write_json_atomic']


class OutputExistsError(FileExistsError):
    """The output folder holds something this run cannot safely resume or extend."""


def part_name(index: int) -> str:
    """The folder (and, with ``.json``, the finish marker) of part ``index``."""
    return f'part_{index:05d}'


def write_json_atomic(path: str, obj: Any) -> None:
    """Write ``obj`` as JSON so that a reader (or a resumed run) never sees half a file."""
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def check_plan(out: str, previous: dict[str, Any] | None, plan: dict[str, Any]) -> None:
    """Refuse a non-empty output unless it is an earlier run of the same ``plan`` (``previous``).

    Raises:
        OutputExistsError: ``previous`` is not ``plan``.
    """
    if previous != plan:
        what = 'an output of other inputs or with other options' if previous else 'files not written by it'
        raise OutputExistsError(
            f'{out} is not empty: it holds {what}. Pass --overwrite to delete it and start from '
            f'scratch, or choose another --out.'
        )


def finished_parts(state_names: Iterable[str]) -> set[int]:
    """Part indices with a finish marker, from the names in the state folder."""
    markers = (name.removesuffix('.json') for name in state_names if name.endswith('.json'))
    return {index for index in map(_part_index, markers) if index is not None}


def _part_index(name: str) -> int | None:
    """``7`` for ``part_00007``; ``None`` for any other name (a stray file, say)."""
    digits = name[len('part_') :]
    return int(digits) if name.startswith('part_') and digits.isdigit() else None


def prepare_output(
    local: str, plan: dict[str, Any], overwrite: bool, *, state_dir: str, final_files: Iterable[str]
) -> set[int]:
    """Make ``local`` ready to write into; return the parts a previous run of the same plan finished.

    Args:
        local: The output folder.
        plan: What this run writes (compared with the stored ``plan.json``).
        overwrite: Delete an existing output first.
        state_dir: Name of the state folder inside ``local``.
        final_files: Names written once all parts are done; removed here, since they are rebuilt.

    Raises:
        OutputExistsError: ``local`` holds other files, or an output of other inputs/options.
    """
    if overwrite and os.path.exists(local):
        shutil.rmtree(local)
    state = os.path.join(local, state_dir)
    plan_path = os.path.join(state, 'plan.json')
    if os.path.isdir(local) and os.listdir(local):
        previous = None
        if os.path.isfile(plan_path):
            with open(plan_path) as f:
                previous = json.load(f)
        check_plan(local, previous, plan)
        done = finished_parts(os.listdir(state))
        # The index is written last and marks a complete output; it is rebuilt once all parts are done.
        for name in final_files:
            if os.path.exists(os.path.join(local, name)):
                os.remove(os.path.join(local, name))
        for name in os.listdir(local):
            # Parts without a finish marker were interrupted mid-write: redo them from scratch.
            index = _part_index(name)
            if index is not None and index not in done:
                shutil.rmtree(os.path.join(local, name))
        return done
    os.makedirs(state, exist_ok=True)
    write_json_atomic(plan_path, plan)
    return set()
