"""Finding checkpoints in a run: committed ones, their status marks, and debris.

A checkpoint is ``step-NNNNNNNNN/`` with a ``MANIFEST.json`` that parses and validates and whose
files exist with the recorded sizes (for incremental checkpoints: the shared packs too, and no
chunk a check found damaged; see :mod:`ckptguard.run.trust`). ``STATUS.json`` beside the manifest carries what was learned
after the commit (verified by the probe, failed verification, found corrupt); it is not covered by
the manifest's checksums and can only make a checkpoint *less* trusted.
Everything else under the run (``.tmp-*``, ``.trash-*``, and step directories without a manifest
that hold the writer's ``UNCOMMITTED`` marker) is debris from an interrupted save or delete: never
restored, removed by the next save or ``prune``. A step directory with neither a manifest nor the
marker was not left by ckptguard mid-write (on local disk a save writes into ``.tmp-*`` and renames;
on object stores the marker is the first file written and the last removed): its manifest was
deleted or lost by hand. It is *unknown*, never restored and never deleted (``find_unknown``).

A ``corrupt`` mark in STATUS.json is written only on byte-level evidence (a checksum or size
mismatch, an unreadable or malformed file). ``verify`` re-checks every byte and refreshes the mark:
it clears a mark on a checkpoint that now checks out (``clear_mark``, restoring the status it had
before) and marks one it finds damaged.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import re
import threading
import time
from typing import Any

from ckptguard.errors import CheckpointError, CheckpointNotFoundError, StorageUnavailableError, UnsafeCheckpointError
from ckptguard.format import safejson
from ckptguard.format.manifest import MANIFEST, MAX_MANIFEST_BYTES, STATUS, checkpoint_name, malformed, parse_manifest, parse_step
from ckptguard.format.tensorfile import digest_bytes
from ckptguard.run.trust import PackStats, pack_problems
from ckptguard.storage.base import Storage, join, read_capped

__all__ = [
    "BAD_STATUSES",
    "CheckpointInfo",
    "ManifestCache",
    "UNCOMMITTED",
    "is_empty_dir",
    "clear_mark",
    "clear_superseded",
    "committed_names",
    "find_debris",
    "find_unknown",
    "info_for",
    "mark_status",
    "read_manifest",
    "read_status",
    "scan",
]

log = logging.getLogger(__name__)
BAD_STATUSES = frozenset({"corrupt", "failed"})
# Newer than the step a run rolled back to, left behind when the run went on from there: valid,
# kept by retention as any other, but a plain restore() does not pick it.
SUPERSEDED = "superseded"
MAX_STATUS_BYTES = 1024 * 1024  # mark_status writes at most ~70 KB
_MAX_DETAIL = 64 * 1024
# The marker a save (object stores: inside step-N/) writes first and a delete writes before it
# uncommits: a step directory without a manifest is debris only when it holds this file.
UNCOMMITTED = "UNCOMMITTED"


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint of a run, as listed by ``CheckpointManager.checkpoints()``."""

    step: int
    name: str
    path: str
    valid: bool
    metrics: dict[str, Any]
    size_bytes: int
    created: dt.datetime | None
    status: str
    reason: str = ""
    problems: tuple[str, ...] = ()
    manifest: dict[str, Any] | None = dataclasses.field(default=None, repr=False, compare=False)

    @property
    def verified(self) -> bool:
        return self.status == "verified"


