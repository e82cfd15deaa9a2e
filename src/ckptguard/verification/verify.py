"""``verify(path)``: check every byte of one checkpoint, or of every checkpoint of a run (a scrub).

Verify also refreshes the ``corrupt`` mark in each checkpoint's STATUS.json, so that ``verify``,
``ls`` and ``inspect`` agree: a checkpoint found damaged is marked corrupt (restore then skips it
without re-reading it); a marked one whose every byte now checks out (a mark left by an older
ckptguard after an error in user code, or a file restored from a backup) has its mark cleared.
This is the documented way to clear a mark (by hand: delete ``step-N/STATUS.json``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from ckptguard.errors import CheckpointError, CheckpointNotFoundError
from ckptguard.format.manifest import MANIFEST, parse_step
from ckptguard.persist.reader import NOT_EVIDENCE, verify_files
from ckptguard.run.catalog import UNCOMMITTED, clear_mark, info_for, is_empty_dir, mark_status, read_manifest, read_status
from ckptguard.storage import Storage, open_storage
from ckptguard.storage.base import join

__all__ = ["CheckpointReport", "Problem", "VerifyReport", "resolve_target", "verify"]


@dataclasses.dataclass(frozen=True)
class Problem:
    checkpoint: str
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.checkpoint}/{self.file}: {self.message}" if self.file else f"{self.checkpoint}: {self.message}"


@dataclasses.dataclass(frozen=True)
class CheckpointReport:
    name: str
    step: int
    ok: bool
    files: int
    bytes: int
    status: str
    problems: tuple[Problem, ...]


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """Result of :func:`verify`: ``ok`` only when every checked file is sound."""

    target: str
    checkpoints: tuple[CheckpointReport, ...]
    problems: tuple[Problem, ...]
    cleared: tuple[str, ...] = ()  # checkpoints whose stale corrupt mark was cleared
    marked: tuple[str, ...] = ()  # checkpoints newly marked corrupt

    @property
    def ok(self) -> bool:
        return not self.problems and bool(self.checkpoints)

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "ok": self.ok,
            "checkpoints": [
                {**dataclasses.asdict(c), "problems": [str(p) for p in c.problems]} for c in self.checkpoints
            ],
            "problems": [str(p) for p in self.problems],
            "cleared": list(self.cleared),
            "marked": list(self.marked),
        }


def resolve_target(path: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> tuple[Storage, list[str]]:
    """(run storage, checkpoint names) for a run directory or a single checkpoint directory."""
    text = os.fspath(path).rstrip("/")
    storage = open_storage(text, storage_options)
    if storage.exists(MANIFEST) or parse_step(os.path.basename(text)) is not None:
        parent, name = text.rsplit("/", 1) if "/" in text else (".", text)
        if "://" in text and parent.endswith(":/"):
            parent += "/"
        return open_storage(parent, storage_options), [name]
    if not storage.isdir(""):
        raise CheckpointNotFoundError(
            f"{storage.describe('')} does not exist. Pass a run directory or a checkpoint "
            "directory (RUN/step-000001200)."
        )
    names = [n for n in storage.listdir("") if parse_step(n) is not None]
    return storage, names


def verify(
    path: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> VerifyReport:
    """Verify a checkpoint (``RUN/step-N``) or every checkpoint of a run.

    Checks the manifest (its own checksum first, then schema, format version, safe paths), every
    file's size and every byte against its checksum, and refreshes the checkpoint's corrupt mark
    (see the module docstring). Returns a report with ``.ok`` and ``.problems``; never raises for a
    bad checkpoint (only for a path that does not exist).
    """
    storage, names = resolve_target(path, storage_options)
    reports = []
    problems: list[Problem] = []
    cleared: list[str] = []
    marked: list[str] = []
    for name in names:
        if progress is not None:
            progress(name)
        report = _verify_one(storage, name, cleared, marked)
        reports.append(report)
        problems.extend(report.problems)
    if not names:
        problems.append(Problem(storage.describe(""), "", "no checkpoints found"))
    return VerifyReport(storage.describe(""), tuple(reports), tuple(problems), tuple(cleared), tuple(marked))


def _missing_manifest(storage: Storage, name: str) -> Problem:
    if storage.exists(join(name, UNCOMMITTED)) or is_empty_dir(storage, name):
        why = "missing: not a committed checkpoint (debris of an interrupted save; 'ckptguard prune' removes it)"
    else:
        why = (
            "missing, yet no interrupted save left this folder (the manifest was deleted by "
            "hand?): not restorable; prune keeps it. Put the manifest back from a backup, "
            "or delete the folder by hand"
        )
    return Problem(name, MANIFEST, why)


def _verify_one(storage: Storage, name: str, cleared: list[str], marked: list[str]) -> CheckpointReport:
    """Verify one checkpoint; its corrupt mark is set (name added to ``marked``) or cleared (``cleared``)."""
    found: list[Problem] = []
    size = nfiles = 0
    status = "committed"
    parsed = parse_step(name)
    step = parsed if parsed is not None else -1
    if not storage.exists(join(name, MANIFEST)):
        found.append(_missing_manifest(storage, name))
    else:
        try:
            manifest = read_manifest(storage, name)
            nfiles = len(manifest["files"])
            size = sum(int(e.get("size", 0)) for e in manifest["files"].values())
            step = int(manifest["step"])
            damage = verify_files(storage, name, manifest)
            if damage and read_manifest(storage, name) != manifest:  # slimmed meanwhile: check what it is now
                manifest = read_manifest(storage, name)
                damage = verify_files(storage, name, manifest)
            found.extend(Problem(name, fname, msg) for fname, msg in damage)
            rec = read_status(storage, name)
            evidence = [(f, m) for f, m in damage if not m.startswith(NOT_EVIDENCE)]
            if evidence and (rec or {}).get("status") != "corrupt":
                if mark_status(storage, name, "corrupt", "; ".join(f"{f}: {m}" for f, m in evidence)):
                    marked.append(name)
            elif not damage and (rec or {}).get("status") == "corrupt" and clear_mark(storage, name):
                cleared.append(name)
            info = info_for(storage, name, check_files=False)
            status = info.status
            rec = read_status(storage, name)
            if rec and rec.get("status") == "failed":
                found.append(Problem(name, "", f"failed behavioural verification: {rec.get('detail', '')}"))
        except CheckpointError as e:
            found.append(Problem(name, MANIFEST, str(e)))
    return CheckpointReport(name, step, not found, nfiles, size, "corrupt" if found else status, tuple(found))
