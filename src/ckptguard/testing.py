"""Fault injection for tests: one Storage wrapper that fails, or crashes at, the k-th operation.

:class:`FaultyStorage` wraps any :class:`~ckptguard.storage.Storage` and counts the operations
that change the run (file writes, fsyncs, renames, deletes, atomic replaces...); reads are counted
too when asked for (``ops={"read"}``). The ``fail_at``-th counted operation either

* raises a realistic ``OSError`` (``EIO`` by default, or ``ENOSPC``...) translated through
  :func:`~ckptguard.storage.base.translate_os_error`, exactly as the real backend reports it
  (``sticky=True``: every later counted operation fails too, a disk that stays full); or
* with ``crash=True``, raises :class:`SimulatedCrash`, a ``BaseException``: the process "dies"
  there. No ``except Exception`` clean-up runs, every later operation that changes the storage
  raises ``SimulatedCrash`` as well, and a writer's ``abort()`` removes nothing (a dead process
  cleans nothing up). The files are left as a killed process leaves them.

Which operations count: ``ops`` names operation kinds (:data:`ALL_OPS`, plus ``"read"``) or the
storage methods themselves (:data:`CALLS`: ``"remove_tree"``, ``"sync_dir"``, a writer's
``"close"``...), and ``path``, a glob pattern (:func:`fnmatch.fnmatchcase`, ``*`` crosses ``/``),
keeps only the operations on matching paths. Every counted operation is recorded in ``log`` as an
:class:`InjectedFault`; ``count`` is how many there were since the last :meth:`FaultyStorage.arm`.

Sweep every k a save performs::

    from ckptguard.testing import FaultyStorage, count_ops

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

Crash at the 3rd deletion (or rename) of a save, or fail the first removal of a trash folder::

    FaultyStorage(LocalStorage(run), fail_at=3, ops={"delete", "rename"}, crash=True)
    FaultyStorage(LocalStorage(run), fail_at=1, ops={"remove_tree"}, path=".trash-*")

The wrapper holds no state a checkpoint depends on; it only forwards, counts and fails.
"""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import os
import signal
from collections.abc import Callable, Iterable, Sequence
from typing import Any, BinaryIO

from ckptguard.storage.base import PositionalWriter, Storage, Writer, translate_os_error

__all__ = [
    "ALL_OPS", "CALLS", "FaultyPositionalWriter", "FaultyStorage", "FaultyWriter", "InjectedFault", "KillAt", "SimulatedCrash",
    "count_ops", "unwrap",
]

# The operation kinds counted by default: those that change the run. "fsync" covers a writer's
# close() (durable on close) and sync_dir(); "delete" covers remove_file() and remove_tree().
ALL_OPS = frozenset({"create", "write", "fsync", "mkdir", "rename", "delete", "replace", "append"})

# Each wrapped method (the storage's, and a writer's write/pwritev/pwrite_direct/truncate/close) -> its operation kind.
CALLS: dict[str, str] = {
    "create": "create",
    "write": "write",
    "pwritev": "write",
    "pwrite_direct": "write",
    "truncate": "write",
    "close": "fsync",
    "sync_dir": "fsync",
    "makedirs": "mkdir",
    "rename_dir": "rename",
    "remove_file": "delete",
    "remove_tree": "delete",
    "replace_file": "replace",
    "append": "append",
    "read_bytes": "read",
    "open_read": "read",
}

_KINDS = ALL_OPS | {"read"}
_DOING = {  # how an error message says what the failed operation was doing ("No space left while writing ...")
    "create": "creating", "write": "writing", "fsync": "syncing", "mkdir": "creating the directory",
    "rename": "renaming", "delete": "deleting", "replace": "replacing", "append": "appending to", "read": "reading",
}


class SimulatedCrash(BaseException):
    """The process "dies" here (``FaultyStorage(..., crash=True)``): a ``BaseException``, so
    nothing that catches ``Exception`` runs after it, as after a real kill."""


@dataclasses.dataclass(frozen=True)
class InjectedFault:
    """One counted operation: its number (1-based), kind (see :data:`ALL_OPS`), path, and the
    method that performed it (``"remove_tree"``, ``"close"``...)."""

    index: int
    op: str
    path: str
    call: str = ""


