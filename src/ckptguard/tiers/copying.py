"""Copying a committed checkpoint from one tier to another: the same checkpoint, never re-captured.

``copy_checkpoint(src, name, dst)`` checks every byte of ``src/name`` against its manifest first
(a damaged hot copy is never spread to the durable tier), streams each file into ``dst`` (object
stores: straight into the upload) and commits with the same protocol as a save: files first, the
same MANIFEST.json last. An interruption leaves debris in ``dst`` that the next save there cleans,
never a torn checkpoint.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from typing import Any

from ckptguard.errors import CheckpointError, CorruptCheckpointError, StorageError, StorageUnavailableError
from ckptguard.format.manifest import MANIFEST, parse_step
from ckptguard.persist.parallel_io import write_file
from ckptguard.persist.reader import verify_files
from ckptguard.persist.writer import begin_checkpoint, commit_staged
from ckptguard.run.catalog import read_manifest
from ckptguard.storage.base import Storage, Writer, join

__all__ = ["copy_checkpoint", "remove_root", "same_checkpoint"]

log = logging.getLogger(__name__)

CHUNK = 8 * 1024 * 1024


def same_checkpoint(a: Storage, b: Storage, name: str) -> bool:
    """Whether ``b`` holds the committed checkpoint ``name`` with the same manifest as ``a``.
    A manifest that is absent or damaged is not the same; a read the store failed (a network cut)
    is no answer: its :class:`StorageError` propagates."""
    try:
        return read_manifest(b, name) == read_manifest(a, name)
    except StorageError:
        raise
    except CheckpointError:
        return False


def _check_replaceable(dst: Storage, name: str) -> None:
    """Raise when ``dst`` may hold ``name`` committed but its manifest cannot be read: beginning
    the step again would uncommit it (object stores delete the manifest first), and a copy cut
    after that would leave ``dst`` without a checkpoint it had."""
    try:
        read_manifest(dst, name)
    except StorageError as e:
        why = (f"{dst.describe(name)} may hold a committed checkpoint whose manifest could not be read ({e}); it is "
               "not overwritten: the copy is tried again later.")
        if isinstance(e, StorageUnavailableError):
            raise StorageUnavailableError(why, url=e.url, attempts=e.attempts) from e
        raise StorageError(why) from e
    except CheckpointError:
        return  # absent or damaged: nothing a copy could lose


def _pump(src: Storage, rel: str, w: Writer) -> int:
    n = 0
    with src.open_read(rel) as f:
        while True:
            chunk = f.read(CHUNK)
            if not chunk:
                return n
            w.write(chunk)
            n += len(chunk)


def copy_checkpoint(
    src: Storage, name: str, dst: Storage, *, before_commit: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Copy the committed checkpoint ``name`` from ``src`` to ``dst``; return its seconds and bytes.
    ``before_commit`` runs right before the manifest is written (the run lock's check).

    Raises :class:`CorruptCheckpointError` when ``src``'s copy fails its checksums (nothing is
    written to ``dst``), another :class:`CheckpointError` when ``dst`` fails (its debris is cleaned
    by the next save there), a :class:`StorageError` before anything is written when ``dst``'s
    manifest of ``name`` cannot be read (a committed checkpoint there is never uncommitted blindly).
    """
    t0 = time.perf_counter()
    manifest = read_manifest(src, name)
    if any("chunks" in entry for entry in manifest["files"].values()):
        raise CheckpointError(f"{src.describe(name)} is an incremental checkpoint; tiers copy whole checkpoints only.")
    problems = verify_files(src, name, manifest)
    if problems:
        raise CorruptCheckpointError(
            f"{src.describe(name)} fails its checksums ({problems[0][1]}); not copied to {dst.url}.",
            path=src.describe(name), file=problems[0][0],
        )
    step = parse_step(name)
    assert step is not None
    _check_replaceable(dst, name)
    staging = begin_checkpoint(dst, step)
    copied = 0
    try:
        for fname in manifest["files"]:
            rel = join(name, fname)
            if "/" in fname:  # a sharded checkpoint's dcp/ files
                dst.makedirs(join(staging, fname.rsplit("/", 1)[0]))

            def body(w: Writer, rel: str = rel) -> int:
                return _pump(src, rel, w)

            copied += write_file(dst, join(staging, fname), body)
        if before_commit is not None:
            before_commit()
        commit_staged(dst, name, staging, dict(manifest))
    except BaseException:
        if dst.atomic_rename:
            try:
                dst.remove_tree(staging)
            except (CheckpointError, OSError) as e:
                log.info("Could not remove %s: %s", dst.describe(staging), e)
        raise
    seconds = time.perf_counter() - t0
    log.info("Copied %s to %s (%.1f MB in %.3fs)", src.describe(name), dst.describe(name), copied / 1e6, seconds)
    return {"seconds": seconds, "bytes": copied + len(MANIFEST)}


def remove_root(path: str) -> None:
    """Remove a tier's directory tree (the hot tier's memory) quietly."""
    shutil.rmtree(path, ignore_errors=True)
