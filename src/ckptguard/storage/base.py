"""The storage seam: the few primitives a backend implements, and how the manager uses them.

Paths are relative to the run root and always use ``/``. The writer of a checkpoint calls, in
this order::

    storage.makedirs(tmp)                      # staging place (a temp dir, or the final dir)
    w = storage.create(f"{tmp}/model.safetensors"); w.write(...); w.close()   # durable on close
    ...every data file...
    w = storage.create(f"{tmp}/MANIFEST.json"); ...; w.close()                  # commit marker last
    storage.sync_dir(tmp)
    storage.rename_dir(tmp, final); storage.sync_dir("")                        # atomic_rename only

Backends that cannot rename a directory atomically (object stores) set ``atomic_rename = False``;
the writer then writes straight into the final directory and the manifest, written last, is the
commit marker. Readers never trust a directory without a manifest that checks out.

Every backend passes the same conformance suite (``tests/test_storage_conformance.py``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
from collections.abc import Sequence
from typing import BinaryIO, Protocol, runtime_checkable

from ckptguard.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DiskFullError,
    StorageError,
    StoragePermissionError,
)

__all__ = [
    "ConditionalWrites", "EmulatedConditionalWrites", "PositionalWriter", "Storage", "Writer", "content_version", "join",
    "read_capped", "translate_os_error",
]


@runtime_checkable
class Writer(Protocol):
    """A file being written. ``close()`` makes it durable (fsync / upload complete)."""

    def write(self, data: memoryview | bytes) -> None: ...

    def close(self) -> None: ...

    def abort(self) -> None:
        """Drop what was written; never raises."""
        ...


@runtime_checkable
class PositionalWriter(Writer, Protocol):
    """A Writer that can also write at given offsets: what parallel tensor-file writes need.

    Optional: a backend's writer offers it by having these members (``LocalWriter`` does; object
    stores' writers do not, and tensor files go to them as one stream). Checked with
    ``isinstance(w, PositionalWriter)``. ``close()`` still makes the whole file durable, whichever
    way its bytes were written.
    """

    @property
    def path(self) -> str:
        """Where the file is, for messages."""
        ...

    def pwritev(self, views: Sequence[memoryview], offset: int) -> None:
        """Write ``views`` back to back from ``offset`` (the file grows as needed)."""
        ...

    def truncate(self, size: int) -> None:
        """Set the file's size (after writes padded to whole pages)."""
        ...

    def open_direct(self) -> bool:
        """Prepare :meth:`pwrite_direct` (a second handle on this file that bypasses the page
        cache, ``O_DIRECT``); False where the OS or the filesystem refuses it."""
        ...

    def pwrite_direct(self, data: memoryview, offset: int) -> bool:
        """Write ``data`` (page-aligned memory, a multiple of 4096 bytes) at ``offset`` (a
        multiple of 4096) bypassing the page cache; False when the filesystem refuses such a
        write (nothing of it counts: write those bytes with :meth:`pwritev` instead). Other
        failures raise the library's storage errors."""
        ...


@runtime_checkable
class Storage(Protocol):
    """Primitive operations every backend provides. See the module docstring for the call order."""

    url: str
    atomic_rename: bool

    def describe(self, path: str) -> str:
        """A human-readable location for messages (absolute path or URL)."""
        ...

    def exists(self, path: str) -> bool: ...

    def isdir(self, path: str) -> bool: ...

    def is_symlink(self, path: str) -> bool: ...

    def listdir(self, path: str) -> list[str]:
        """Names (not paths) directly under ``path``; empty when it does not exist."""
        ...

    def size(self, path: str) -> int: ...

    def mtime(self, path: str) -> float | None: ...

    def read_bytes(self, path: str) -> bytes:
        """The whole file. Only a regular file is read (never a FIFO or a device, never through
        a symbolic link on local disks); files of a run are read with :func:`read_capped`."""
        ...

    def open_read(self, path: str) -> BinaryIO:
        """A seekable binary file object supporting ``readinto`` (a regular file only)."""
        ...

    def create(self, path: str) -> Writer:
        """Create ``path`` for writing (replacing a leftover file of that name)."""
        ...

    def makedirs(self, path: str) -> None: ...

    def rename_dir(self, src: str, dst: str) -> None:
        """Atomically rename a directory (only when ``atomic_rename``)."""
        ...

    def sync_dir(self, path: str) -> None:
        """Make directory entries under ``path`` durable (no-op where meaningless)."""
        ...

    def remove_file(self, path: str) -> None: ...

    def remove_tree(self, path: str) -> None: ...

    def append(self, path: str, data: bytes) -> None:
        """Append durably (read-modify-write where the backend has no append)."""
        ...

    def replace_file(self, path: str, data: bytes) -> None:
        """Atomically replace a small file (temp + rename, or a single PUT)."""
        ...


def join(*parts: str) -> str:
    """Join run-relative path parts with ``/``, dropping empty parts."""
    return posixpath.join(*[p for p in parts if p]) if any(parts) else ""


