"""Fault injection for tests: a Storage wrapper that fails the k-th operation.

:class:`FaultyStorage` wraps any :class:`~ckptguard.storage.Storage` and counts the operations
that change the run (file writes, fsyncs, renames, deletes, atomic replaces...). The ``fail_at``-th
counted operation raises a realistic ``OSError`` (``EIO`` by default, or ``ENOSPC``...) translated
through :func:`~ckptguard.storage.base.translate_os_error`, exactly as the real backend reports it.
With ``sticky=True`` every later operation fails too (a disk that stays full).

Sweep every k a save performs::

    fs = FaultyStorage(LocalStorage("runs/a"))
    mgr = CheckpointManager(fs)
    mgr.save(1, state, force=True)            # a good checkpoint to fall back to
    n = count_ops(fs, lambda: mgr.save(2, state, force=True))
    for k in range(1, n + 1):
        ...fresh copy of the run...
        fs.arm(k)
        with pytest.raises(CheckpointError):
            mgr.save(2, state, force=True)
        assert mgr.restore(state) == 1

The wrapper holds no state a checkpoint depends on; it only forwards, counts and fails.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

from ckptguard.storage.base import Storage, Writer, translate_os_error

__all__ = ["ALL_OPS", "FaultyStorage", "FaultyWriter", "InjectedFault", "count_ops"]

# What FaultyStorage counts. "fsync" covers a writer's close() (durable on close) and sync_dir().
ALL_OPS = frozenset({"create", "write", "fsync", "mkdir", "rename", "delete", "replace", "append"})


@dataclasses.dataclass(frozen=True)
class InjectedFault:
    """One counted operation: its number (1-based), kind and path."""

    index: int
    op: str
    path: str


class FaultyStorage:
    """Forwards to ``inner``; the ``fail_at``-th counted operation raises.

    Args:
        inner: any Storage (``LocalStorage``, ``FsspecStorage``...).
        fail_at: 1-based number of the counted operation that fails; None never fails.
        ops: which operation kinds are counted (and can fail); default :data:`ALL_OPS`.
        error: the errno raised (``errno.EIO``, ``errno.ENOSPC``, ``errno.EACCES``...).
        sticky: after the first failure, every later counted operation fails as well.
    """

    def __init__(
        self,
        inner: Storage,
        *,
        fail_at: int | None = None,
        ops: Iterable[str] = ALL_OPS,
        error: int = errno.EIO,
        sticky: bool = False,
    ) -> None:
        unknown = set(ops) - ALL_OPS
        if unknown:
            raise ValueError(f"unknown operation kinds {sorted(unknown)}; known: {sorted(ALL_OPS)}")
        if fail_at is not None and fail_at < 1:
            raise ValueError(f"fail_at counts from 1, got {fail_at}")
        self.inner = inner
        self.ops = frozenset(ops)
        self.error = error
        self.sticky = sticky
        self.fail_at = fail_at
        self.count = 0
        self.log: list[InjectedFault] = []
        self.failed: InjectedFault | None = None

    # ---- control ------------------------------------------------------------------------------

    def arm(self, fail_at: int | None, *, error: int | None = None, sticky: bool | None = None) -> None:
        """Reset the counter and fail the ``fail_at``-th operation from now on (None: never)."""
        self.fail_at = fail_at
        self.count = 0
        self.log = []
        self.failed = None
        if error is not None:
            self.error = error
        if sticky is not None:
            self.sticky = sticky

    def tick(self, op: str, path: str) -> None:
        """Count one operation; raise the injected error when its turn has come."""
        if op not in self.ops:
            return
        self.count += 1
        event = InjectedFault(self.count, op, path)
        self.log.append(event)
        due = self.fail_at is not None and (
            self.count == self.fail_at or (self.sticky and self.count > self.fail_at)
        )
        if due:
            if self.failed is None:
                self.failed = event
            err = OSError(self.error, os.strerror(self.error), self.inner.describe(path))
            raise translate_os_error(err, self.inner.describe(path), f"{op} (injected fault #{self.count})") from err

    # ---- Storage protocol ---------------------------------------------------------------------

    @property
    def url(self) -> str:  # type: ignore[override]
        return self.inner.url

    @property
    def atomic_rename(self) -> bool:  # type: ignore[override]
        return self.inner.atomic_rename

    def __repr__(self) -> str:
        return f"FaultyStorage({self.inner!r}, fail_at={self.fail_at})"

    def describe(self, path: str) -> str:
        return self.inner.describe(path)

    def exists(self, path: str) -> bool:
        return self.inner.exists(path)

    def isdir(self, path: str) -> bool:
        return self.inner.isdir(path)

    def is_symlink(self, path: str) -> bool:
        return self.inner.is_symlink(path)

    def listdir(self, path: str) -> list[str]:
        return self.inner.listdir(path)

    def size(self, path: str) -> int:
        return self.inner.size(path)

    def mtime(self, path: str) -> float | None:
        return self.inner.mtime(path)

    def read_bytes(self, path: str) -> bytes:
        return self.inner.read_bytes(path)

    def open_read(self, path: str) -> BinaryIO:
        return self.inner.open_read(path)

    def create(self, path: str) -> FaultyWriter:
        self.tick("create", path)
        return FaultyWriter(self, self.inner.create(path), path)

    def makedirs(self, path: str) -> None:
        self.tick("mkdir", path)
        self.inner.makedirs(path)

    def rename_dir(self, src: str, dst: str) -> None:
        self.tick("rename", dst)
        self.inner.rename_dir(src, dst)

    def sync_dir(self, path: str) -> None:
        self.tick("fsync", path)
        self.inner.sync_dir(path)

    def remove_file(self, path: str) -> None:
        self.tick("delete", path)
        self.inner.remove_file(path)

    def remove_tree(self, path: str) -> None:
        self.tick("delete", path)
        self.inner.remove_tree(path)

    def append(self, path: str, data: bytes) -> None:
        self.tick("append", path)
        self.inner.append(path, data)

    def replace_file(self, path: str, data: bytes) -> None:
        self.tick("replace", path)
        self.inner.replace_file(path, data)


class FaultyWriter:
    """A Writer whose write() and close() (the fsync) are counted operations."""

    def __init__(self, owner: FaultyStorage, inner: Writer, path: str) -> None:
        self._owner = owner
        self._inner = inner
        self._path = path

    def write(self, data: memoryview | bytes) -> None:
        self._owner.tick("write", self._path)
        self._inner.write(data)

    def close(self) -> None:
        self._owner.tick("fsync", self._path)
        self._inner.close()

    def abort(self) -> None:
        self._inner.abort()

    def __getattr__(self, name: str) -> Any:  # pwrite and other extras of the real writer
        attr = getattr(self._inner, name)
        if name != "pwrite":
            return attr

        def pwrite(data: memoryview | bytes, offset: int) -> None:
            self._owner.tick("write", self._path)
            attr(data, offset)

        return pwrite


def count_ops(storage: FaultyStorage, action: Callable[[], Any]) -> int:
    """Run ``action`` with faults disarmed; return how many counted operations it performed."""
    storage.arm(None)
    action()
    return storage.count


def unwrap(storage: Storage) -> Storage:
    """The innermost storage behind wrappers that expose ``.inner`` (FaultyStorage...)."""
    seen = 0
    while hasattr(storage, "inner") and seen < 16:
        storage = storage.inner  # type: ignore[attr-defined]
        seen += 1
    return storage