class ManifestCache:
    """The manifests of one run, parsed and validated once per distinct content.

    Every read still reads the bytes (so a replaced manifest is never served stale); only when
    they hash to what was parsed before is the parse skipped: 5 ms for a 300-tensor manifest,
    13-17 ms for an incremental one with chunk lists, at every save, for every retained
    checkpoint (retention, GC and deduplication each list the run). Cached manifests are shared:
    treat them as read-only.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._parsed: dict[str, tuple[str, dict[str, Any]]] = {}
        self._lock = threading.Lock()  # an async save's thread and the caller's both list the run

    def parse(self, name: str, raw: bytes, where: str) -> dict[str, Any]:
        key = digest_bytes(raw)
        with self._lock:
            hit = self._parsed.get(name)
        if hit is None or hit[0] != key:
            hit = (key, parse_manifest(raw, where))
            with self._lock:
                self._parsed[name] = hit
        return hit[1]

    def committed(self, *, strict: bool) -> list[tuple[str, dict[str, Any]]]:
        """(name, manifest) of every ``step-*`` directory with a manifest, by name. ``strict``:
        raise the CheckpointError of an unreadable manifest instead of skipping it."""
        out = []
        present = committed_names(self.storage)
        for name in sorted(present):
            try:
                out.append((name, read_manifest(self.storage, name, cache=self)))
            except CheckpointError:
                if strict:
                    raise
        self.forget_except(present)
        return out

    def forget_except(self, present: set[str]) -> None:
        with self._lock:
            for gone in set(self._parsed) - present:
                del self._parsed[gone]


def committed_names(storage: Storage) -> set[str]:
    """Names of the ``step-*`` directories of the run that hold a manifest."""
    return {n for n in storage.listdir("") if parse_step(n) is not None and storage.exists(join(n, MANIFEST))}


def read_manifest(storage: Storage, name: str, *, cache: ManifestCache | None = None) -> dict[str, Any]:
    """Read, parse and validate ``name/MANIFEST.json`` (``cache``: skip the parse of bytes seen
    before)."""
    where = storage.describe(join(name, MANIFEST))
    if storage.is_symlink(name) or storage.is_symlink(join(name, MANIFEST)):
        raise UnsafeCheckpointError(
            f"{where}: the checkpoint directory or its manifest is a symbolic link; refusing to "
            "follow it. Copy the real files into the run instead.",
            path=where,
        )
    if not storage.exists(join(name, MANIFEST)):
        raise CheckpointNotFoundError(
            f"{where} does not exist: {storage.describe(name)} is not a committed checkpoint "
            "(an interrupted save leaves such debris; 'ckptguard prune' removes it)."
        )
    raw = read_capped(storage, join(name, MANIFEST), MAX_MANIFEST_BYTES, "a manifest")
    manifest = cache.parse(name, raw, where) if cache is not None else parse_manifest(raw, where)
    step = parse_step(name)
    if step is not None and manifest["step"] != step:
        raise malformed(where, f"step {manifest['step']} does not match the directory name {name!r}")
    return manifest


def read_status(storage: Storage, name: str) -> dict[str, Any] | None:
    """The post-commit status record, or None when there is none. An unreadable one (not a
    regular file, too large, not JSON, too deep) is treated as absent, with a warning: the
    manifest's checksums, not this file, decide whether the checkpoint is sound."""
    path = join(name, STATUS)
    try:
        if not storage.exists(path):
            return None
        data = safejson.loads(read_capped(storage, path, MAX_STATUS_BYTES, "a status record"))
    except StorageUnavailableError:
        raise  # the network, not the file: not "absent"
    except (CheckpointError, ValueError) as e:
        log.warning("Ignoring %s (treated as absent): %s", storage.describe(path), e)
        return None
    return data if isinstance(data, dict) and isinstance(data.get("status"), str) else None


def mark_status(storage: Storage, name: str, status: str, detail: str = "") -> bool:
    """Record a post-commit finding. Best effort: a read-only run only logs it.

    A ``corrupt`` mark keeps the good status it replaces (``previous``) for :func:`clear_mark`.
    A checkpoint deleted meanwhile (a pruning writer) is not marked: on an object store the mark
    would recreate its prefix as a folder without manifest.
    """
    if not storage.exists(join(name, MANIFEST)):
        log.info("Not marking %s as %s: it was deleted meanwhile.", storage.describe(name), status)
        return False
    record: dict[str, Any] = {"status": status, "detail": detail[:_MAX_DETAIL], "time": time.time()}
    if status == "corrupt":
        old = read_status(storage, name)
        if old is not None and old.get("status") not in BAD_STATUSES:
            record["previous"] = old
        elif old is not None and isinstance(old.get("previous"), dict):
            record["previous"] = old["previous"]
    try:
        storage.replace_file(join(name, STATUS), json.dumps(record, indent=1).encode())
        return True
    except CheckpointError as e:
        log.warning("Could not mark %s as %s: %s", storage.describe(name), status, e)
        return False


def clear_mark(storage: Storage, name: str) -> bool:
    """Remove a ``corrupt`` mark from a checkpoint that re-verified sound (``verify`` does this).

    The status the mark replaced comes back (or STATUS.json goes, leaving the manifest's own).
    Returns whether a mark was cleared. By hand: delete ``step-N/STATUS.json``.
    """
    return _clear(storage, name, "corrupt", "every byte checks out")


def clear_superseded(storage: Storage, name: str) -> bool:
    """Remove a ``superseded`` mark: the run went on from this checkpoint (it was restored by
    its step and a save committed after it), so it belongs to the live branch again. Returns
    whether a mark was removed."""
    return _clear(storage, name, SUPERSEDED, "the run went on from it")


def _clear(storage: Storage, name: str, status: str, why: str) -> bool:
    """Remove ``name``'s ``status`` mark, bringing back the status it replaced (``previous``) if
    one was kept; return whether a mark was removed."""
    rec = read_status(storage, name)
    if rec is None or rec.get("status") != status:
        return False
    previous = rec.get("previous")
    try:
        if isinstance(previous, dict) and isinstance(previous.get("status"), str):
            storage.replace_file(join(name, STATUS), json.dumps(previous, indent=1).encode())
        else:
            storage.remove_file(join(name, STATUS))
    except CheckpointError as e:
        log.warning("Could not clear the %s mark of %s: %s", status, storage.describe(name), e)
        return False
    log.info("Cleared the %s mark of %s: %s.", status, storage.describe(name), why)
    return True


