"""Writing one checkpoint with the commit-last protocol.

Local filesystems (``storage.atomic_rename``)::

    RUN/.tmp-step-000001200-<id>/   every file written and fsync'd, MANIFEST.json last,
                                    the directory fsync'd
    rename -> RUN/step-000001200/   atomic; RUN fsync'd

Object stores: files go straight into ``RUN/step-000001200/``, after an ``UNCOMMITTED`` marker (so
a crash leaves recognisable debris); the manifest, written last, is the commit marker, then the
marker goes (a re-save of an existing step first deletes the old manifest, uncommitting it).
When the manifest's upload fails in a way that leaves its arrival unknown (a connection reset
after the request was sent), the manifest is read back before anything is reported: there and
equal means committed (success), absent means not committed (the error is raised). If the store
cannot tell, the manifest is removed so the answer becomes "not committed"; only when that fails
too does the save raise :class:`~ckptguard.errors.CommitUnknownError`.

A failure at any point leaves either the previous state or debris; never a torn checkpoint.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ckptguard.errors import CheckpointError, CheckpointNotFoundError, CommitUnknownError, StorageUnavailableError
from ckptguard.format.manifest import FORMAT, FORMAT_VERSION, MANIFEST, checkpoint_name, encode_manifest, parse_step
from ckptguard.format.tensorfile import digest_bytes
from ckptguard.persist.parallel_io import TensorSink, stream_tensor_file, write_file
from ckptguard.run.catalog import UNCOMMITTED, find_debris, find_unknown, is_empty_dir
from ckptguard.storage.base import Storage, join

if TYPE_CHECKING:  # tensors arrive from callers; pruning imports no torch
    import torch

__all__ = [
    "FileWriters", "begin_checkpoint", "clean_debris", "commit_manifest", "commit_staged", "delete_checkpoint",
    "write_checkpoint", "write_file",
]

log = logging.getLogger(__name__)


def write_blob(storage: Storage, rel: str, data: bytes) -> dict[str, Any]:
    write_file(storage, rel, lambda w: w.write(data))
    return {"kind": "blob", "size": len(data), "xxh3_128": digest_bytes(data)}


FileWriters = dict[str, TensorSink]


def begin_checkpoint(storage: Storage, step: int) -> str:
    """Create the place a checkpoint's files go before the commit; return its run-relative name.

    Distributed saves call this on rank 0 and share the name, so every rank writes its files
    into it before rank 0 commits with ``write_checkpoint(..., staging=name, written=...)``.
    """
    name = checkpoint_name(step)
    if (
        storage.isdir(name) and not storage.exists(join(name, MANIFEST))
        and not storage.exists(join(name, UNCOMMITTED)) and not is_empty_dir(storage, name)
    ):
        _keep_unknown(storage, name)  # one directory's check, not a listing of the run
    staging = f".tmp-{name}-{uuid.uuid4().hex[:8]}" if storage.atomic_rename else name
    storage.makedirs(staging)
    if not storage.atomic_rename:
        _mark_uncommitted(storage, name, b"save\n")
        if storage.exists(join(name, MANIFEST)):
            storage.remove_file(join(name, MANIFEST))  # uncommit the old one before overwriting
    return staging


def _keep_unknown(storage: Storage, name: str) -> None:
    """A save of step N meets a ``step-N/`` without manifest that no interrupted save left (its
    manifest deleted by hand): never overwrite it. Local: move it aside; object stores: refuse."""
    if not storage.atomic_rename:
        raise CheckpointError(
            f"{storage.describe(name)} exists without {MANIFEST} and was not left by an interrupted "
            "save; saving this step would overwrite its files. Put its manifest back from a "
            "backup, or move or delete the folder, then save again."
        )
    kept = f"kept-{name}-{uuid.uuid4().hex[:8]}"
    storage.rename_dir(name, kept)
    storage.sync_dir("")
    log.warning(
        "%s had no %s (deleted by hand?); saving step %s again, so it was moved to %s, untouched.",
        storage.describe(name), MANIFEST, parse_step(name), storage.describe(kept),
    )


def _mark_uncommitted(storage: Storage, name: str, what: bytes) -> None:
    """Object stores: say that ``name`` is being written or deleted, before it has (or after it
    lost) its manifest, so that an interruption leaves debris, not an unknown directory."""
    write_file(storage, join(name, UNCOMMITTED), lambda w: w.write(what))


def write_checkpoint(
    storage: Storage,
    step: int,
    tensor_files: Mapping[str, Mapping[str, torch.Tensor]],
    blobs: Mapping[str, bytes],
    fields: Mapping[str, Any],
    *,
    tensor_writer: TensorSink = stream_tensor_file,
    staging: str | None = None,
    written: Mapping[str, Mapping[str, Any]] | None = None,
    before_commit: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Write and commit one checkpoint; return its manifest.

    ``fields`` are extra manifest fields (metrics, environment, reason...). ``staging`` and
    ``written`` (manifest entries of files other processes already wrote into ``staging``) come
    from a distributed save (see :func:`begin_checkpoint`). ``before_commit`` runs right before the
    manifest is written and stops the save by raising (the run lock's last check). Raises a
    CheckpointError subclass on failure, after removing what it wrote when it can.
    """
    name = checkpoint_name(step)
    t0 = time.perf_counter()
    try:
        if staging is None:
            staging = begin_checkpoint(storage, step)
        files: dict[str, Any] = {k: dict(v) for k, v in (written or {}).items()}
        for fname, tensors in tensor_files.items():
            files[fname] = tensor_writer(storage, join(staging, fname), tensors)
        for fname, data in blobs.items():
            files[fname] = write_blob(storage, join(staging, fname), data)
        finish = getattr(tensor_writer, "finish", None)
        if finish is not None:  # e.g. incremental saves: sync the shared objects once
            finish(storage)
        manifest = _manifest(step, fields, files, time.perf_counter() - t0)
        if before_commit is not None:
            before_commit()
        commit_staged(storage, name, staging, manifest)
    except BaseException:
        if storage.atomic_rename and staging is not None:
            _remove_quietly(storage, staging)
        raise
    return manifest


