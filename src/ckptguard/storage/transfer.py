"""Transfers of object stores: uploads streamed from memory, ranged reads.

Uploads: the bytes go straight into the store's upload, no local spool.

An object store's upload is retried as a unit. The spooling writer (``FsspecStorage.create``)
keeps a local copy of the file to upload it again; when the writing code can simply run again
(ckptguard's tensor files and blobs are written from host memory), streaming skips that copy: parts
go out as they fill, an attempt that fails in the store is discarded (a multipart upload is
aborted, so nothing appears) and the writing code runs again under the retry policy.

Reads: :class:`RangedReader` is a seekable file over one object whose reads are range requests.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from ckptguard.storage.base import Writer
from ckptguard.storage.retry import RetryPolicy

__all__ = ["RangedReader", "StreamWriter", "upload_streamed"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class _BodyError(Exception):
    """An error of the writing code (not of the store): raised as it is, never retried."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class StreamWriter:
    """The :class:`~ckptguard.storage.base.Writer` the writing code writes to: each write goes to
    the open upload ``f``. ``in_store``: whether a failure came from the store (retried)."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.in_store = False

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        try:
            self._f.write(view)
        except BaseException:
            self.in_store = True
            raise

    def close(self) -> None:
        """Closed by :func:`upload_streamed` once the writing code returns."""

    def abort(self) -> None:
        """Discarded by :func:`upload_streamed`."""


def _discard(f: Any, where: str) -> None:
    try:
        f.discard()  # an unfinished multipart upload is aborted; nothing was written
    except Exception as e:  # noqa: BLE001 - the attempt's own error is what is raised
        log.warning("Could not discard the unfinished upload of %s: %s", where, e)
    try:
        f.closed = True  # discarded: never flushed or completed later (fsspec closes files when collected)
    except AttributeError:
        pass


def upload_streamed(
    fs: Any,
    full: str,
    where: str,
    block_size: int,
    retry: RetryPolicy,
    body: Callable[[Writer], T],
    *,
    store_error: Callable[[Exception], Exception],
) -> T:
    """Upload ``full`` (an fsspec path; ``where`` names it in messages) with what ``body`` writes,
    in parts of ``block_size``; return ``body``'s result. A failure of the store is retried by
    ``retry`` (``body`` runs again) and, when it persists, raised as ``store_error(e)``; an error of
    ``body`` itself is raised as it is."""

    def attempt() -> T:
        f = fs.open(full, "wb", block_size=block_size)
        w = StreamWriter(f)
        try:
            out = body(w)
            w.in_store = True  # close() uploads the last part and completes the upload
            f.close()
        except BaseException as e:
            _discard(f, where)
            if not w.in_store:
                raise _BodyError(e) from e
            raise
        return out

    try:
        return retry.call(attempt, what=f"uploading {where}")
    except _BodyError as e:
        raise e.error from e.error.__cause__
    except Exception as e:
        raise store_error(e) from e


class RangedReader(io.RawIOBase):
    """A seekable read-only view of one object of ``store`` (its ``read_range(path, start, end)``,
    retried, and its ``block_size``); every ``readinto`` is one range request."""

    def __init__(self, store: Any, path: str, size: int) -> None:
        super().__init__()
        self._store = store
        self._path = path
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError(f"negative seek position {base + offset}")
        self._pos = base + offset
        return self._pos

    def readall(self) -> bytes:
        parts = []
        while self._pos < self._size:
            end = min(self._size, self._pos + self._store.block_size)
            parts.append(self._store.read_range(self._path, self._pos, end))
            self._pos = end
        return b"".join(parts)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self._size - self._pos, self._store.block_size)
        if n <= 0:
            return 0
        data = self._store.read_range(self._path, self._pos, self._pos + n)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)
