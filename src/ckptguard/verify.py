"""``verify(path)``: check every byte of one checkpoint, or of every checkpoint of a run (a scrub)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from ckptguard.catalog import info_for, read_manifest, read_status
from ckptguard.errors import CheckpointError, CheckpointNotFoundError
from ckptguard.manifest import MANIFEST, parse_step
from ckptguard.reader import verify_files
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

    Checks the manifest (schema, format version, safe paths), every file's size and every byte
    against its checksum. Returns a report with ``.ok`` and ``.problems``; never raises for a bad
    checkpoint (only for a path that does not exist).
    """
    storage, names = resolve_target(path, storage_options)
    reports = []
    problems: list[Problem] = []
    for name in names:
        if progress is not None:
            progress(name)
        found: list[Problem] = []
        size = nfiles = 0
        status = "committed"
        step = parse_step(name) if parse_step(name) is not None else -1
        if not storage.exists(join(name, MANIFEST)):
            found.append(Problem(name, MANIFEST, "missing: not a committed checkpoint (debris of an interrupted save; 'ckptguard prune' removes it)"))
        else:
            try:
                manifest = read_manifest(storage, name)
                nfiles = len(manifest["files"])
                size = sum(int(e.get("size", 0)) for e in manifest["files"].values())
                step = int(manifest["step"])
                for fname, msg in verify_files(storage, name, manifest):
                    found.append(Problem(name, fname, msg))
                rec = read_status(storage, name)
                info = info_for(storage, name, check_files=False)
                status = info.status
                if rec and rec.get("status") == "failed":
                    found.append(Problem(name, "", f"failed behavioural verification: {rec.get('detail', '')}"))
            except CheckpointError as e:
                found.append(Problem(name, MANIFEST, str(e)))
        if not found and status == "corrupt":
            status = "committed"  # re-verified sound
        reports.append(CheckpointReport(name, step, not found, nfiles, size, "corrupt" if found else status, tuple(found)))
        problems.extend(found)
    if not names:
        problems.append(Problem(storage.describe(""), "", "no checkpoints found"))
    return VerifyReport(storage.describe(""), tuple(reports), tuple(problems))
