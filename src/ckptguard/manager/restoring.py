"""Choosing which checkpoint to restore, and falling back past damaged ones.

``select_candidates`` orders the run's checkpoints newest first (or picks exactly one step);
``restore_first_valid`` tries them in turn. Every way it can end:

- a checkpoint restores: its step (with a warning naming each one skipped on the way);
- the run has no committed checkpoint at all: ``None`` (a fresh run);
- checkpoints exist but none can be used: :class:`NoValidCheckpointError` listing each one and
  why, on every call (a checkpoint marked corrupt earlier is listed, not silently forgotten);
- today's objects do not take the saved state (a strict mismatch, or a ``load_state_dict`` that
  raises): :class:`StateMismatchError`, at once, with nothing marked (older checkpoints would not
  fit better, and restoring one silently would lose work);
- a checkpoint written by a newer format (its manifest checks out): :class:`FormatVersionError`.

Only byte-level evidence (a checksum or size mismatch, a missing file, an unreadable or malformed
manifest or state.json) marks a checkpoint corrupt (STATUS.json). A checkpoint that vanishes while
it is being restored (a writer's retention pruned it) is skipped without a mark, and the run is
listed again so a newer checkpoint is found.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ckptguard.capture.state import TrainState
from ckptguard.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FormatVersionError,
    NoValidCheckpointError,
    StateMismatchError,
    StorageError,
    StorageUnavailableError,
)
from ckptguard.format.manifest import SELF_DIGEST_KEY
from ckptguard.persist.reader import CheckpointReader
from ckptguard.persist.safeload import load_verified, raise_if_newer_format
from ckptguard.run.catalog import BAD_STATUSES, SUPERSEDED, CheckpointInfo, clear_mark, find_unknown, mark_status, read_manifest
from ckptguard.run.trust import is_read_failure
from ckptguard.storage import Storage

__all__ = ["restore_first_valid", "select_candidates"]

log = logging.getLogger(__name__)
MAX_VANISHED = 100  # a writer pruning faster than a reader restores: give up after this many


def select_candidates(ckpts: Sequence[CheckpointInfo], step: int | None, url: str) -> list[CheckpointInfo]:
    """Newest first (marked ones included: they are reported, not tried); or exactly ``step``."""
    if step is None:
        return list(reversed(ckpts))
    chosen = [c for c in ckpts if c.step == step]
    if not chosen:
        have = ", ".join(str(c.step) for c in ckpts[-10:]) or "none"
        raise CheckpointNotFoundError(
            f"No checkpoint for step {step} in {url} (steps available: {have}). "
            "Run 'ckptguard ls' to list them."
        )
    return chosen


def _vanished(storage: Storage, c: CheckpointInfo) -> bool:
    """Whether ``c`` is no longer the committed checkpoint it was when listed (deleted, renamed
    away by a pruning writer, or replaced by a re-save)."""
    try:
        manifest = read_manifest(storage, c.name)
    except CheckpointNotFoundError:
        return True
    except CheckpointError:
        return False
    return c.manifest is not None and manifest != c.manifest


def _byte_problems(c: CheckpointInfo) -> list[str]:
    return [p for p in c.problems if not p.startswith("marked ") and not is_read_failure(p)]


def _read_failures(c: CheckpointInfo) -> list[str]:
    """Shared packs the storage could not stat: the checkpoint is skipped, not marked corrupt."""
    return [p for p in c.problems if is_read_failure(p)]


def newer_than(ckpts: Sequence[CheckpointInfo], step: int) -> dict[str, Any]:
    """The valid checkpoints newer than ``step`` (name -> manifest digest): after a restore of
    ``step`` they are a continuation the run leaves behind once it commits again."""
    return {c.name: (c.manifest or {}).get(SELF_DIGEST_KEY) for c in ckpts if c.step > step and c.valid}


def supersede(storage: Storage, abandoned: Mapping[str, Any], resumed_from: int | None) -> list[str]:
    """Mark ``abandoned`` (from :func:`newer_than`) ``superseded`` once the run committed on from
    ``resumed_from``: a plain restore() skips them, so an auto-restart stays on the branch the run
    is on. They stay valid and retention treats them as any other checkpoint. A step re-saved
    meanwhile has another manifest and is left alone. ``restore(state, step=N)`` still restores
    one; deleting its ``STATUS.json`` undoes the mark."""
    marked = []
    for name, digest in sorted(abandoned.items()):
        try:
            same = read_manifest(storage, name).get(SELF_DIGEST_KEY) == digest
        except CheckpointError:
            continue  # gone or unreadable: nothing to mark
        if same and mark_status(
            storage, name, SUPERSEDED,
            f"the run rolled back to step {resumed_from} and went on from there; this checkpoint "
            "belongs to the continuation it left (restore it by its step to go back)",
        ):
            marked.append(name)
    if marked:
        log.info("Marked %s superseded: the run went on from step %s.", ", ".join(marked), resumed_from)
    return marked


def _mark_reason(c: CheckpointInfo) -> str:
    marks = [p for p in c.problems if p.startswith("marked ")] or [f"marked {c.status}"]
    if c.status == "corrupt":
        return (
            f"{marks[0]} (skipped without re-reading; 'ckptguard verify {c.path}' re-checks every "
            "byte and clears a mark that no longer holds)"
        )
    return f"{marks[0]} (skipped; restore(state, step={c.step}) restores it anyway)"


def restore_first_valid(
    storage: Storage,
    candidates: Sequence[CheckpointInfo],
    state: TrainState,
    *,
    verify: bool,
    strict: bool,
    restore: Callable[..., Any],
    rescan: Callable[[], Sequence[CheckpointInfo]] | None = None,
    explicit: bool = False,
) -> tuple[CheckpointInfo, Any] | None:
    """Restore the first candidate that checks out; return it with its mismatch report.

    ``rescan`` lists the candidates again (newest first) after one vanished mid-restore;
    ``explicit``: the caller asked for this step, so a mark does not skip it (it is re-read).
    """
    failures: list[tuple[str, str]] = []
    superseded: list[tuple[str, str]] = []
    tried: set[str] = set()
    queue = list(candidates)
    if not queue and rescan is not None:  # a listing racing a pruning writer can come back empty
        queue = list(rescan())
    vanished = 0
    touched = False  # whether live objects may hold values of a failed attempt
    while queue:
        c = queue.pop(0)
        if c.name in tried:
            continue
        tried.add(c.name)
        if not explicit and c.status == SUPERSEDED:
            superseded.append((c.path, _mark_reason(c)))  # a rollback left it: not a failure
            log.info("Skipping checkpoint %s: %s", c.path, superseded[-1][1])
            continue
        if not explicit and c.status in BAD_STATUSES:
            failures.append((c.path, _mark_reason(c)))
            (log.info if c.status == "superseded" else log.warning)("Skipping checkpoint %s: %s", c.path, failures[-1][1])
            continue
        try:
            if c.manifest is None:
                raise_if_newer_format(storage, c.name)
                raise CorruptCheckpointError("; ".join(c.problems), path=c.path)
            if _byte_problems(c):
                raise CorruptCheckpointError("; ".join(_byte_problems(c)), path=c.path)
            if _read_failures(c):
                raise StorageError("; ".join(_read_failures(c)))
            touched = True
            report = load_verified(state, CheckpointReader(storage, c.name, c.manifest), verify=verify, strict=strict, restore=restore)
        except (StateMismatchError, FormatVersionError, StorageUnavailableError):
            raise  # today's code, a newer format or the network: nothing is marked, nothing older is tried
        except CheckpointError as e:
            if _vanished(storage, c):
                vanished += 1
                log.info("Checkpoint %s vanished while being restored (pruned by a writer?); moving on.", c.path)
                if explicit:
                    raise CheckpointNotFoundError(
                        f"{c.path} was deleted while it was being restored (a writer's retention "
                        "pruned it?). Run 'ckptguard ls' to list the checkpoints there are now."
                    ) from e
                if vanished >= MAX_VANISHED:
                    failures.append((storage.url, f"{vanished} checkpoints vanished while being restored"))
                    break
                for _ in range(3):  # the newer checkpoint a pruning writer committed
                    queue = [x for x in (rescan() if rescan is not None else ()) if x.name not in tried]
                    if queue or rescan is None:
                        break
                continue
            _record_failure(storage, c, e, failures, explicit=explicit)
            continue
        if explicit and verify and c.status == "corrupt":
            clear_mark(storage, c.name)  # every byte was just checked
        if report is not None and (not report.clean or report.notes):
            log.warning("Restored %s with differences:\n%s", c.path, report.table())
        if failures:
            log.warning("Restored step %d from %s after skipping %d checkpoint(s).", c.step, c.path, len(failures))
        else:
            log.info("Restored step %d from %s", c.step, c.path)
        return c, report
    failures += superseded  # only superseded ones left (the live branch's are gone): say so, never None
    if failures:
        lines = "\n  ".join(f"{path}: {why}" for path, why in failures[:20])
        more = f"\n  ... and {len(failures) - 20} more" if len(failures) > 20 else ""
        partial = (
            " The live objects may hold partially restored values: re-create them before training "
            "from scratch." if touched else ""
        )
        raise NoValidCheckpointError(
            f"No usable checkpoint in {storage.url}: {len(failures)} checkpoint(s), none restorable:"
            f"\n  {lines}{more}\nRun 'ckptguard verify {storage.url}' for details.{partial}",
            path=storage.url,
            failures=tuple(failures),
        )
    unknown = find_unknown(storage) if storage.isdir("") else []
    if unknown:
        log.warning(
            "No committed checkpoint in %s, but %s ha%s no MANIFEST.json (deleted by hand?): not "
            "restored, starting fresh. Put the manifest back from a backup to resume from it.",
            storage.url, ", ".join(unknown), "s" if len(unknown) == 1 else "ve",
        )
    return None


def _record_failure(
    storage: Storage, c: CheckpointInfo, e: CheckpointError, failures: list[tuple[str, str]], *, explicit: bool = False
) -> None:
    """Byte-level evidence marks ``c`` corrupt; a read error (perhaps transient) only skips it."""
    byte_level = isinstance(e, (CorruptCheckpointError, CheckpointNotFoundError))
    failures.append((c.path, str(e)))
    what = getattr(e, "file", None) or ("its manifest" if c.manifest is None else "a file")
    then = "not restoring it (you asked for this step)" if explicit else "falling back to the previous one"
    if byte_level:
        log.warning("Checkpoint %s is corrupt (%s); %s. %s", c.path, what, then, e)
        if c.manifest is not None:  # an unreadable manifest already lists it as invalid
            mark_status(storage, c.name, "corrupt", str(e))
    else:
        log.warning("Checkpoint %s could not be read (%s); %s, not marked.", c.path, e, then)