class FaultyStorage:
    """Forwards to ``inner``; the ``fail_at``-th counted operation fails (or crashes).

    Args:
        inner: any Storage (``LocalStorage``, ``FsspecStorage``...).
        fail_at: 1-based number of the counted operation that fails; None never fails.
        ops: which operations are counted (and can fail): kinds of :data:`ALL_OPS` or
            ``"read"``, or method names of :data:`CALLS`; default :data:`ALL_OPS`.
        path: count only operations on paths matching this glob pattern (None: every path).
        error: the errno raised (``errno.EIO``, ``errno.ENOSPC``, ``errno.EACCES``...).
        sticky: after the first failure, every later counted operation fails as well.
        crash: raise :class:`SimulatedCrash` instead of an ``OSError``, and stay dead: every
            later change to the storage raises it too, and writers' ``abort()`` does nothing.
        plain_writers: the writers handed out offer only ``write``/``close``/``abort`` (not the
            local writer's ``pwritev`` nor its O_DIRECT path), so every byte the library writes
            goes through ``write()``, one counted operation per call.

    Example::

        fs = FaultyStorage(LocalStorage(run), fail_at=1, ops={"rename"}, sticky=True)
        with pytest.raises(StorageError):
            CheckpointManager(fs).save(1, state, force=True)
        assert fs.failed is not None and fs.failed.op == "rename"
    """

    def __init__(
        self,
        inner: Storage,
        *,
        fail_at: int | None = None,
        ops: Iterable[str] = ALL_OPS,
        path: str | None = None,
        error: int = errno.EIO,
        sticky: bool = False,
        crash: bool = False,
        plain_writers: bool = False,
    ) -> None:
        ops = frozenset(ops)
        unknown = ops - _KINDS - set(CALLS)
        if unknown:
            raise ValueError(
                f"unknown operation kinds {sorted(unknown)}; known: {sorted(_KINDS)} or the methods {sorted(CALLS)}"
            )
        if fail_at is not None and fail_at < 1:
            raise ValueError(f"fail_at counts from 1, got {fail_at}")
        self.inner = inner
        self.ops = ops
        self.path = path
        self.error = error
        self.sticky = sticky
        self.crash = crash
        self.plain_writers = plain_writers
        self.fail_at = fail_at
        self.count = 0
        self.log: list[InjectedFault] = []
        self.failed: InjectedFault | None = None
        self.dead = False

    # ---- control ------------------------------------------------------------------------------

    def arm(self, fail_at: int | None, *, error: int | None = None, sticky: bool | None = None) -> None:
        """Reset the counter and fail the ``fail_at``-th operation from now on (None: never)."""
        self.fail_at = fail_at
        self.count = 0
        self.log = []
        self.failed = None
        self.dead = False
        if error is not None:
            self.error = error
        if sticky is not None:
            self.sticky = sticky

    def counts(self, call: str, path: str) -> bool:
        """Whether the operation ``call`` (a method of :data:`CALLS`, or a kind) on ``path`` is counted."""
        if CALLS.get(call, call) not in self.ops and call not in self.ops:
            return False
        return self.path is None or fnmatch.fnmatchcase(path, self.path)

    def tick(self, call: str, path: str) -> None:
        """Count one operation (``call``: a method of :data:`CALLS`, or an operation kind); raise
        the injected fault when its turn has come. Subclasses may extend it (e.g. to kill the
        process instead)."""
        op = CALLS.get(call, call)
        if op not in _KINDS:
            raise ValueError(f"unknown operation {call!r}; known: {sorted(CALLS)} or {sorted(_KINDS)}")
        if self.dead and op != "read":
            raise SimulatedCrash(f"{call} {path} after the crash")  # a dead process changes nothing more
        if not self.counts(call, path):
            return
        self.count += 1
        event = InjectedFault(self.count, op, path, call)
        self.log.append(event)
        due = self.fail_at is not None and (
            self.count == self.fail_at or (self.sticky and self.count > self.fail_at)
        )
        if not due:
            return
        if self.failed is None:
            self.failed = event
        if self.crash:
            self.dead = True
            raise SimulatedCrash(f"crash at {op} #{self.count} ({call} {path})")
        err = OSError(self.error, os.strerror(self.error), self.inner.describe(path))
        where = f"{self.inner.describe(path)} (injected fault #{self.count})"
        raise translate_os_error(err, where, _DOING[op]) from err

    # ---- Storage protocol ---------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.inner.url

    @property
    def atomic_rename(self) -> bool:
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
        self.tick("read_bytes", path)
        return self.inner.read_bytes(path)

    def open_read(self, path: str) -> BinaryIO:
        self.tick("open_read", path)
        return self.inner.open_read(path)

    def create(self, path: str) -> FaultyWriter:
        self.tick("create", path)
        inner = self.inner.create(path)
        if isinstance(inner, PositionalWriter) and not self.plain_writers:
            return FaultyPositionalWriter(self, inner, path)
        return FaultyWriter(self, inner, path)

    def makedirs(self, path: str) -> None:
        self.tick("makedirs", path)
        self.inner.makedirs(path)

    def rename_dir(self, src: str, dst: str) -> None:
        self.tick("rename_dir", dst)
        self.inner.rename_dir(src, dst)

    def sync_dir(self, path: str) -> None:
        self.tick("sync_dir", path)
        self.inner.sync_dir(path)

    def remove_file(self, path: str) -> None:
        self.tick("remove_file", path)
        self.inner.remove_file(path)

    def remove_tree(self, path: str) -> None:
        self.tick("remove_tree", path)
        self.inner.remove_tree(path)

    def append(self, path: str, data: bytes) -> None:
        self.tick("append", path)
        self.inner.append(path, data)

    def replace_file(self, path: str, data: bytes) -> None:
        self.tick("replace_file", path)
        self.inner.replace_file(path, data)


