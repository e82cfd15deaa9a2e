"""Object stores and other fsspec filesystems: the manifest, written last, is the commit marker.

Object stores cannot rename a directory atomically, so ``atomic_rename`` is False: the writer
puts every data file into the final directory first and the manifest last. A crash leaves a
directory without a manifest (debris) that readers ignore and ``prune`` removes.
"""

from __future__ import annotations

import io
import posixpath
from typing import Any, BinaryIO

from ckptguard.errors import CheckpointNotFoundError, StorageError
from ckptguard.storage.base import translate_os_error

__all__ = ["FsspecStorage"]


class _FsspecWriter:
    def __init__(self, fs: Any, path: str, display: str) -> None:
        self._fs = fs
        self._path = path
        self._display = display
        try:
            self._f = fs.open(path, "wb")
        except OSError as e:
            raise translate_os_error(e, display, "creating") from e

    def write(self, data: memoryview | bytes) -> None:
        try:
            self._f.write(data)
        except OSError as e:
            raise translate_os_error(e, self._display, "writing") from e

    def close(self) -> None:
        try:
            self._f.close()
        except OSError as e:
            raise translate_os_error(e, self._display, "uploading") from e

    def abort(self) -> None:
        try:
            discard = getattr(self._f, "discard", None)
            if discard is not None:
                discard()
            else:
                self._f.close()
        except Exception:  # noqa: BLE001 - abort never raises
            pass
        try:
            if self._fs.exists(self._path):
                self._fs.rm(self._path)
        except Exception:  # noqa: BLE001
            pass


class FsspecStorage:
    """A run directory addressed by an fsspec URL (``s3://bucket/prefix``, ``memory://x``...)."""

    atomic_rename = False

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        import fsspec

        try:
            fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        except (ImportError, ValueError) as e:
            raise StorageError(
                f"Cannot open {url!r}: {e}. Install the filesystem's package "
                "(for s3:// run 'pip install ckptguard[s3]')."
            ) from e
        self.fs = fs
        self.root = root.rstrip("/")
        self.url = url.rstrip("/")

    def __repr__(self) -> str:
        return f"FsspecStorage({self.url!r})"

    def _p(self, path: str) -> str:
        return posixpath.join(self.root, path) if path else self.root

    def describe(self, path: str) -> str:
        return posixpath.join(self.url, path) if path else self.url

    def _fresh(self, path: str) -> None:
        self.fs.invalidate_cache(self._p(path))

    def exists(self, path: str) -> bool:
        self._fresh(path)
        return bool(self.fs.exists(self._p(path)))

    def isdir(self, path: str) -> bool:
        self._fresh(path)
        return bool(self.fs.isdir(self._p(path)))

    def is_symlink(self, path: str) -> bool:
        return False

    def listdir(self, path: str) -> list[str]:
        full = self._p(path)
        self._fresh(path)
        try:
            entries = self.fs.ls(full, detail=False)
        except FileNotFoundError:
            return []
        names = []
        for e in entries:
            name = posixpath.basename(str(e).rstrip("/"))
            if name and str(e).rstrip("/") != full.rstrip("/"):
                names.append(name)
        return sorted(set(names))

    def size(self, path: str) -> int:
        try:
            return int(self.fs.size(self._p(path)))
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(f"No such object {self.describe(path)}.") from e
        except OSError as e:
            raise translate_os_error(e, self.describe(path), "reading the size of") from e

    def mtime(self, path: str) -> float | None:
        try:
            m = self.fs.modified(self._p(path))
            return float(m.timestamp())
        except Exception:  # noqa: BLE001 - not every store reports it
            return None

    def read_bytes(self, path: str) -> bytes:
        try:
            return bytes(self.fs.cat_file(self._p(path)))
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(f"No such object {self.describe(path)}.") from e
        except OSError as e:
            raise translate_os_error(e, self.describe(path), "reading") from e

    def open_read(self, path: str) -> BinaryIO:
        try:
            f = self.fs.open(self._p(path), "rb")
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(f"No such object {self.describe(path)}.") from e
        except OSError as e:
            raise translate_os_error(e, self.describe(path), "opening") from e
        if not hasattr(f, "readinto"):
            return io.BufferedReader(f)  # type: ignore[arg-type]
        return f  # type: ignore[no-any-return]

    def create(self, path: str) -> _FsspecWriter:
        return _FsspecWriter(self.fs, self._p(path), self.describe(path))

    def makedirs(self, path: str) -> None:
        try:
            self.fs.makedirs(self._p(path), exist_ok=True)
        except OSError as e:
            raise translate_os_error(e, self.describe(path), "creating the directory") from e

    def rename_dir(self, src: str, dst: str) -> None:
        raise StorageError(f"{self.url} cannot rename directories atomically; use the manifest.")

    def sync_dir(self, path: str) -> None:
        return None

    def remove_file(self, path: str) -> None:
        try:
            self.fs.rm_file(self._p(path))
        except FileNotFoundError:
            return
        except OSError as e:
            raise translate_os_error(e, self.describe(path), "deleting") from e
        self._fresh(path)

    def remove_tree(self, path: str) -> None:
        try:
            if self.fs.exists(self._p(path)):
                self.fs.rm(self._p(path), recursive=True)
        except FileNotFoundError:
            return
        except OSError as e:
            raise translate_os_error(e, self.describe(path), "deleting") from e
        self._fresh(path)

    def append(self, path: str, data: bytes) -> None:
        old = self.read_bytes(path) if self.exists(path) else b""
        self.replace_file(path, old + data)

    def replace_file(self, path: str, data: bytes) -> None:
        try:
            self.fs.pipe_file(self._p(path), data)
        except OSError as e:
            raise translate_os_error(e, self.describe(path), "writing") from e
        self._fresh(path)
