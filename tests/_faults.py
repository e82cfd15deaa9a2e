"""A storage wrapper that simulates a crash at the k-th write or the k-th delete (incremental/GC
fault-injection tests). Named apart from ckptguard.testing.FaultyStorage to avoid clashes."""

from __future__ import annotations

from typing import Any

WRITE_OPS = frozenset({"create", "write", "close", "replace_file", "append"})
DELETE_OPS = frozenset({"remove_file", "remove_tree", "rename_dir"})


class SimulatedCrash(BaseException):
    """The process 'dies' here: nothing after this point runs (not even cleanup handlers that
    catch Exception)."""


class _CountingWriter:
    def __init__(self, inner: Any, owner: CrashingStorage) -> None:
        self._inner = inner
        self._owner = owner

    def write(self, data: Any) -> None:
        self._owner._tick("write")
        self._inner.write(data)

    def close(self) -> None:
        self._owner._tick("close")
        self._inner.close()

    def abort(self) -> None:
        if not self._owner.dead:  # a dead process cleans nothing up
            self._inner.abort()


class CrashingStorage:
    """Delegates to ``inner``; counts write and delete operations; raises SimulatedCrash when the
    ``crash_at``-th operation of kind ``kind`` ("write" or "delete") is about to happen."""

    def __init__(self, inner: Any, kind: str = "delete", crash_at: int | None = None) -> None:
        self._inner = inner
        self._ops = WRITE_OPS if kind == "write" else DELETE_OPS
        self.crash_at = crash_at
        self.count = 0
        self.dead = False
        self.url = inner.url
        self.atomic_rename = inner.atomic_rename

    def _tick(self, op: str) -> None:
        if self.dead:
            raise SimulatedCrash(f"{op} after the crash")  # a dead process changes nothing more
        if op in self._ops:
            self.count += 1
            if self.crash_at is not None and self.count == self.crash_at:
                self.dead = True
                raise SimulatedCrash(f"crash at {op} #{self.count}")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in WRITE_OPS | DELETE_OPS:
            return attr

        def op(*args: Any, **kw: Any) -> Any:
            self._tick(name)
            out = attr(*args, **kw)
            return _CountingWriter(out, self) if name == "create" else out

        return op

    # the Storage protocol, spelled out so isinstance(…, Storage) holds
    def describe(self, path: str) -> str: return self._inner.describe(path)  # noqa: E704
    def exists(self, path: str) -> bool: return self._inner.exists(path)  # noqa: E704
    def isdir(self, path: str) -> bool: return self._inner.isdir(path)  # noqa: E704
    def is_symlink(self, path: str) -> bool: return self._inner.is_symlink(path)  # noqa: E704
    def listdir(self, path: str) -> list[str]: return self._inner.listdir(path)  # noqa: E704
    def size(self, path: str) -> int: return self._inner.size(path)  # noqa: E704
    def mtime(self, path: str) -> float | None: return self._inner.mtime(path)  # noqa: E704
    def read_bytes(self, path: str) -> bytes: return self._inner.read_bytes(path)  # noqa: E704
    def open_read(self, path: str) -> Any: return self._inner.open_read(path)  # noqa: E704
    def makedirs(self, path: str) -> None: self._inner.makedirs(path)  # noqa: E704
    def sync_dir(self, path: str) -> None: self._inner.sync_dir(path)  # noqa: E704
