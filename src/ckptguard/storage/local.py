"""Local filesystem storage: fsync on every file, atomic directory rename, parent fsync'd.

Reads trust nothing about the file found at a path (a run may come from a tar extracted as
root): :func:`open_regular` opens only a regular file, never through a symbolic link, never
blocking on a FIFO and never opening a device at all, so no read can hang or stream forever.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import logging
import os
import shutil
import stat
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from ckptguard.errors import UnsafeCheckpointError
from ckptguard.storage.base import translate_os_error

log = logging.getLogger(__name__)

__all__ = ["LocalStorage", "LocalWriter", "open_regular"]

_KINDS = (
    (stat.S_ISLNK, "symbolic link"), (stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory"),
)


def _not_regular(display: str, mode: int) -> UnsafeCheckpointError:
    kind = next((name for test, name in _KINDS if test(mode)), "special file")
    return UnsafeCheckpointError(
        f"{display} is a {kind}, not a regular file; refusing to open it (ckptguard never "
        "follows links inside a run, nor opens pipes or devices, which could hang or never end). "
        "The run was altered (e.g. by a tar extracted as root): move that entry away.",
        path=display,
    )


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _clear_nonblock(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)


def open_regular(path: str, display: str, flags: int = os.O_RDONLY, doing: str = "opening") -> int:
    """Open ``path`` only as a regular file, never through a symlink; return the fd.

    ``lstat`` first (a device is never opened: opening one can have effects), then an open
    with ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO swapped in meanwhile cannot block it), then
    ``fstat`` must show the same regular file. ``flags`` with ``O_CREAT`` may create it.
    Raises UnsafeCheckpointError for anything else, the library's storage errors for missing
    or unreadable files.
    """
    try:
        before: os.stat_result | None = os.lstat(path)
    except FileNotFoundError as e:
        if not flags & os.O_CREAT:
            raise translate_os_error(e, display, doing) from e
        before = None
    except OSError as e:
        raise translate_os_error(e, display, doing) from e
    if before is not None and not stat.S_ISREG(before.st_mode):
        raise _not_regular(display, before.st_mode)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO):  # became a symlink / a FIFO without reader
            raise _not_regular(display, stat.S_IFLNK if e.errno == errno.ELOOP else stat.S_IFIFO) from e
        raise translate_os_error(e, display, doing) from e
    try:
        now = os.fstat(fd)
        swapped = before is not None and (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino)
        if not stat.S_ISREG(now.st_mode) or swapped:
            raise _not_regular(display, now.st_mode if not stat.S_ISREG(now.st_mode) else stat.S_IFLNK)
        _clear_nonblock(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


class LocalWriter:
    """Writes a file with ``os.write``; ``close()`` fsyncs. Partial writes are retried.

    Also a :class:`~ckptguard.storage.base.PositionalWriter`: positional writes, and ``O_DIRECT``
    writes through a second descriptor of the same file that this writer opens and closes.
    """

    def __init__(self, path: str, display: str) -> None:
        self._path = path
        self._display = display
        self._fd: int | None = open_regular(path, display, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "creating")
        self._direct: int | None = None

    def write(self, data: memoryview | bytes) -> None:
        assert self._fd is not None, "write after close"
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        try:
            while len(view):
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError as e:
            raise translate_os_error(e, self._display, "writing") from e

    def pwrite(self, data: memoryview | bytes, offset: int) -> None:
        """Positional write, used by parallel writers that know every offset in advance."""
        assert self._fd is not None, "write after close"
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
        try:
            while len(view):
                n = os.pwrite(self._fd, view, offset)
                view = view[n:]
                offset += n
        except OSError as e:
            raise translate_os_error(e, self._display, "writing") from e

    def pwritev(self, views: Sequence[memoryview], offset: int) -> None:
        """Positional gathered write of several buffers (one syscall when the kernel takes all)."""
        assert self._fd is not None, "write after close"
        pending = [v.cast("B") if v.format != "B" or v.ndim != 1 else v for v in views if len(v)]
        try:
            while pending:
                n = os.pwritev(self._fd, pending, offset)
                offset += n
                while pending and n >= len(pending[0]):
                    n -= len(pending[0])
                    pending.pop(0)
                if n:
                    pending[0] = pending[0][n:]
        except OSError as e:
            raise translate_os_error(e, self._display, "writing") from e

    def truncate(self, size: int) -> None:
        """Set the file's size (after padded O_DIRECT writes)."""
        assert self._fd is not None, "write after close"
        try:
            os.ftruncate(self._fd, size)
        except OSError as e:
            raise translate_os_error(e, self._display, "writing") from e

    @property
    def path(self) -> str:
        """The file's local path (for messages)."""
        return self._path

    def open_direct(self) -> bool:
        """Open the file a second time with ``O_DIRECT`` (closed by ``close``/``abort``)."""
        assert self._fd is not None, "write after close"
        flag = getattr(os, "O_DIRECT", 0)
        if self._direct is None and flag:
            try:
                self._direct = os.open(self._path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW | flag)
            except OSError as e:  # tmpfs, some overlays: the caller writes buffered
                self._direct = None
                log.info("Cannot open %s with O_DIRECT (%s); writing buffered.", self._display, e)
            else:
                if not self._same_file(self._direct):
                    self._close_direct()
        return self._direct is not None

    def _same_file(self, fd: int) -> bool:
        assert self._fd is not None
        a, b = os.fstat(fd), os.fstat(self._fd)
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def pwrite_direct(self, data: memoryview, offset: int) -> bool:
        """One aligned ``O_DIRECT`` write (partial writes retried); False when refused (EINVAL)."""
        assert self._direct is not None, "open_direct first"
        view = data
        try:
            while len(view):
                n = os.pwrite(self._direct, view, offset)
                view, offset = view[n:], offset + n
        except OSError as e:
            if e.errno == errno.EINVAL:
                return False
            raise translate_os_error(e, self._display, "writing") from e
        return True

    def _close_direct(self) -> None:
        if self._direct is not None:
            fd, self._direct = self._direct, None
            with contextlib.suppress(OSError):
                os.close(fd)

    def close(self) -> None:
        self._close_direct()
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.fsync(fd)
        except OSError as e:
            os.close(fd)
            raise translate_os_error(e, self._display, "syncing") from e
        os.close(fd)

    def abort(self) -> None:
        self._close_direct()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        with contextlib.suppress(OSError):
            os.unlink(self._path)