def read_capped(storage: Storage, path: str, limit: int, what: str) -> bytes:
    """Read a whole file of a run that is never larger than ``limit`` bytes when ckptguard wrote
    it (``what`` names the kind, e.g. "a manifest"). Its size (a local ``stat``, an object
    store's listed size) is checked before a byte is read, so a huge or endless file costs
    nothing; the backend reads regular files only."""
    where = storage.describe(path)
    size = storage.size(path)
    if size <= limit:
        data = storage.read_bytes(path)
        if len(data) <= limit:
            return data
        size = len(data)  # it grew in between
    raise CorruptCheckpointError(
        f"{where} is {size} bytes, more than the {limit} bytes {what} may have; ckptguard never "
        "writes one so large, so it is damaged or was not written by ckptguard. It was not "
        "read: move it out of the run (or restore it from a backup).",
        path=where,
        file=posixpath.basename(path),
    )


def _out_of_inodes(where: str) -> bool:
    """True when ``where`` is a local path on a filesystem with free bytes but no free inodes."""
    if "://" in where:
        return False
    probe = os.path.abspath(where)
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        st = os.statvfs(probe)
    except OSError:
        return False
    return st.f_files > 0 and st.f_favail == 0 and st.f_bavail > 0


def translate_os_error(err: OSError, where: str, doing: str) -> Exception:
    """Map an OSError to the library's hierarchy, with the path and the next step."""
    code = err.errno
    if code == errno.ENOSPC and _out_of_inodes(where):
        return DiskFullError(
            f"No free inodes left while {doing} {where}: the filesystem still has free space, but "
            "every file needs an inode and all are used ('df -i' shows them). Delete files on that "
            "filesystem (many small files, old runs, debris 'ckptguard prune' removes) or point the "
            "run at a filesystem with free inodes; checkpoints already saved are untouched."
        )
    if code in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(
            f"No space left while {doing} {where}: {err.strerror}. Free space or point the run at "
            "a larger volume; checkpoints already saved are untouched."
        )
    if code in (errno.EACCES, errno.EPERM):
        return StoragePermissionError(
            f"Permission denied while {doing} {where}. Check the owner and mode of that path "
            "(or run with a user that may write there)."
        )
    if code == errno.EROFS:
        return StoragePermissionError(
            f"Read-only filesystem while {doing} {where}. Point the run directory at a writable "
            "location; reading and restoring still work."
        )
    if code == errno.ENOENT:
        return CheckpointNotFoundError(
            f"No such file or directory while {doing} {where}. Check the path; did the run "
            "directory move?"
        )
    if code == errno.ENOTDIR:
        return StorageError(
            f"Not a directory while {doing} {where}: a part of that path is a file. Point the run "
            "at a directory (or move the file away)."
        )
    return StorageError(f"I/O error while {doing} {where}: {err}. Check the storage and retry.")


@runtime_checkable
class ConditionalWrites(Protocol):
    """Compare-and-swap on one small object: the primitive of the object-store run lock.

    Optional: backends that have it say so by providing these members (``FsspecStorage`` does;
    local runs lock with ``flock``). A *version* is an opaque token that changes with every write
    (the S3 ETag; a content digest elsewhere). ``conditional_writes_atomic`` is True when the
    store itself decides the condition (S3 ``If-None-Match``/``If-Match``; ``memory://`` under one
    process-wide lock); False when it is emulated by a read before the write, which two writers
    can both pass, so the caller must read back what it wrote (see ckptguard.run.lock).
    """

    conditional_writes_atomic: bool

    def read_versioned(self, path: str) -> tuple[bytes, str] | None:
        """The object's bytes and version, read together; None when it does not exist."""
        ...

    def write_if(self, path: str, data: bytes, *, expect: str | None) -> str | None:
        """Write ``data`` only if the object's version is ``expect`` (None: only if it does not
        exist); return the new version, or None when the condition did not hold (nothing written)."""
        ...

    def remove_if(self, path: str, *, expect: str) -> bool:
        """Remove the object only if its version is ``expect``; return whether it was removed."""
        ...


def content_version(data: bytes) -> str:
    """A version token for stores without one of their own: a digest of the content."""
    return hashlib.sha256(data).hexdigest()[:32]


class EmulatedConditionalWrites:
    """Conditional writes over any Storage: read, compare, write. Not atomic (two writers can both
    pass the compare): callers read back what they wrote."""

    conditional_writes_atomic = False

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def read_versioned(self, path: str) -> tuple[bytes, str] | None:
        if not self.storage.exists(path):
            return None
        try:
            data = self.storage.read_bytes(path)
        except CheckpointNotFoundError:  # removed since
            return None
        return data, content_version(data)

    def write_if(self, path: str, data: bytes, *, expect: str | None) -> str | None:
        current = self.read_versioned(path)
        if (current[1] if current is not None else None) != expect:
            return None
        self.storage.replace_file(path, data)
        return content_version(data)

    def remove_if(self, path: str, *, expect: str) -> bool:
        current = self.read_versioned(path)
        if current is None or current[1] != expect:
            return False
        self.storage.remove_file(path)
        return True
