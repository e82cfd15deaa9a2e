"""The restore pipeline: choosing which checkpoint to restore, and falling back past damaged ones.

``select_candidates`` orders the run's checkpoints newest first (or picks exactly one step);
``restore_first_valid`` tries them in turn, each through :func:`load_checkpoint`::

    CheckpointManager.restore -> restore_first_valid -> load_checkpoint(coord, state, reader)
        -> reader.check_headers            (verify: before any manifest shape meets the model)
        -> coord.same_step, prepare_rank   (model layout, this rank's RNG / data position)
        -> load_sharded                    (DCP checkpoints only)
        -> restore_state(ts, reader, per_rank=...)
        -> reader.verify_unread            (verify: config.yaml and the other unread files)

The collaborators are explicit: the :class:`~ckptguard.distributed.coordination.Coordinator`
(identities in a single process; agreement between ranks after each stage otherwise) and a
:class:`~ckptguard.persist.reader.CheckpointReader` built with ``verify=``. Every way a restore
can end:

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

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ckptguard.capture.state import MismatchReport, TrainState, restore_state
from ckptguard.distributed.coordination import Coordinator, DamagedElsewhere, agree, capture_exc
from ckptguard.distributed.restoring import is_dcp, load_sharded, prepare_rank
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
from ckptguard.persist.slim import slim_note
from ckptguard.policies.slimming import slimmed_record
from ckptguard.run.catalog import (
    BAD_STATUSES,
    SUPERSEDED,
    CheckpointInfo,
    clear_mark,
    clear_superseded,
    find_unknown,
    mark_status,
    read_manifest,
)
from ckptguard.run.trust import is_read_failure
from ckptguard.storage import Storage

__all__ = [
    "load_checkpoint", "newer_than", "raise_if_missing_bucket", "raise_if_newer_format", "restore_first_valid",
    "select_candidates", "supersede",
]

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


@dataclasses.dataclass(frozen=True)
class Resumed:
    """In the plan of :func:`newer_than`: the restored checkpoint itself, marked superseded by an
    earlier rollback; once the run commits on from it, it is on the live branch again."""


def newer_than(ckpts: Sequence[CheckpointInfo], step: int) -> dict[str, Any]:
    """What the first commit after a restore of ``step`` changes: the valid checkpoints newer
    than it (name -> manifest digest) are a continuation the run leaves behind, and the restored
    one (name -> :class:`Resumed`), if a rollback had marked it superseded, is taken back."""
    plan: dict[str, Any] = {c.name: (c.manifest or {}).get(SELF_DIGEST_KEY) for c in ckpts if c.step > step and c.valid}
    plan.update({c.name: Resumed() for c in ckpts if c.step == step and c.status == SUPERSEDED})
    return plan


def supersede(storage: Storage, abandoned: Mapping[str, Any], resumed_from: int | None) -> list[str]:
    """Mark ``abandoned`` (from :func:`newer_than`) ``superseded`` once the run committed on from
    ``resumed_from``: a plain restore() skips them, so an auto-restart stays on the branch the run
    is on. They stay valid and retention treats them as any other checkpoint. A step re-saved
    meanwhile has another manifest and is left alone. ``restore(state, step=N)`` still restores
    one (and once a save commits after it, its mark goes: the run went on from it); deleting its
    ``STATUS.json`` undoes the mark."""
    marked = []
    for name, digest in sorted(abandoned.items()):
        if isinstance(digest, Resumed):
            clear_superseded(storage, name)
            continue
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


# What hostile-but-checksummed state.json contents make plain Python code raise.
_MALFORMED_STATE = (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError, OverflowError)


def load_checkpoint(coord: Coordinator, state: TrainState, reader: CheckpointReader, *, strict: bool) -> MismatchReport:
    """Restore one committed checkpoint into ``state``; return its mismatch report.

    The stages, each agreed between ranks (``coord``; identities in a single process): the
    same step on every rank; the model layout and this rank's own RNG / data position (its rank
    file); sharded model state through DCP; the rest by :func:`restore_state`. With
    ``reader.verify`` every tensor file's header is checked before any shape in the manifest is
    compared with the live model, and the files no read touched (``config.yaml``...) after.
    Contents that pass their checksums yet make ckptguard's own decoding fail (a hostile or
    malformed ``state.json``) become a :class:`CorruptCheckpointError`, so restore falls back.
    """
    where = reader.where
    if reader.verify:
        reader.check_headers()
    try:
        coord.same_step(int(reader.manifest["step"]), reader.storage.describe(""))
        per_rank, exc = capture_exc(lambda: prepare_rank(coord, state, reader))
        agree(coord, exc, where)
        ts = state
        slim = slim_note(reader.manifest, where)
        if slim is not None:  # weights only (ckptguard.persist.slim)
            ts = TrainState(model=state.model, capture_rng=False)
        if is_dcp(reader.manifest):
            rest, exc = capture_exc(lambda: load_sharded(coord, state, reader, strict=strict))
            agree(coord, exc, where)
            ts = rest if rest is not None else state
        report, exc = capture_exc(lambda: restore_state(ts, reader, strict=strict, per_rank=per_rank))
        agree(coord, exc, where)
    except CheckpointError:
        raise
    except _MALFORMED_STATE as e:
        raise CorruptCheckpointError(
            f"{where}/state.json does not describe a state ckptguard can load "
            f"({type(e).__name__}: {e}). The checkpoint is damaged or hostile; restore skips it.",
            path=where,
            file="state.json",
        ) from e
    if reader.verify:
        reader.verify_unread()  # files restore did not need (config.yaml...) too
    assert report is not None
    if slim is not None:  # _restored logs it as a warning
        report.notes.append(slim)
    return report


def raise_if_missing_bucket(storage: Storage) -> None:
    """A run found empty on an object store whose bucket does not exist is not a fresh run (a typo,
    or a bucket not created yet): :class:`CheckpointNotFoundError`."""
    missing: Callable[[], str | None] | None = getattr(storage, "missing_bucket", None)
    bucket = missing() if missing is not None else None
    if bucket is not None:
        raise CheckpointNotFoundError(
            f"{storage.url}: the bucket {bucket!r} does not exist. Create it first (saves would fail), or fix the URL."
        )


def raise_if_newer_format(storage: Storage, name: str) -> None:
    """A newer checkpoint than any we can read: upgrading beats silently resuming older state."""
    try:
        read_manifest(storage, name)
    except FormatVersionError:
        raise
    except CheckpointError:
        return


@dataclasses.dataclass
class _Tally:
    """What the attempts of one restore found: the reasons of each checkpoint not restored."""

    failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    superseded: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    vanished: int = 0
    touched: bool = False  # whether live objects may hold values of a failed attempt


def restore_first_valid(
    storage: Storage,
    candidates: Sequence[CheckpointInfo],
    state: TrainState,
    *,
    coord: Coordinator,
    verify: bool,
    strict: bool,
    rescan: Callable[[], Sequence[CheckpointInfo]] | None = None,
    explicit: bool = False,
) -> tuple[CheckpointInfo, MismatchReport] | None:
    """Restore the first candidate that checks out; return it with its mismatch report.

    ``coord`` agrees with the other ranks (:class:`Coordinator` in a single process);
    ``verify`` hashes every byte read; ``rescan`` lists the run's checkpoints again (oldest
    first, as ``CheckpointManager.checkpoints``) after one vanished mid-restore; ``explicit``:
    the caller asked for this step, so a mark does not skip it (it is re-read).
    """
    tally = _Tally()
    tried: set[str] = set()
    queue = list(candidates)
    if not queue and rescan is not None:  # a listing racing a pruning writer can come back empty
        queue = list(reversed(rescan()))
    while queue:
        c = queue.pop(0)
        if c.name in tried:
            continue
        tried.add(c.name)
        if _skipped(c, tally, explicit=explicit):
            continue
        try:
            report = _attempt(storage, c, state, tally, coord=coord, verify=verify, strict=strict)
        except (StateMismatchError, FormatVersionError, StorageUnavailableError):
            raise  # today's code, a newer format or the network: nothing is marked, nothing older is tried
        except CheckpointError as e:
            if _vanished(storage, c):
                queue = _after_vanished(storage, c, e, tally, rescan, tried, explicit=explicit)
            else:
                _record_failure(storage, c, e, tally.failures, explicit=explicit)
            continue
        _restored(storage, c, report, tally, verify=verify, explicit=explicit)
        return c, report
    _give_up(storage, tally)
    return None


def _skipped(c: CheckpointInfo, tally: _Tally, *, explicit: bool) -> bool:
    """Whether a mark skips ``c`` (recorded in ``tally``): never when its step was asked for."""
    if explicit:
        return False
    if c.status == SUPERSEDED:
        tally.superseded.append((c.path, _mark_reason(c)))  # a rollback left it: not a failure
        log.info("Skipping checkpoint %s: %s", c.path, tally.superseded[-1][1])
        return True
    if c.status in BAD_STATUSES:
        tally.failures.append((c.path, _mark_reason(c)))
        log.warning("Skipping checkpoint %s: %s", c.path, tally.failures[-1][1])
        return True
    if slimmed_record(c.manifest) is not None:  # weights only: never resumed from unless asked for by step
        tally.superseded.append((c.path, f"slimmed to its weights (skipped; restore(state, step={c.step}) loads them)"))
        return True
    return False


def _attempt(
    storage: Storage, c: CheckpointInfo, state: TrainState, tally: _Tally, *, coord: Coordinator, verify: bool, strict: bool
) -> MismatchReport:
    """Restore ``c`` into ``state``, or raise what is wrong with it."""
    if c.manifest is None:
        raise_if_newer_format(storage, c.name)
        raise CorruptCheckpointError("; ".join(c.problems), path=c.path)
    if _byte_problems(c):
        raise CorruptCheckpointError("; ".join(_byte_problems(c)), path=c.path)
    if _read_failures(c):
        raise StorageError("; ".join(_read_failures(c)))
    tally.touched = True
    reader = CheckpointReader(storage, c.name, c.manifest, verify=verify)
    return load_checkpoint(coord, state, reader, strict=strict)


def _after_vanished(
    storage: Storage, c: CheckpointInfo, e: CheckpointError, tally: _Tally,
    rescan: Callable[[], Sequence[CheckpointInfo]] | None, tried: set[str], *, explicit: bool,
) -> list[CheckpointInfo]:
    """The candidates left after ``c`` vanished mid-restore: the run listed again (a pruning
    writer committed a newer one), none once too many vanished."""
    tally.vanished += 1
    log.info("Checkpoint %s vanished while being restored (pruned by a writer?); moving on.", c.path)
    if explicit:
        raise CheckpointNotFoundError(
            f"{c.path} was deleted while it was being restored (a writer's retention "
            "pruned it?). Run 'ckptguard ls' to list the checkpoints there are now."
        ) from e
    if tally.vanished >= MAX_VANISHED:
        tally.failures.append((storage.url, f"{tally.vanished} checkpoints vanished while being restored"))
        return []
    queue: list[CheckpointInfo] = []
    if rescan is None:
        return queue
    for _ in range(3):  # the newer checkpoint a pruning writer committed
        queue = [x for x in reversed(rescan()) if x.name not in tried]
        if queue:
            break
    return queue


def _restored(
    storage: Storage, c: CheckpointInfo, report: MismatchReport, tally: _Tally, *, verify: bool, explicit: bool
) -> None:
    """Log how the restore of ``c`` went; clear a corrupt mark every byte just disproved."""
    if explicit and verify and c.status == "corrupt":
        clear_mark(storage, c.name)  # every byte was just checked
    if not report.clean or report.notes:
        log.warning("Restored %s with differences:\n%s", c.path, report.table())
    if tally.failures:
        log.warning("Restored step %d from %s after skipping %d checkpoint(s).", c.step, c.path, len(tally.failures))
    else:
        log.info("Restored step %d from %s", c.step, c.path)


def _give_up(storage: Storage, tally: _Tally) -> None:
    """Nothing restored: raise when checkpoints exist (never None then), else warn about
    step folders whose manifest was deleted by hand."""
    failures = tally.failures + tally.superseded  # only superseded ones left (the live branch's are gone): say so
    if failures:
        lines = "\n  ".join(f"{path}: {why}" for path, why in failures[:20])
        more = f"\n  ... and {len(failures) - 20} more" if len(failures) > 20 else ""
        partial = (
            " The live objects may hold partially restored values: re-create them before training "
            "from scratch." if tally.touched else ""
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


def _record_failure(
    storage: Storage, c: CheckpointInfo, e: CheckpointError, failures: list[tuple[str, str]], *, explicit: bool = False
) -> None:
    """Byte-level evidence marks ``c`` corrupt; a read error (perhaps transient) only skips it."""
    failures.append((c.path, str(e)))
    if isinstance(e, DamagedElsewhere):  # this rank's copy may be sound: nothing to mark here
        log.info("%s", e)
        return
    byte_level = isinstance(e, (CorruptCheckpointError, CheckpointNotFoundError))
    what = getattr(e, "file", None) or ("its manifest" if c.manifest is None else "a file")
    then = "not restoring it (you asked for this step)" if explicit else "falling back to the previous one"
    if byte_level:
        log.warning("Checkpoint %s is corrupt (%s); %s. %s", c.path, what, then, e)
        if c.manifest is not None:  # an unreadable manifest already lists it as invalid
            mark_status(storage, c.name, "corrupt", str(e))
    else:
        log.warning("Checkpoint %s could not be read (%s); %s, not marked.", c.path, e, then)
