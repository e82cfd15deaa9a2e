"""How far the shared data of incremental checkpoints is trusted: only as far as it was checked.

Incremental checkpoints reference chunks in shared packs (``RUN/objects/p-*.pack``, see
:mod:`ckptguard.persist.incremental`). Damage to one pack must not spread to checkpoints saved after it,
so three facts are kept and checked here:

- **Packs exist with the size the manifests recorded.** :class:`PackStats` stats each pack once
  (per listing or per save); a checkpoint whose packs are missing or of another size is not valid
  (``ckptguard ls``, retention, ``restore``), and no save references such a pack again.
- **A chunk that failed a check is never referenced again**, even after every checkpoint that
  referenced it was pruned. Each finding (restore, ``verify``, the probe's read-back, a save's
  own re-read) is one small record in the run, versioned JSON, one file per finding so that
  concurrent readers and the writer never lose each other's records::

      RUN/objects/distrusted/p-<ms>-<hex>.pack@<offset>.json   one chunk failed its digest
      RUN/objects/distrusted/p-<ms>-<hex>.pack.json            the whole pack (missing, wrong size)
      {"format": "ckptguard-distrust", "version": 1, "pack": ..., "offset": <int|null>,
       "digest": <hex|null>, "reason": "...", "time": <unix s>}

  The file *name* is the record (the body is for people), so a damaged body still distrusts.
  GC removes the records of a pack when no committed manifest references it any more (no save
  can reference it again: saves find chunks only through committed manifests).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any, BinaryIO

from ckptguard.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, StorageUnavailableError
from ckptguard.format.manifest import PACK_RE
from ckptguard.storage.base import Storage, join

__all__ = [
    "DISTRUST_DIR",
    "OBJECTS",
    "PACK_RE",
    "Distrust",
    "PackStats",
    "forget_distrust",
    "new_pack_name",
    "pack_path",
    "pack_time",
    "read_full",
    "pack_problems",
    "read_distrust",
    "record_distrust",
    "UNREADABLE",
    "is_read_failure",
]

log = logging.getLogger(__name__)

OBJECTS = "objects"
DISTRUST_DIR = f"{OBJECTS}/distrusted"  # run-relative paths always use "/"
RECORD_RE = re.compile(r"^(p-\d{13}-[0-9a-f]{8}\.pack)(?:@(\d{1,15}))?\.json$")
RECORD_FORMAT = "ckptguard-distrust"
RECORD_VERSION = 1
# A pack the storage could not stat (a path part that is a file, permissions, an I/O error): not
# evidence about its bytes, so a checkpoint is skipped for it, never marked corrupt.
UNREADABLE = "could not be read"


def is_read_failure(problem: str) -> bool:
    """Whether a problem of :func:`pack_problems` is a read failure rather than byte evidence."""
    return f" {UNREADABLE} (" in problem


def pack_path(name: str) -> str:
    """The run-relative path of a pack; refuses any name that is not a pack name."""
    if not isinstance(name, str) or not PACK_RE.match(name):
        raise CorruptCheckpointError(f"refusing object name {name!r}: not a ckptguard pack name.")
    return join(OBJECTS, name)


def pack_time(name: str) -> float | None:
    """Creation time (unix seconds) encoded in a pack name, or None for other names."""
    m = PACK_RE.match(name)
    return int(m.group(1)) / 1000.0 if m else None


def new_pack_name() -> str:
    return f"p-{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}.pack"


def read_full(fh: BinaryIO, view: memoryview) -> int:
    """Read into all of ``view`` (short only at the end of the file); return the bytes read."""
    pos = 0
    while pos < len(view):
        n = fh.readinto(view[pos:])  # type: ignore[attr-defined]
        if not n:
            break
        pos += n
    return pos


@dataclasses.dataclass(frozen=True)
class Distrust:
    """Pack locations that failed a check: whole packs, and (pack, offset) chunks."""

    packs: frozenset[str] = frozenset()
    chunks: frozenset[tuple[str, int]] = frozenset()

    def bad(self, pack: str, offset: int) -> bool:
        return pack in self.packs or (pack, offset) in self.chunks


def record_name(pack: str, offset: int | None) -> str:
    if not PACK_RE.match(pack):
        raise ValueError(f"not a pack name: {pack!r}")
    return f"{pack}.json" if offset is None else f"{pack}@{int(offset)}.json"


def read_distrust(storage: Storage) -> Distrust:
    """Every finding recorded in the run (names only; other files are ignored)."""
    packs: set[str] = set()
    chunks: set[tuple[str, int]] = set()
    try:
        names = storage.listdir(DISTRUST_DIR)
    except CheckpointError as e:
        log.warning("Could not list %s (%s); findings recorded there are not applied.", storage.describe(DISTRUST_DIR), e)
        names = []
    for name in names:
        m = RECORD_RE.match(name)
        if m is None:
            continue
        if m.group(2) is None:
            packs.add(m.group(1))
        else:
            chunks.add((m.group(1), int(m.group(2))))
    return Distrust(frozenset(packs), frozenset(chunks))


def record_distrust(
    storage: Storage, pack: str, offset: int | None, *, digest: str | None = None, reason: str = ""
) -> bool:
    """Durably record that a chunk (``offset``) or a whole pack (``offset=None``) failed a check.
    Best effort (a read-only run only logs it); returns whether the record is durable."""
    rel = join(DISTRUST_DIR, record_name(pack, offset))
    body = {
        "format": RECORD_FORMAT, "version": RECORD_VERSION, "pack": pack, "offset": offset,
        "digest": digest, "reason": reason[:2000], "time": time.time(),
    }
    try:
        if storage.exists(rel):
            return True
        created = not storage.exists(DISTRUST_DIR)
        storage.makedirs(DISTRUST_DIR)
        if created:
            storage.sync_dir(OBJECTS)
        storage.replace_file(rel, json.dumps(body, indent=1).encode())
        storage.sync_dir(DISTRUST_DIR)
    except CheckpointError as e:
        log.warning("Could not record that %s failed a check (%s): %s", storage.describe(rel), reason, e)
        return False
    log.warning("Recorded %s: no later save references %s again.", storage.describe(rel),
                f"that chunk of {pack}" if offset is not None else pack)
    return True


def forget_distrust(storage: Storage, keep_packs: set[str]) -> list[str]:
    """Remove the records of packs not in ``keep_packs`` (those no committed manifest
    references). Call under the run lock (GC)."""
    removed = []
    for name in storage.listdir(DISTRUST_DIR):
        m = RECORD_RE.match(name)
        if m is None or m.group(1) in keep_packs:
            continue
        try:
            storage.remove_file(join(DISTRUST_DIR, name))
            removed.append(name)
        except CheckpointError as e:
            log.warning("Could not remove %s (%s); the next GC retries.", storage.describe(join(DISTRUST_DIR, name)), e)
    return removed


class PackStats:
    """Pack sizes as stored, each pack stat'ed once (per listing, or per save)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._sizes: dict[str, int | None | str] = {}
        self._distrust: Distrust | None = None

    @property
    def distrust(self) -> Distrust:
        if self._distrust is None:
            self._distrust = read_distrust(self.storage)
        return self._distrust

    def problem(self, pack: str, expected: int) -> str | None:
        """None when ``pack`` exists with ``expected`` bytes; else what is wrong with it."""
        if pack not in self._sizes:
            try:
                self._sizes[pack] = self.storage.size(join(OBJECTS, pack))
            except CheckpointNotFoundError:
                self._sizes[pack] = None
            except StorageUnavailableError:
                raise  # the network, not the data: a checkpoint is not called invalid for it
            except CheckpointError as e:
                self._sizes[pack] = f"{UNREADABLE} ({e})"
        got = self._sizes[pack]
        if got is None:
            return f"shared pack objects/{pack} is missing"
        if isinstance(got, str):
            return f"shared pack objects/{pack} {got}"
        if got != expected:
            return f"shared pack objects/{pack} is {got} bytes, the manifest recorded {expected}"
        return None

    def missing_or_resized(self, pack: str, expected: int) -> bool:
        """True only on evidence (missing, other size); False also when the stat failed."""
        p = self.problem(pack, expected)
        return p is not None and not isinstance(self._sizes.get(pack), str)


def pack_problems(manifest: Mapping[str, Any], stats: PackStats) -> list[str]:
    """Problems of a validated manifest's shared data: missing or resized packs, and chunks a
    check found damaged (recorded). Entries without ``packs`` (plain files) have none."""
    problems: list[str] = []
    distrust = stats.distrust
    for fname, entry in manifest["files"].items():
        packs = entry.get("packs")
        if not isinstance(packs, dict):
            continue
        for pack, size in packs.items():
            p = stats.problem(pack, size)
            if p is not None:
                problems.append(f"{fname}: {p}")
        if not (distrust.packs or distrust.chunks):
            continue
        for tname, info in entry["tensors"].items():
            bad = next((c for c in info["chunks"] if distrust.bad(c["pack"], c["offset"])), None)
            if bad is not None:
                problems.append(
                    f"{fname}: tensor {tname!r} references a chunk that failed a check (objects/"
                    f"{bad['pack']} at offset {bad['offset']}, recorded in {DISTRUST_DIR}/)"
                )
    return problems
