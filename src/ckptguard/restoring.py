"""Choosing which checkpoint to restore, and falling back past damaged ones.

``select_candidates`` orders the run's checkpoints newest first (or picks exactly one step);
``restore_first_valid`` tries them in turn: a checkpoint that fails verification is logged with
the file at fault, marked corrupt (STATUS.json) so it is never picked again, and the next older
one is tried. Only when checkpoints exist and every one fails does it raise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from ckptguard.catalog import BAD_STATUSES, CheckpointInfo, mark_status
from ckptguard.errors import CheckpointNotFoundError, CorruptCheckpointError
from ckptguard.reader import CheckpointReader
from ckptguard.safeload import load_verified, raise_if_newer_format
from ckptguard.state import TrainState
from ckptguard.storage import Storage

__all__ = ["restore_first_valid", "select_candidates"]

log = logging.getLogger(__name__)


def select_candidates(ckpts: Sequence[CheckpointInfo], step: int | None, url: str) -> list[CheckpointInfo]:
    """Newest first, skipping ones marked corrupt/failed; or exactly ``step`` (which must exist)."""
    if step is None:
        return [c for c in reversed(ckpts) if c.status not in BAD_STATUSES]
    chosen = [c for c in ckpts if c.step == step]
    if not chosen:
        have = ", ".join(str(c.step) for c in ckpts[-10:]) or "none"
        raise CheckpointNotFoundError(
            f"No checkpoint for step {step} in {url} (steps available: {have}). "
            "Run 'ckptguard ls' to list them."
        )
    return chosen


def restore_first_valid(
    storage: Storage,
    candidates: Sequence[CheckpointInfo],
    state: TrainState,
    *,
    verify: bool,
    strict: bool,
    restore: Callable[..., Any],
) -> tuple[CheckpointInfo, Any] | None:
    """Restore the first candidate that checks out; return it with its mismatch report."""
    failures: list[str] = []
    for c in candidates:
        if c.manifest is None:
            raise_if_newer_format(storage, c.name)
        if c.problems or c.manifest is None:
            failures.append(f"{c.path}: " + "; ".join(c.problems))
            log.warning("Skipping checkpoint %s: %s", c.path, "; ".join(c.problems))
            if c.status != "invalid" or c.manifest is not None:
                mark_status(storage, c.name, "corrupt", "; ".join(c.problems))
            continue
        reader = CheckpointReader(storage, c.name, c.manifest)
        try:
            report = load_verified(state, reader, verify=verify, strict=strict, restore=restore)
        except CorruptCheckpointError as e:
            failures.append(str(e))
            log.warning(
                "Checkpoint %s is corrupt (%s); falling back to the previous one. %s", c.path, e.file or "?", e
            )
            mark_status(storage, c.name, "corrupt", str(e))
            continue
        if report is not None and (not report.clean or report.notes):
            log.warning("Restored %s with differences:\n%s", c.path, report.table())
        if failures:
            log.warning("Restored step %d from %s after skipping %d corrupt checkpoint(s).", c.step, c.path, len(failures))
        else:
            log.info("Restored step %d from %s", c.step, c.path)
        return c, report
    if failures:
        raise CorruptCheckpointError(
            f"No valid checkpoint in {storage.url}: {len(failures)} failed verification:\n  "
            + "\n  ".join(failures[:10])
            + "\nRun 'ckptguard verify' on the run for details. The live objects may hold "
            "partially restored values: re-create them before training from scratch.",
            path=storage.url,
        )
    return None