class FaultyWriter:
    """A Writer whose ``write()`` and ``close()`` (the fsync) are counted operations."""

    def __init__(self, owner: FaultyStorage, inner: Writer, path: str) -> None:
        self.owner = owner
        self.inner = inner
        self.name = path

    def write(self, data: memoryview | bytes) -> None:
        self.owner.tick("write", self.name)
        self.inner.write(data)

    def close(self) -> None:
        self.owner.tick("close", self.name)
        self.inner.close()

    def abort(self) -> None:
        if not self.owner.dead:  # a dead process cleans nothing up
            self.inner.abort()


class FaultyPositionalWriter(FaultyWriter):
    """The writer of a backend whose writers also write at offsets (:class:`PositionalWriter`,
    e.g. the local disk's parallel and ``O_DIRECT`` writes): ``pwritev``, ``pwrite_direct`` and
    ``truncate`` are counted ``"write"`` operations too, so faults reach every byte written."""

    def __init__(self, owner: FaultyStorage, inner: PositionalWriter, path: str) -> None:
        super().__init__(owner, inner, path)
        self.positional = inner

    @property
    def path(self) -> str:
        return self.positional.path

    def pwritev(self, views: Sequence[memoryview], offset: int) -> None:
        self.owner.tick("pwritev", self.name)
        self.positional.pwritev(views, offset)

    def truncate(self, size: int) -> None:
        self.owner.tick("truncate", self.name)
        self.positional.truncate(size)

    def open_direct(self) -> bool:
        return self.positional.open_direct()

    def pwrite_direct(self, data: memoryview, offset: int) -> bool:
        self.owner.tick("pwrite_direct", self.name)
        return self.positional.pwrite_direct(data, offset)


def count_ops(storage: FaultyStorage, action: Callable[[], Any]) -> int:
    """Run ``action`` with faults disarmed; return how many counted operations it performed."""
    storage.arm(None)
    action()
    return storage.count


def unwrap(storage: Storage) -> Storage:
    """The innermost storage behind wrappers that expose ``.inner`` (FaultyStorage...)."""
    seen = 0
    while hasattr(storage, "inner") and seen < 16:
        storage = storage.inner
        seen += 1
    return storage


class KillAt(FaultyStorage):
    """Counts like :class:`FaultyStorage`; the process SIGKILLs itself just before its ``k``-th
    counted operation (a real kill, in a child process: nothing after it runs, no ``finally``);
    ``k=None`` never."""

    def __init__(self, inner: Any, k: int | None, **counting: Any) -> None:
        super().__init__(inner, **counting)  # e.g. path="*step-*": count only those operations
        self.k = k

    def tick(self, op: str, path: str) -> None:
        super().tick(op, path)
        if self.count == self.k:
            os.kill(os.getpid(), signal.SIGKILL)
