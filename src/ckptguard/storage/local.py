"""Local filesystem storage: fsync on every file, atomic directory rename, parent fsync'd."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO

from ckptguard.storage.base import translate_os_error

__all__ = ["LocalStorage", "LocalWriter"]


class LocalWriter:
    """Writes a file with ``os.write``; ``close()`` fsyncs. Partial writes are retried."""

    def __init__(self, path: str, display: str) -> None:
        self._path = path
        self._display = display
        try:
            self._fd: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise translate_os_error(e, display, "creating") from e

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

    def pwritev(self, views: list[memoryview], offset: int) -> None:
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
        """The file's local path (parallel writers open it with O_DIRECT)."""
        return self._path

    def close(self) -> None:
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

    def read_bytes(self, path: str) -> bytes:
        try:
            with open(self._p(path), "rb") as f:
                return f.read()
        except OSError as e:
            raise translate_os_error(e, self._p(path), "reading") from e

    def open_read(self, path: str) -> BinaryIO:
        try:
            return open(self._p(path), "rb", buffering=0)  # noqa: SIM115 - caller closes
        except OSError as e:
            raise translate_os_error(e, self._p(path), "opening") from e

    def create(self, path: str) -> LocalWriter:
        return LocalWriter(self._p(path), self._p(path))

    def makedirs(self, path: str) -> None:
        try:
            os.makedirs(self._p(path), exist_ok=True)
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
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            raise translate_os_error(e, target, "opening for append") from e
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
