"""The lock file of a local run (``flock``): opened safely, never inherited by children.

The kernel drops an ``flock`` when the last descriptor of its open file closes, so a forked child
would keep a killed writer's lock (DataLoader workers outlive a SIGKILLed trainer by seconds):
the descriptor is close-on-exec, and :func:`keep_from_children` closes it in every child forked
from Python (``os.register_at_fork``). Used by :class:`ckptguard.run.lock.RunLock`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from typing import Any

from ckptguard.errors import StorageError
from ckptguard.run.lockholder import parse_record
from ckptguard.storage.base import translate_os_error

__all__ = ["RECORD_MAX", "close_quietly", "forget_in_children", "keep_from_children", "open_lock_file", "read_fd_record"]

RECORD_MAX = 64 * 1024  # the most of a lock record ever read

_FORK_GUARD = threading.Lock()
_CLOSE_IN_CHILD: set[int] = set()
_HOOKED = False


def _close_lock_fds_in_child() -> None:
    for fd in list(_CLOSE_IN_CHILD):
        with contextlib.suppress(OSError):
            os.close(fd)  # the parent's descriptor stays open: the parent keeps its lock
    _CLOSE_IN_CHILD.clear()


def keep_from_children(fd: int) -> None:
    """Close ``fd`` in every child this process forks from now on (until :func:`forget_in_children`)."""
    global _HOOKED
    with _FORK_GUARD:
        if not _HOOKED:
            os.register_at_fork(after_in_child=_close_lock_fds_in_child)
            _HOOKED = True
        _CLOSE_IN_CHILD.add(fd)


def forget_in_children(fd: int) -> None:
    """``fd`` is about to be closed by its owner: children forked later need not close it."""
    _CLOSE_IN_CHILD.discard(fd)


def open_lock_file(path: str) -> int:
    """Open (create) the lock file ``path``: a regular file, never a symlink; StorageError otherwise."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):  # a symlink, a directory, a socket
            raise StorageError(
                f"{path} is not a regular file ({e.strerror}); ckptguard keeps its run lock there. "
                "Remove it (no ckptguard process needs it) and retry."
            ) from e
        raise translate_os_error(e, path, "creating the run lock") from e
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise StorageError(
            f"{path} is not a regular file (mode {stat.filemode(mode)}); ckptguard keeps its run lock "
            "there. Remove it (no ckptguard process needs it) and retry."
        )
    return fd


def read_fd_record(fd: int) -> dict[str, Any] | None:
    """The lock record in the open lock file ``fd`` (None when unreadable or being written)."""
    try:
        return parse_record(os.pread(fd, RECORD_MAX, 0))
    except OSError:
        return None


def close_quietly(fd: int, owner: int) -> None:
    """Finalizer of a RunLock dropped without release(): close its descriptor (in its owner)."""
    if os.getpid() == owner and fd in _CLOSE_IN_CHILD:
        _CLOSE_IN_CHILD.discard(fd)
        with contextlib.suppress(OSError):
            os.close(fd)
