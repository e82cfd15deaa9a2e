"""Pins and lineage: checkpoints that no retention policy may delete.

Pins are ``PINNED`` marker files inside a checkpoint directory (like ``STATUS.json``: outside the
manifest's checksums, written atomically with ``storage.replace_file``). A marker needs no run-wide
file, so ``ckptguard pin`` works while the run is live; the deletion of a checkpoint removes its pin.

Lineage: every manifest records the ``run_id`` of the training lineage that wrote it (a fresh run
starts a new lineage, a resumed run continues the one it restored). A manager only prunes its own
lineage: a second, fresh run started in a directory that already holds another lineage's
checkpoints never deletes them by mistake (``ckptguard prune``, run by a person, may; it still
keeps every lineage's newest valid and best checkpoint).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Sequence

from ckptguard.errors import CheckpointError, CheckpointNotFoundError, StorageUnavailableError
from ckptguard.format import safejson
from ckptguard.format.manifest import MANIFEST, checkpoint_name
from ckptguard.policies.retention import Decision, Retention, plan_retention
from ckptguard.run.catalog import CheckpointInfo, read_manifest
from ckptguard.storage.base import Storage, join, read_capped

__all__ = [
    "PIN_FILE",
    "check_not_foreign",
    "foreign_protection",
    "lineage_protection",
    "new_run_id",
    "pin",
    "pinned_steps",
    "plan_own_lineage",
    "run_id_of",
    "unpin",
]

log = logging.getLogger(__name__)
PIN_FILE = "PINNED"
MAX_PIN_BYTES = 64 * 1024


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def _committed(storage: Storage, step: int) -> str:
    name = checkpoint_name(step)
    if not storage.exists(join(name, MANIFEST)):
        raise CheckpointNotFoundError(
            f"{storage.describe(name)} is not a committed checkpoint; 'ckptguard ls "
            f"{storage.describe('')}' lists the steps that exist."
        )
    return name


def pin(storage: Storage, step: int, note: str = "") -> None:
    """Protect checkpoint ``step`` from every retention policy and byte budget."""
    name = _committed(storage, step)
    record = {"pinned": True, "note": note, "time": time.time()}
    storage.replace_file(join(name, PIN_FILE), json.dumps(record).encode())


def unpin(storage: Storage, step: int) -> bool:
    """Remove a pin; return whether there was one."""
    name = _committed(storage, step)
    if not storage.exists(join(name, PIN_FILE)):
        return False
    storage.remove_file(join(name, PIN_FILE))
    return True


def pinned_steps(storage: Storage, ckpts: Sequence[CheckpointInfo]) -> dict[int, str]:
    """step -> "pinned[: note]" for every pinned checkpoint among ``ckpts``. A ``PINNED`` entry
    pins whatever it holds (a pin can only keep more); an unreadable one just has no note."""
    out: dict[int, str] = {}
    for c in ckpts:
        if storage.exists(join(c.name, PIN_FILE)):
            note = ""
            try:
                record = safejson.loads(read_capped(storage, join(c.name, PIN_FILE), MAX_PIN_BYTES, "a pin"))
                note = str(record.get("note") or "") if isinstance(record, dict) else ""
            except (ValueError, CheckpointError) as e:
                log.warning("%s is unreadable (the checkpoint stays pinned, without a note): %s",
                            storage.describe(join(c.name, PIN_FILE)), e)
            out[c.step] = f"pinned: {note}" if note else "pinned"
    return out


def run_id_of(c: CheckpointInfo) -> str | None:
    rid = (c.manifest or {}).get("run_id")
    return rid if isinstance(rid, str) else None


def foreign_protection(ckpts: Sequence[CheckpointInfo], own: set[str | None]) -> dict[int, str]:
    """Protect every checkpoint whose lineage is not one of ``own`` (a manager's view)."""
    return {
        c.step: f"another run's history (run {run_id_of(c) or 'unrecorded'})"
        for c in ckpts
        if run_id_of(c) not in own
    }


def lineage_protection(ckpts: Sequence[CheckpointInfo], retention: Retention) -> dict[int, str]:
    """Keep the newest valid and the best checkpoint of every lineage (``prune``'s view)."""
    lineages: dict[str | None, list[CheckpointInfo]] = {}
    for c in sorted(ckpts, key=lambda c: c.step):
        lineages.setdefault(run_id_of(c), []).append(c)
    if len(lineages) < 2:
        return {}
    out: dict[int, str] = {}
    for rid, group in lineages.items():
        label = rid or "unrecorded"
        valid = [c for c in group if c.valid]
        if valid:
            out[valid[-1].step] = f"newest of run {label}"
        best = retention.best(group)
        if best is not None:
            out.setdefault(best.step, f"best {retention.metric} of run {label}")
    return out


def plan_own_lineage(
    ckpts: Sequence[CheckpointInfo], retention: Retention, own: set[str | None], protected: dict[int, str]
) -> list[Decision]:
    """A manager's plan: the policy (and byte budget) applies to its own lineage only; every
    checkpoint of another lineage is kept, protected."""
    foreign = foreign_protection(ckpts, own)
    mine = [c for c in ckpts if c.step not in foreign]
    out = plan_retention(mine, retention, protected=protected)
    out += [
        Decision(c.step, c.name, True, tuple(w for w in (protected.get(c.step), foreign[c.step]) if w),
                 c.size_bytes, protected=True)
        for c in ckpts if c.step in foreign
    ]
    return sorted(out, key=lambda d: d.step)


def check_not_foreign(storage: Storage, step: int, own: set[str | None], run_id: str) -> None:
    """Refuse to overwrite another lineage's checkpoint at the same step (its history)."""
    name = checkpoint_name(step)
    if not storage.exists(join(name, MANIFEST)):
        return
    try:
        other = read_manifest(storage, name).get("run_id")
    except StorageUnavailableError:
        raise  # unknown, not invalid: never overwrite what could not be read
    except CheckpointError:
        return  # not a valid checkpoint: overwriting it loses nothing
    other = other if isinstance(other, str) else None
    if other not in own:
        raise CheckpointError(
            f"{storage.describe(name)} belongs to another run (run {other or 'unrecorded'}); this "
            f"run ({run_id}) did not restore from it, and saving step {step} would overwrite it. "
            "Call mgr.restore(state) first to continue that run, or use a new run directory."
        )