def _manifest(step: int, fields: Mapping[str, Any], files: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The manifest of a checkpoint whose files are written (``seconds`` it took, plus any
    ``save_seconds`` the caller spent before)."""
    now = time.time()
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "name": checkpoint_name(step),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        "created_unix": now,
        "checksum": "xxh3-128",
        **fields,
        "files": files,
    }
    manifest["save_seconds"] = round(seconds + float(fields.get("save_seconds", 0.0)), 6)
    return manifest


def commit_staged(storage: Storage, name: str, staging: str, manifest: dict[str, Any]) -> None:
    """Commit the checkpoint whose files are in ``staging`` (from :func:`begin_checkpoint`):
    write the manifest last; local: rename ``staging`` to ``name`` (an old checkpoint of the
    step goes to the trash first and comes back if the rename fails); object stores: the
    manifest is the commit, then the UNCOMMITTED marker goes."""
    if storage.atomic_rename:
        write_blob(storage, join(staging, MANIFEST), encode_manifest(manifest))
    else:
        commit_manifest(storage, join(staging, MANIFEST), encode_manifest(manifest))
    storage.sync_dir(staging)
    if not storage.atomic_rename:
        try:  # committed: the marker only matters without a manifest
            storage.remove_file(join(name, UNCOMMITTED))
        except (CheckpointError, OSError) as e:
            log.info("Could not remove %s: %s", storage.describe(join(name, UNCOMMITTED)), e)
        return
    trash = None
    if storage.exists(name):
        trash = f".trash-{name}-{uuid.uuid4().hex[:8]}"
        storage.rename_dir(name, trash)
    try:
        storage.rename_dir(staging, name)
    except BaseException:
        if trash is not None:  # put the old checkpoint of this step back
            _rename_quietly(storage, trash, name)
        raise
    storage.sync_dir("")
    if trash is not None:
        _remove_quietly(storage, trash, uncommit=True)


def commit_manifest(storage: Storage, rel: str, raw: bytes) -> None:
    """Write the commit marker of a store without atomic renames; settle an unknown outcome.

    Returns only when the manifest is stored (read back if its upload failed); raises when it is
    not; raises :class:`CommitUnknownError` only when the store can neither confirm nor undo it.
    """
    w = storage.create(rel)
    try:
        w.write(raw)
        w.close()
        return
    except StorageUnavailableError as e:  # the request may have landed before the failure
        failure = e
    except BaseException:  # refused or failed before sending: surely not stored
        w.abort()
        raise
    where = storage.describe(rel)
    try:
        stored = storage.read_bytes(rel)
    except CheckpointNotFoundError:
        raise failure from failure.__cause__  # never arrived: nothing committed, the upload's error stands
    except CheckpointError as e:
        unreadable: CheckpointError = e
    else:
        if stored == raw:
            log.warning("The upload of %s reported %s, but the manifest arrived whole: the checkpoint is committed.", where, failure)
            return
        log.warning("%s holds another manifest than this save's after a failed upload; leaving it.", where)
        raise failure
    try:
        storage.remove_file(rel)  # make the outcome known: not committed
    except CheckpointError as e:
        raise CommitUnknownError(
            f"The manifest {where} was sent, but the store failed before confirming it ({failure}); "
            f"reading it back failed ({unreadable}) and so did removing it ({e}). The checkpoint "
            "is committed, and whole, exactly if that manifest exists: run 'ckptguard ls' on the run "
            "once the store answers. The next save continues either way.",
            url=where,
        ) from failure
    log.warning("Could not tell whether %s arrived (%s); removed it: the checkpoint is not committed.", where, unreadable)
    raise failure


def _rename_quietly(storage: Storage, src: str, dst: str) -> None:
    try:
        storage.rename_dir(src, dst)
    except (CheckpointError, OSError) as e:
        log.warning("Could not move %s back to %s: %s", storage.describe(src), storage.describe(dst), e)


def _remove_quietly(storage: Storage, rel: str, *, uncommit: bool = False) -> None:
    try:
        if storage.is_symlink(rel):  # a link put in the run by hand: never delete through it
            storage.remove_file(rel)
            return
        if uncommit:  # a trash dir that keeps its manifest is whole and gets put back
            storage.remove_file(join(rel, MANIFEST))
        storage.remove_tree(rel)
    except (CheckpointError, OSError) as e:
        log.warning("Could not remove %s (%s); the next save or 'ckptguard prune' retries.", storage.describe(rel), e)


def _put_back(storage: Storage, name: str) -> bool:
    """A ``.trash-step-N-*`` that still has its manifest and no ``step-N`` beside it is whole: the
    old checkpoint of a re-save killed between its two renames (or a delete killed before it
    uncommitted). Rename it back instead of deleting it. True for every whole one: one whose
    rename back fails is left as it is (never deleted as debris) for the next save or prune."""
    if not (storage.atomic_rename and name.startswith(".trash-")):
        return False
    original = name[len(".trash-") :].rsplit("-", 1)[0]
    if parse_step(original) is None or storage.exists(original) or not storage.exists(join(name, MANIFEST)):
        return False
    try:
        storage.rename_dir(name, original)
        storage.sync_dir("")
    except (CheckpointError, OSError) as e:
        log.warning(
            "Could not move %s back to %s (left whole; the next save or 'ckptguard prune' retries): %s",
            storage.describe(name), original, e,
        )
        return True
    log.info(
        "Put %s back as %s: a save replacing it or a delete was interrupted (retention decides "
        "again whether to keep it).", name, original,
    )
    return True


def delete_checkpoint(storage: Storage, name: str, *, reap: Callable[[str], None] | None = None) -> None:
    """Uncommit first (remove the manifest), then delete the rest: a crash leaves only debris.

    ``reap``: hand the uncommitted leftover (a path under the run) to this instead of removing
    it here, e.g. a :class:`~ckptguard.persist.background.Reaper` that frees the bytes in the background.
    Either way the checkpoint is gone from every listing when this returns.
    """
    remove = reap if reap is not None else storage.remove_tree
    if storage.is_symlink(name):  # a link to a folder elsewhere (another run's checkpoint?): the
        storage.remove_file(name)  # link goes, never a file through it
        storage.sync_dir("")
        return
    if storage.atomic_rename:
        trash = f".trash-{name}-{uuid.uuid4().hex[:8]}"
        storage.rename_dir(name, trash)
        storage.sync_dir("")
        storage.remove_file(join(trash, MANIFEST))  # a trash dir with a manifest is whole
        remove(trash)
    else:
        _mark_uncommitted(storage, name, b"delete\n")
        storage.remove_file(join(name, MANIFEST))
        remove(name)


def clean_debris(storage: Storage) -> list[str]:
    """Remove leftovers of interrupted saves and deletes. Call only while holding the run lock."""
    removed = []
    for name in find_debris(storage):
        if _put_back(storage, name):
            continue
        try:
            (storage.remove_tree if storage.isdir(name) else storage.remove_file)(name)
            removed.append(name)
        except (CheckpointError, OSError) as e:
            log.warning("Could not remove debris %s: %s", storage.describe(name), e)
    for name in find_unknown(storage):
        log.warning(
            "%s has no %s and was not left by an interrupted save: kept, not restored. Put its "
            "manifest back from a backup, or delete the folder by hand if it is not needed.",
            storage.describe(name), MANIFEST,
        )
    return removed