def _size_problems(storage: Storage, name: str, manifest: dict[str, Any]) -> list[str]:
    problems = []
    for fname, entry in manifest["files"].items():
        rel = join(name, fname)
        if entry.get("kind") not in ("blob", "tensors"):
            continue  # other kinds (shared objects) check their own storage
        if storage.is_symlink(rel):
            problems.append(f"{fname}: is a symbolic link (refused)")
            continue
        try:
            size = storage.size(rel)
        except StorageUnavailableError:
            raise  # the network failed, not the checkpoint: no evidence to mark it by
        except CheckpointError:
            problems.append(f"{fname}: missing")
            continue
        if size != entry["size"]:
            problems.append(f"{fname}: size {size} bytes, manifest says {entry['size']}")
    return problems


def info_for(
    storage: Storage, name: str, *, check_files: bool = True, cache: ManifestCache | None = None,
    packs: PackStats | None = None,
) -> CheckpointInfo:
    """Describe one checkpoint directory without hashing its data. ``check_files`` also stats
    its files and the shared packs it references (``packs``: stats shared by one listing)."""
    step = parse_step(name)
    path = storage.describe(name)
    try:
        manifest = read_manifest(storage, name, cache=cache)
    except StorageUnavailableError:
        raise  # the network failed, not the checkpoint: it is neither invalid nor skipped
    except CheckpointError as e:
        return CheckpointInfo(
            step=step if step is not None else -1, name=name, path=path, valid=False, metrics={},
            size_bytes=0, created=None, status="invalid", problems=(str(e),),
        )
    problems = _size_problems(storage, name, manifest) if check_files else []
    if check_files:  # shared data counts: missing/resized packs, chunks that failed a check
        problems += pack_problems(manifest, packs if packs is not None else PackStats(storage))
    status_rec = read_status(storage, name)
    status = (status_rec or {}).get("status") or (
        (manifest.get("verification") or {}).get("status") or "committed"
    )
    if status_rec and status_rec.get("status") in BAD_STATUSES:
        problems.append(f"marked {status_rec['status']}: {status_rec.get('detail', '')}")
    created = manifest.get("created_unix")
    return CheckpointInfo(
        step=int(manifest["step"]),
        name=name,
        path=path,
        valid=not problems and status not in BAD_STATUSES,
        metrics=dict(manifest.get("metrics") or {}),
        size_bytes=sum(int(e.get("size", 0)) for e in manifest["files"].values()),
        created=dt.datetime.fromtimestamp(created, dt.timezone.utc)
        if isinstance(created, (int, float)) else None,
        status=status if not problems or status in BAD_STATUSES else "invalid",
        reason=str(manifest.get("reason", "")),
        problems=tuple(problems),
        manifest=manifest,
    )


def scan(storage: Storage, *, check_files: bool = True, cache: ManifestCache | None = None) -> list[CheckpointInfo]:
    """Every ``step-*`` directory of the run that has a manifest, ordered by step number.
    ``cache``: a ManifestCache of the run (a manager keeps one across saves)."""
    names = committed_names(storage)
    packs = PackStats(storage)
    out = [info_for(storage, name, check_files=check_files, cache=cache, packs=packs) for name in names]
    if cache is not None:
        cache.forget_except(names)
    out.sort(key=lambda c: c.step)
    return out


SIDE_FILE_TEMP = re.compile(r".+\.tmp-[0-9a-f]{8}")  # a run file's replacement a kill left unrenamed


def find_debris(storage: Storage) -> list[str]:
    """Names under the run that are leftovers of interrupted saves or deletes (also the temporary
    copy of a run file such as ``ckptguard.json`` that a kill left before its rename)."""
    debris = []
    for name in storage.listdir(""):
        if name.startswith((".tmp-", ".trash-")) or SIDE_FILE_TEMP.fullmatch(name):
            debris.append(name)
        elif _uncommitted_step(storage, name) and (storage.exists(join(name, UNCOMMITTED)) or is_empty_dir(storage, name)):
            debris.append(name)
    return debris


def is_empty_dir(storage: Storage, name: str) -> bool:
    """Whether ``name`` is a directory holding nothing (a save that failed right after creating
    it, before its ``UNCOMMITTED`` marker arrived): debris, there is nothing in it to lose."""
    try:
        return storage.isdir(name) and not storage.listdir(name)
    except CheckpointError:
        return False


def find_unknown(storage: Storage) -> list[str]:
    """Step directories without a manifest that no interrupted save or delete left (no
    ``UNCOMMITTED`` marker): a manifest deleted by hand, a copy gone wrong. Never restored and
    never deleted: a person decides (restore the manifest from a backup, or remove the folder)."""
    return sorted(
        n for n in storage.listdir("")
        if _uncommitted_step(storage, n) and not storage.exists(join(n, UNCOMMITTED)) and not is_empty_dir(storage, n)
    )


def _uncommitted_step(storage: Storage, name: str) -> bool:
    return parse_step(name) is not None and not storage.exists(join(name, MANIFEST))


def name_for(step: int) -> str:
    return checkpoint_name(step)
