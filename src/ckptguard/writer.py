"""Writing one checkpoint with the commit-last protocol.

Local filesystems (``storage.atomic_rename``)::

    RUN/.tmp-step-000001200-<id>/   every file written and fsync'd, MANIFEST.json last,
                                    the directory fsync'd
    rename -> RUN/step-000001200/   atomic; RUN fsync'd

Object stores: files go straight into ``RUN/step-000001200/``; the manifest, written last, is the
commit marker (a re-save of an existing step first deletes the old manifest, uncommitting it).

A failure at any point leaves either the previous state or debris; never a torn checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

from ckptguard.catalog import find_debris
from ckptguard.errors import CheckpointError
from ckptguard.manifest import FORMAT, FORMAT_VERSION, MANIFEST, checkpoint_name
from ckptguard.storage.base import Storage, Writer, join
from ckptguard.tensorfile import digest_bytes, write_tensor_file

__all__ = ["FileWriters", "clean_debris", "delete_checkpoint", "write_checkpoint", "write_file"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# A writer of one tensor file: (storage, relpath, tensors) -> manifest entry. Incremental saves
# and parallel writers plug in here.
TensorFileWriter = Callable[[Storage, str, Mapping[str, torch.Tensor]], dict[str, Any]]


def write_file(storage: Storage, rel: str, body: Callable[[Writer], T]) -> T:
    """Create ``rel``, let ``body`` write it, close (durable); on any failure abort and re-raise."""
    w = storage.create(rel)
    try:
        out = body(w)
        w.close()
    except BaseException:
        w.abort()
        raise
    return out


def write_local_tensor_file(storage: Storage, rel: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    return write_file(storage, rel, lambda w: write_tensor_file(w, tensors))


def write_blob(storage: Storage, rel: str, data: bytes) -> dict[str, Any]:
    write_file(storage, rel, lambda w: w.write(data))
    return {"kind": "blob", "size": len(data), "xxh3_128": digest_bytes(data)}


FileWriters = dict[str, TensorFileWriter]


def write_checkpoint(
    storage: Storage,
    step: int,
    tensor_files: Mapping[str, Mapping[str, torch.Tensor]],
    blobs: Mapping[str, bytes],
    fields: Mapping[str, Any],
    *,
    tensor_writer: TensorFileWriter = write_local_tensor_file,
) -> dict[str, Any]:
    """Write and commit one checkpoint; return its manifest.

    ``fields`` are extra manifest fields (metrics, environment, reason...). Raises a
    CheckpointError subclass on failure, after removing what it wrote when it can.
    """
    name = checkpoint_name(step)
    t0 = time.perf_counter()
    staging = f".tmp-{name}-{uuid.uuid4().hex[:8]}" if storage.atomic_rename else name
    if not storage.atomic_rename and storage.exists(join(name, MANIFEST)):
        storage.remove_file(join(name, MANIFEST))  # uncommit the old one before overwriting
    try:
        storage.makedirs(staging)
        files: dict[str, Any] = {}
        for fname, tensors in tensor_files.items():
            files[fname] = tensor_writer(storage, join(staging, fname), tensors)
        for fname, data in blobs.items():
            files[fname] = write_blob(storage, join(staging, fname), data)
        now = time.time()
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": int(step),
            "name": name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            "created_unix": now,
            "checksum": "xxh3-128",
            **fields,
            "files": files,
        }
        manifest["save_seconds"] = round(time.perf_counter() - t0 + float(fields.get("save_seconds", 0.0)), 6)
        write_blob(storage, join(staging, MANIFEST), json.dumps(manifest, indent=1, sort_keys=False).encode())
        storage.sync_dir(staging)
        if storage.atomic_rename:
            trash = None
            if storage.exists(name):
                trash = f".trash-{name}-{uuid.uuid4().hex[:8]}"
                storage.rename_dir(name, trash)
            storage.rename_dir(staging, name)
            storage.sync_dir("")
            if trash is not None:
                _remove_quietly(storage, trash)
    except BaseException:
        if storage.atomic_rename:
            _remove_quietly(storage, staging)
        raise
    return manifest


def _remove_quietly(storage: Storage, rel: str) -> None:
    try:
        storage.remove_tree(rel)
    except (CheckpointError, OSError) as e:
        log.warning("Could not remove %s (%s); the next save or 'ckptguard prune' retries.", storage.describe(rel), e)


def delete_checkpoint(storage: Storage, name: str) -> None:
    """Uncommit first (remove the manifest), then delete the rest: a crash leaves only debris."""
    if storage.atomic_rename:
        trash = f".trash-{name}-{uuid.uuid4().hex[:8]}"
        storage.rename_dir(name, trash)
        storage.sync_dir("")
        storage.remove_tree(trash)
    else:
        storage.remove_file(join(name, MANIFEST))
        storage.remove_tree(name)


def clean_debris(storage: Storage) -> list[str]:
    """Remove leftovers of interrupted saves and deletes. Call only while holding the run lock."""
    removed = []
    for name in find_debris(storage):
        try:
            storage.remove_tree(name)
            removed.append(name)
        except (CheckpointError, OSError) as e:
            log.warning("Could not remove debris %s: %s", storage.describe(name), e)
    return removed
