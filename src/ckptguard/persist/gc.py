"""Crash-safe garbage collection of the shared chunk packs of incremental checkpoints.

Rules (each one is what makes a crash at any instant harmless):

1. The truth is the set of committed manifests. GC reads *every* ``step-*/MANIFEST.json`` of the
   run; if any one cannot be read or validated, GC stops with a warning and deletes nothing
   (a damaged manifest may still reference packs: never delete when in doubt).
2. A pack is deleted only when no committed manifest references it, and only when its name says it
   was created before the newest commit. GC runs under the run lock on the thread that saves,
   right after a commit (and after retention deleted checkpoints), so the only save that could be
   about to reference a pack is the one that just committed; packs a concurrent writer might be
   filling are newer than every commit and are left alone. In a distributed run every rank
   writes packs (its shard file of sharded state), but only rank 0 collects, after its commit,
   and no rank writes a pack before the next save's agreement, which rank 0 joins only once its
   collection is over: the packs that exist while GC runs are those of committed checkpoints
   and those of saves that failed (referenced by nothing, deleted).
3. Checkpoints are deleted manifest first (``writer.delete_checkpoint``); packs are deleted one by
   one afterwards. A crash mid-GC leaves only unreferenced packs, which the next GC removes.
   Before the first pack is deleted, the manifests' removal is made durable: every
   ``.trash-*`` directory of the run is synced (the manifest was unlinked inside it) and then
   the run directory (a trash directory already removed). Without this, a crash could bring a
   pruned checkpoint's manifest back (and ``clean_debris`` put it back) after the pack
   deletions had reached the disk (the next save's ``objects/`` sync makes them durable).
4. A ``.trash-*`` directory that still holds a manifest is a checkpoint a killed re-save or
   delete left whole; the next save may put it back, so its packs count as referenced.
5. Only names matching ``incremental.PACK_RE`` directly under ``objects/`` are ever deleted.
6. The damage records of packs no committed manifest references (``objects/distrusted/``,
   see :mod:`ckptguard.run.trust`) are removed: no save can reference such a pack again.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Collection, Iterable

from ckptguard.errors import CheckpointError
from ckptguard.format.manifest import MANIFEST
from ckptguard.persist.incremental import (
    OBJECTS,
    PACK_RE,
    ManifestCache,
    chunk_refs,
    pack_path,
    pack_time,
)
from ckptguard.run.catalog import read_manifest
from ckptguard.run.trust import forget_distrust
from ckptguard.storage.base import Storage, join

__all__ = ["GcReport", "collect", "collect_garbage", "referenced_packs"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GcReport:
    """What a GC pass found and did. ``stopped`` names why it deleted nothing, if it stopped."""

    referenced: int
    deleted: tuple[str, ...]
    freed_bytes: int
    kept_unreferenced: tuple[str, ...]
    stopped: str = ""


def referenced_packs(storage: Storage, cache: ManifestCache | None = None) -> tuple[set[str], float]:
    """(packs referenced by committed manifests, newest commit time). Raises CheckpointError
    when any manifest cannot be read: the caller must then delete nothing."""
    packs: set[str] = set()
    newest = 0.0
    for _, manifest in (cache or ManifestCache(storage)).committed(strict=True):
        newest = max(newest, float(manifest.get("created_unix") or 0.0))
        packs.update(p for _, _, p, _ in chunk_refs(manifest))
    for name in storage.listdir(""):  # whole trash directories may be put back (rule 4)
        if name.startswith(".trash-") and storage.exists(join(name, MANIFEST)):
            try:
                packs.update(p for _, _, p, _ in chunk_refs(read_manifest(storage, name)))
            except CheckpointError as e:  # unreadable: put back, it is not a valid checkpoint
                log.info("GC: ignoring the unreadable manifest of %s (%s)", storage.describe(name), e)
    return packs, newest


def make_uncommits_durable(storage: Storage) -> None:
    """Rule 3: sync every ``.trash-*`` directory, then the run directory. Raises CheckpointError
    when the run directory cannot be synced (the caller then deletes nothing)."""
    for name in storage.listdir(""):
        if name.startswith(".trash-"):
            try:
                storage.sync_dir(name)
            except CheckpointError:  # removed meanwhile: its removal is synced with the run dir
                pass
    storage.sync_dir("")


def collect(
    storage: Storage,
    *,
    dry_run: bool = False,
    cache: ManifestCache | None = None,
    reap: Callable[..., None] | None = None,
) -> GcReport:
    """Delete packs no committed manifest references. Call only while holding the run lock.
    ``cache``: a ManifestCache of the run (re-reads only manifests that changed). ``reap``: hand
    each pack to this (``reap(path, file=True)``, a background remover) instead of deleting it
    here; safe because no later save can reference a pack no committed manifest references."""
    if not storage.exists(OBJECTS):
        return GcReport(0, (), 0, ())
    if storage.is_symlink(OBJECTS):  # another run's objects/ linked in: never delete through it
        why = (f"{storage.describe(OBJECTS)} is a symbolic link; ckptguard never deletes through a "
               "link (the packs it points at may be another run's). Copy the real folder in its place.")
        log.warning("GC of %s stopped, nothing deleted: %s", storage.describe(OBJECTS), why)
        return GcReport(0, (), 0, (), stopped=why)
    try:
        live, newest = referenced_packs(storage, cache)
    except CheckpointError as e:
        log.warning("GC of %s stopped, nothing deleted: a manifest could not be read (%s). Fix or "
                    "remove that checkpoint, then run 'ckptguard prune'.", storage.describe(OBJECTS), e)
        return GcReport(0, (), 0, (), stopped=str(e))
    doomed, kept = _unreferenced(storage, live, newest)
    if doomed and not dry_run:
        try:
            make_uncommits_durable(storage)
        except CheckpointError as e:
            log.warning("GC of %s stopped, nothing deleted: the pruned manifests' removal could not "
                        "be made durable (%s).", storage.describe(OBJECTS), e)
            return GcReport(len(live), (), 0, tuple(kept), stopped=str(e))
    remove = storage.remove_file if reap is None else functools.partial(reap, file=True)
    deleted, freed = _delete_packs(storage, doomed, None if dry_run else remove)
    if deleted:
        log.info("GC %s %d unreferenced pack(s), %d bytes", "would delete" if dry_run else "deleted", len(deleted), freed)
    if not dry_run:
        try:
            forget_distrust(storage, live)
        except CheckpointError as e:
            log.warning("GC could not list %s (%s); the next GC retries.", storage.describe(OBJECTS), e)
    return GcReport(len(live), tuple(deleted), freed, tuple(kept))


def _unreferenced(storage: Storage, live: Collection[str], newest: float) -> tuple[list[str], list[str]]:
    """(packs to delete, unreferenced packs kept because a save in progress may still commit them)."""
    doomed: list[str] = []
    kept: list[str] = []
    for name in storage.listdir(OBJECTS):
        if not PACK_RE.match(name) or name in live:
            continue
        created = pack_time(name)
        if created is None or created >= newest:
            kept.append(name)  # possibly being written by a save that has not committed yet
        else:
            doomed.append(name)
    return doomed, kept


def _delete_packs(storage: Storage, doomed: Iterable[str], remove: Callable[[str], None] | None) -> tuple[list[str], int]:
    """Delete (``remove`` None: only size) each pack; return those done and the bytes freed."""
    deleted: list[str] = []
    freed = 0
    for name in doomed:
        rel = pack_path(name)
        try:
            size = storage.size(rel)
            if remove is not None:
                remove(rel)
        except CheckpointError as e:
            log.warning("GC could not delete %s (%s); the next GC retries.", storage.describe(rel), e)
            continue
        deleted.append(name)
        freed += size
    return deleted, freed


def collect_garbage(
    storage: Storage, cache: ManifestCache | None = None, reap: Callable[..., None] | None = None
) -> GcReport | None:
    """The manager's after-commit GC (after retention): never raises a CheckpointError; a failed
    pass only leaves unreferenced packs for the next one."""
    try:
        return collect(storage, cache=cache, reap=reap)
    except CheckpointError as e:
        log.warning("GC of %s failed (%s); the next save or 'ckptguard prune' retries.", storage.describe(OBJECTS), e)
        return None