class LocalStorage:
    """A run directory on a local (POSIX) filesystem."""

    atomic_rename = True

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)

    def __repr__(self) -> str:
        return f"LocalStorage({self.url!r})"

    def _p(self, path: str) -> str:
        return str(self.root / path) if path else str(self.root)

    def describe(self, path: str) -> str:
        return self._p(path)

    def exists(self, path: str) -> bool:
        return os.path.lexists(self._p(path))

    def isdir(self, path: str) -> bool:
        return os.path.isdir(self._p(path))

    def is_symlink(self, path: str) -> bool:
        return os.path.islink(self._p(path))

    def listdir(self, path: str) -> list[str]:
        try:
            return sorted(os.listdir(self._p(path)))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as e:
            raise translate_os_error(e, self._p(path), "listing") from e

    def size(self, path: str) -> int:
        try:
            return os.stat(self._p(path)).st_size
        except OSError as e:
            raise translate_os_error(e, self._p(path), "reading the size of") from e

    def mtime(self, path: str) -> float | None:
        try:
            return os.stat(self._p(path)).st_mtime
        except OSError:
            return None

    def _open_inside(self, path: str) -> int:
        """open_regular, refusing also a symlinked directory between the run root and the file
        (``objects/`` or ``step-N/dcp`` pointing elsewhere): nothing read leaves the run."""
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            sub = self._p("/".join(parts[:i]))
            if os.path.islink(sub):
                raise _not_regular(sub, stat.S_IFLNK)
        return open_regular(self._p(path), self._p(path))

    def read_bytes(self, path: str) -> bytes:
        """The file's bytes as long as it was when opened (a regular file only, see
        :func:`open_regular`; callers that cap sizes check ``size()`` first)."""
        fd = self._open_inside(path)
        try:
            with os.fdopen(fd, "rb", buffering=0) as f:
                left = os.fstat(f.fileno()).st_size
                parts: list[bytes] = []
                while left > 0:
                    part = f.read(min(left, 1 << 30))
                    if not part:
                        break
                    parts.append(part)
                    left -= len(part)
        except OSError as e:
            raise translate_os_error(e, self._p(path), "reading") from e
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def open_read(self, path: str) -> BinaryIO:
        fd = self._open_inside(path)
        return os.fdopen(fd, "rb", buffering=0)  # caller closes

    def create(self, path: str) -> LocalWriter:
        return LocalWriter(self._p(path), self._p(path))

    def makedirs(self, path: str) -> None:
        """Create ``path`` and its parents. Creating the run directory itself (or its parents)
        is made durable here (each new directory's parent fsync'd); directories inside the run
        become durable with the writer's ``sync_dir`` calls (see the storage module)."""
        target = Path(self._p(path))
        created = list(itertools.takewhile(lambda d: not os.path.lexists(d), (target, *target.parents)))
        try:
            os.makedirs(target, exist_ok=True)
            for d in created:
                if d == self.root or d in self.root.parents:
                    _fsync_dir(str(d.parent))
        except OSError as e:
            raise translate_os_error(e, self._p(path), "creating the directory") from e

    def rename_dir(self, src: str, dst: str) -> None:
        try:
            os.rename(self._p(src), self._p(dst))
        except OSError as e:
            raise translate_os_error(e, self._p(dst), "renaming into place") from e

    def sync_dir(self, path: str) -> None:
        try:
            fd = os.open(self._p(path), os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            raise translate_os_error(e, self._p(path), "opening the directory") from e
        try:
            os.fsync(fd)
        except OSError as e:
            raise translate_os_error(e, self._p(path), "syncing the directory") from e
        finally:
            os.close(fd)

    def remove_file(self, path: str) -> None:
        try:
            os.unlink(self._p(path))
        except FileNotFoundError:
            return
        except OSError as e:
            raise translate_os_error(e, self._p(path), "deleting") from e

    def remove_tree(self, path: str) -> None:
        target = self._p(path)
        if os.path.islink(target):
            self.remove_file(path)
            return
        if not os.path.exists(target):
            return
        try:
            shutil.rmtree(target)
        except FileNotFoundError:
            return
        except OSError as e:
            raise translate_os_error(e, target, "deleting") from e

    def append(self, path: str, data: bytes) -> None:
        target = self._p(path)
        fd = open_regular(target, target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, "opening for append")
        try:
            view = memoryview(data)
            while len(view):
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as e:
            raise translate_os_error(e, target, "appending to") from e
        finally:
            os.close(fd)

    def replace_file(self, path: str, data: bytes) -> None:
        target = self._p(path)
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        w = LocalWriter(tmp, target)
        try:
            w.write(data)
            w.close()
            os.replace(tmp, target)
        except OSError as e:
            w.abort()
            raise translate_os_error(e, target, "replacing") from e
        except BaseException:
            w.abort()
            raise
        self.sync_dir(os.path.dirname(path))
