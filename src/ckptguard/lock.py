"""One writer per run: a lock that says who holds it.

Local runs use ``flock`` on ``RUN/.ckptguard.lock`` (released by the kernel when the holder dies,
so a SIGKILL never leaves a stale lock); the file records pid, host and start time for the error
message. Object stores use a lock object holding the same record; it is considered stale when its
holder is a dead process on this host or it has not been refreshed for ``stale_after`` seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import Any

from ckptguard.errors import RunLockedError
from ckptguard.storage.base import Storage
from ckptguard.storage.local import LocalStorage

__all__ = ["LOCK_NAME", "RunLock"]

LOCK_NAME = ".ckptguard.lock"


def _record() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _local_storage(storage: Storage) -> LocalStorage | None:
    """The LocalStorage behind ``storage`` (also behind wrappers exposing ``.inner``), or None."""
    for _ in range(16):
        if isinstance(storage, LocalStorage):
            return storage
        inner = getattr(storage, "inner", None)
        if inner is None:
            return None
        storage = inner
    return None


class RunLock:
    """Exclusive writer lock of a run directory. Use as a context manager or acquire()/release()."""

    def __init__(self, storage: Storage, *, stale_after: float = 600.0) -> None:
        self.storage = storage
        self.stale_after = stale_after
        self._fd: int | None = None
        self._held = False

    def _message(self, holder: dict[str, Any]) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since", 0))))
        return (
            f"{self.storage.describe('')} is being written by another live process (pid "
            f"{holder.get('pid')} on host {holder.get('host')}, since {since}). Stop that run "
            "first, or use a different run directory. Reading (ls, verify, inspect) is safe."
        )

    def acquire(self) -> None:
        if self._held:
            return
        local = _local_storage(self.storage)
        if local is not None:
            self._acquire_local(local)
        else:
            self._acquire_object()
        self._held = True

    def _acquire_local(self, storage: LocalStorage) -> None:
        import fcntl

        storage.makedirs("")
        path = storage.describe(LOCK_NAME)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            from ckptguard.storage.base import translate_os_error

            raise translate_os_error(e, path, "creating the run lock") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except (OSError, ValueError):
                holder = {}
            os.close(fd)
            raise RunLockedError(self._message(holder)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_record()).encode(), 0)
        self._fd = fd

    def _acquire_object(self) -> None:
        if self.storage.exists(LOCK_NAME):
            try:
                holder = json.loads(self.storage.read_bytes(LOCK_NAME).decode())
            except (ValueError, UnicodeDecodeError, OSError):
                holder = {}
            fresh = time.time() - float(holder.get("since", 0)) < self.stale_after
            same_host = holder.get("host") == socket.gethostname()
            alive = _alive(int(holder["pid"])) if same_host and "pid" in holder else fresh
            if alive and holder.get("pid") != os.getpid():
                raise RunLockedError(self._message(holder))
        self.storage.replace_file(LOCK_NAME, json.dumps(_record()).encode())

    def refresh(self) -> None:
        """Keep an object-store lock fresh (called at every save)."""
        if self._held and _local_storage(self.storage) is None:
            self.storage.replace_file(LOCK_NAME, json.dumps(_record()).encode())

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None
        else:
            with contextlib.suppress(Exception):
                self.storage.remove_file(LOCK_NAME)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
