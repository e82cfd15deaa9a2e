"""Object stores and other fsspec filesystems: the manifest, written last, is the commit marker.

Object stores cannot rename a directory atomically, so ``atomic_rename`` is False: the writer
puts every data file into the final directory first and the manifest last. A crash leaves a
directory without a manifest (debris) that readers ignore and ``prune`` removes.

What this backend adds on top of fsspec:

- **Retries.** Every primitive runs under a :class:`~ckptguard.storage.retry.RetryPolicy` (exponential
  backoff with jitter); missing objects and permission errors fail at once. Reads too: a file
  opened with ``open_read`` fetches byte ranges, each a retried call, and a range that comes back
  short (a response cut mid-transfer) is fetched again, never taken as the file's end.
- **One error hierarchy.** Whatever the client library raises (``aiohttp.ClientPayloadError``,
  ``botocore`` connection errors, ``OSError``...) leaves as a
  :class:`~ckptguard.errors.StorageError` with the cause chained: a missing object as
  ``CheckpointNotFoundError``, a transient failure that outlasted the retries as
  ``StorageUnavailableError`` (nothing is damaged; try later), anything else as ``StorageError``.
- **Whole-object retries for writes.** A file being written is spooled (in memory up to
  ``block_size``, then in a temporary file) and uploaded on ``close()``; a transient failure
  re-uploads the whole object, so a retried upload can never be half old, half new.
- **Multipart uploads.** The upload streams through ``fs.open(..., block_size=block_size)``:
  s3fs (and gcsfs) upload a file larger than one block in parts of ``block_size`` bytes.
- **No stale listings.** fsspec clients cache directory listings (s3fs's dircache); every read
  of metadata invalidates the cache for that path first, and every write invalidates it after.
- **Credentials** come from the client's own standard chain (for S3: ``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY`` / ``AWS_PROFILE`` / ``~/.aws/config`` / instance roles, and
  ``AWS_ENDPOINT_URL`` for S3-compatible servers). ``storage_options`` are passed to fsspec
  unchanged (e.g. ``{"client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"}}``).
"""

from __future__ import annotations

import io
import logging
import posixpath
import shutil
import tempfile
import threading
from collections.abc import Callable
from typing import Any, BinaryIO, TypeVar

from ckptguard.errors import CheckpointError, CheckpointNotFoundError, StorageError, StorageUnavailableError
from ckptguard.storage.base import Writer, content_version, translate_os_error
from ckptguard.storage.retry import RetryPolicy, is_transient
from ckptguard.storage.transfer import RangedReader, upload_streamed

__all__ = ["DEFAULT_BLOCK_SIZE", "FsspecStorage", "storage_error"]

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_BLOCK_SIZE = 64 * 2**20  # upload part size; S3 needs >= 5 MiB and at most 10,000 parts


def storage_error(err: Exception, where: str, doing: str, attempts: int = 1) -> CheckpointError:
    """Map any exception of an fsspec client to the library's hierarchy (chain it with ``from``)."""
    if isinstance(err, CheckpointError):
        return err
    if isinstance(err, FileNotFoundError):
        said = f" ({err})" if str(err) else ""
        if doing.startswith(("writ", "upload", "creat", "append", "replac")):
            return CheckpointNotFoundError(
                f"Cannot write {where}: its bucket or a parent does not exist{said}. Create the bucket "
                "first, or check the URL."
            )
        return CheckpointNotFoundError(
            f"No such object {where} (while {doing}){said}. Check the URL; was the checkpoint deleted?"
        )
    if is_transient(err):
        tries = f"{attempts} attempts" if attempts > 1 else "1 attempt"
        return StorageUnavailableError(
            f"The store did not complete {doing} {where} after {tries} "
            f"({type(err).__name__}: {err}). The connection failed, was reset or the transfer was "
            "cut; nothing saved is damaged. Check the endpoint and the network, then try again "
            "(a training loop that catches CheckpointError around save() can keep going).",
            url=where,
            attempts=attempts,
        )
    if isinstance(err, OSError):
        return translate_os_error(err, where, doing)  # type: ignore[return-value]
    return StorageError(
        f"Storage error while {doing} {where} ({type(err).__name__}: {err}). Check the URL, the "
        "credentials and storage_options."
    )


class _ShortRead(ConnectionError):
    """A byte range came back shorter than asked within the object: a cut transfer (retried)."""


class _FsspecWriter:
    """Spools the file, then uploads it whole on ``close()`` (retried as a unit)."""

    def __init__(self, store: FsspecStorage, path: str, display: str) -> None:
        self._store = store
        self._path = path
        self._display = display
        self._size = 0
        self._spool: Any = tempfile.SpooledTemporaryFile(max_size=store.block_size)

    def write(self, data: memoryview | bytes) -> None:
        assert self._spool is not None, "write after close"
        view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        try:
            self._spool.write(view)
        except OSError as e:
            raise StorageError(
                f"Cannot spool {self._display} to local temporary storage ({tempfile.gettempdir()}): "
                f"{e}. Uploads are staged there first; point TMPDIR at a volume with free space."
            ) from e
        self._size += len(view)

    def _upload(self) -> None:
        spool = self._spool
        spool.seek(0)
        bs = self._store.block_size
        with self._store.fs.open(self._path, "wb", block_size=bs) as f:
            shutil.copyfileobj(spool, f, length=bs)

    def close(self) -> None:
        if self._spool is None:
            return
        try:
            self._store.retry.call(self._upload, what=f"uploading {self._display}")
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(
                f"Cannot upload {self._display}: the bucket or parent does not exist ({e}). "
                "Create the bucket first or check the URL."
            ) from e
        except Exception as e:
            raise storage_error(e, self._display, "uploading", self._store.attempts_for(e)) from e
        finally:
            self._spool.close()
            self._spool = None
        self._store._fresh_full(self._path)

    def abort(self) -> None:
        if self._spool is not None:
            try:
                self._spool.close()
            except OSError as e:  # abort never raises; a temporary file the OS could not close
                log.warning("Could not close the local spool of %s: %s", self._display, e)
            self._spool = None
        # Nothing was uploaded unless close() ran; a failed close may have left an object.
        try:
            self._store.fs.rm_file(self._path)
        except FileNotFoundError:
            pass
        except Exception as e:  # noqa: BLE001 - abort never raises; what is left is debris
            log.warning(
                "Could not remove %s after a failed write (%s: %s); the next save or "
                "'ckptguard prune' removes the leftover.", self._display, type(e).__name__, e,
            )
        self._store._fresh_full(self._path)


class FsspecStorage:
    """A run directory addressed by an fsspec URL (``s3://bucket/prefix``, ``memory://x``...).

    Args:
        url: any fsspec URL.
        storage_options: passed to ``fsspec.core.url_to_fs`` unchanged.
        retry: retry policy applied to every primitive.
        block_size: upload part size (bytes) for multipart uploads.
    """

    atomic_rename = False

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        retry: RetryPolicy | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        import fsspec

        if block_size < 5 * 2**20:
            raise ValueError(f"block_size must be at least 5 MiB (S3's minimum part size), got {block_size}")
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
        self.retry = retry if retry is not None else RetryPolicy()
        self.block_size = int(block_size)

    def __repr__(self) -> str:
        return f"FsspecStorage({self.url!r})"

    def _p(self, path: str) -> str:
        return posixpath.join(self.root, path) if path else self.root

    def describe(self, path: str) -> str:
        return posixpath.join(self.url, path) if path else self.url

    def _fresh_full(self, full: str) -> None:
        try:
            self.fs.invalidate_cache(full)
        except Exception as e:  # noqa: BLE001 - a cache that cannot be invalidated holds nothing
            log.debug("Could not invalidate the listing cache of %s: %s", full, e)

    def _fresh(self, path: str) -> None:
        self._fresh_full(self._p(path))

    def _call(self, doing: str, path: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one fsspec call under the retry policy; map errors to the library's hierarchy."""
        try:
            return self.retry.call(fn, *args, what=f"{doing} {self.describe(path)}", **kwargs)
        except Exception as e:
            raise storage_error(e, self.describe(path), doing, self.attempts_for(e)) from e

    def attempts_for(self, err: Exception) -> int:
        """How many tries the retry policy made before ``err`` escaped it."""
        return self.retry.attempts if is_transient(err) else 1

    def exists(self, path: str) -> bool:
        self._fresh(path)
        return bool(self._call("checking", path, self.fs.exists, self._p(path)))

    def isdir(self, path: str) -> bool:
        self._fresh(path)
        return bool(self._call("checking", path, self.fs.isdir, self._p(path)))

    def is_symlink(self, path: str) -> bool:
        return False

    def listdir(self, path: str) -> list[str]:
        """Names directly under ``path``; object-store prefixes (``step-*/``) count as dirs."""
        full = self._p(path).rstrip("/")
        self._fresh(path)
        try:
            entries = self._call("listing", path, self.fs.ls, full, detail=False)
        except CheckpointNotFoundError:
            return []
        names = []
        for e in entries:
            entry = str(e).rstrip("/")
            if entry == full or not entry.startswith(full + "/" if full else ""):
                continue  # ls of a file returns the file itself
            name = entry[len(full) + 1 :] if full else entry
            if name and "/" not in name:
                names.append(name)
        return sorted(set(names))

    def size(self, path: str) -> int:
        self._fresh(path)
        return int(self._call("reading the size of", path, self.fs.size, self._p(path)))

    def mtime(self, path: str) -> float | None:
        try:
            m = self._call("reading the time of", path, self.fs.modified, self._p(path))
            return float(m.timestamp())
        except StorageError as e:  # not every filesystem reports it
            log.debug("No modification time for %s: %s", self.describe(path), e)
            return None

    def read_bytes(self, path: str) -> bytes:
        self._fresh(path)
        return bytes(self._call("reading", path, self.fs.cat_file, self._p(path)))

    def open_read(self, path: str) -> BinaryIO:
        """A buffered, seekable reader whose every fetch is a retried range request."""
        size = self.size(path)
        return io.BufferedReader(RangedReader(self, path, size), buffer_size=2**20)

    def read_range(self, path: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of an object at least ``end`` bytes long (retried until whole)."""
        full = self._p(path)

        def fetch() -> bytes:
            data = bytes(self.fs.cat_file(full, start=start, end=end))
            if len(data) != end - start:
                raise _ShortRead(f"asked for bytes {start}-{end}, got {len(data)}")
            return data

        return bytes(self._call("reading", path, fetch))

    def create(self, path: str) -> _FsspecWriter:
        return _FsspecWriter(self, self._p(path), self.describe(path))

    def missing_bucket(self) -> str | None:
        """The URL's bucket when the store has buckets (S3, GCS, Azure) and it does not exist;
        None otherwise, and when the store cannot tell (the first write says what is wrong)."""
        protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        if protocol not in ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"):
            return None
        bucket = self.root.split("/", 1)[0]
        try:
            self._fresh_full(bucket)
            return None if self.fs.exists(bucket) else bucket
        except Exception as e:  # noqa: BLE001 - no answer is not an answer: restore goes on
            log.debug("Could not check that the bucket %s exists: %s", bucket, e)
            return None

    def write_streaming(self, path: str, body: Callable[[Writer], T]) -> T:
        """Write ``path`` with ``body``'s bytes streamed straight into the upload (see
        :func:`ckptguard.storage.transfer.upload_streamed`: no local spool; a failed attempt is
        discarded and ``body`` runs again under the retry policy)."""
        full, where = self._p(path), self.describe(path)
        try:
            return upload_streamed(
                self.fs, full, where, self.block_size, self.retry, body,
                store_error=lambda e: storage_error(e, where, "uploading", self.attempts_for(e)),
            )
        finally:
            self._fresh_full(full)

    def makedirs(self, path: str) -> None:
        self._call("creating the directory", path, self.fs.makedirs, self._p(path), exist_ok=True)

    def rename_dir(self, src: str, dst: str) -> None:
        raise StorageError(
            f"{self.url} cannot rename directories atomically (renaming {src} to {dst}); "
            "object stores use the manifest as the commit marker."
        )

    def sync_dir(self, path: str) -> None:
        return None

    def remove_file(self, path: str) -> None:
        try:
            self._call("deleting", path, self.fs.rm_file, self._p(path))
        except CheckpointNotFoundError:
            pass
        self._fresh(path)

    def remove_tree(self, path: str) -> None:
        if self.exists(path):
            try:
                self._call("deleting", path, self.fs.rm, self._p(path), recursive=True)
            except CheckpointNotFoundError:
                pass
        self._fresh(path)

    def append(self, path: str, data: bytes) -> None:
        """Read-modify-write: object stores have no append (one writer per run holds the lock)."""
        old = self.read_bytes(path) if self.exists(path) else b""
        self.replace_file(path, old + data)

    def replace_file(self, path: str, data: bytes) -> None:
        """One PUT: readers see the old or the new object, never a mix."""
        self._call("writing", path, self.fs.pipe_file, self._p(path), bytes(data))
        self._fresh(path)

    # ---- conditional writes: the run lock's primitive (storage.base.ConditionalWrites) --------

    def _conditional_kind(self) -> str:
        protocol = self.fs.protocol
        names = protocol if isinstance(protocol, (tuple, list)) else (protocol,)
        return "s3" if "s3" in names else "memory" if "memory" in names else "emulated"

    @property
    def conditional_writes_atomic(self) -> bool:
        """True on S3 (``If-None-Match``/``If-Match``) and ``memory://`` (one process-wide lock);
        elsewhere a conditional write is a read, a compare and a write (see ckptguard.run.lock)."""
        return self._conditional_kind() != "emulated"

    def read_versioned(self, path: str) -> tuple[bytes, str] | None:
        """The object's bytes (at most 1 MiB) and its version (S3: the ETag), read together."""
        if self._conditional_kind() == "s3":
            self._fresh(path)
            out: tuple[bytes, str] | None = self._call("reading", path, self._s3_get_versioned, self._p(path))
            return out
        with _MEMORY_CAS:
            return self._read_plain_versioned(path)

    def write_if(self, path: str, data: bytes, *, expect: str | None) -> str | None:
        """Write only over version ``expect`` (None: only where nothing exists); the new version,
        or None when the condition did not hold and nothing was written."""
        data = bytes(data)
        if self._conditional_kind() == "s3":
            cond: dict[str, Any] = {"mode": "create"} if expect is None else {"IfMatch": expect}
            try:
                version: str | None = self._call("writing", path, self._s3_put_if, self._p(path), data, cond)
            finally:
                self._fresh(path)
            return version
        with _MEMORY_CAS:  # atomic for memory:// (one process); a read-then-write elsewhere
            current = self._read_plain_versioned(path)
            if (current[1] if current is not None else None) != expect:
                return None
            self.replace_file(path, data)
        return content_version(data)

    def remove_if(self, path: str, *, expect: str) -> bool:
        """Remove only over version ``expect``; whether it was removed."""
        if self._conditional_kind() == "s3":
            try:
                removed: bool = self._call("deleting", path, self._s3_remove_if, self._p(path), expect)
            finally:
                self._fresh(path)
            return removed
        with _MEMORY_CAS:
            current = self._read_plain_versioned(path)
            if current is None or current[1] != expect:
                return False
            self.remove_file(path)
        return True

    def _read_plain_versioned(self, path: str) -> tuple[bytes, str] | None:
        try:
            data = self.read_bytes(path)
        except CheckpointNotFoundError:
            return None
        return data, content_version(data)

    def _s3_get_versioned(self, full: str) -> tuple[bytes, str] | None:
        import fsspec.asyn

        bucket, key, _ = self.fs.split_path(full)
        try:
            resp = self.fs.call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError:
            return None
        body = resp["Body"]
        try:
            data = fsspec.asyn.sync(self.fs.loop, body.read, _MAX_CONDITIONAL_BYTES)
        finally:
            try:
                body.close()
            except Exception as e:  # noqa: BLE001 - the bytes are read; a close error changes nothing
                log.debug("closing the response body of %s failed after the read (ignored: the bytes are in): %r", full, e)
        return bytes(data), str(resp["ETag"])

    def _s3_put_if(self, full: str, data: bytes, cond: dict[str, Any]) -> str | None:
        try:
            out = self.fs.pipe_file(full, data, **cond)
        except FileExistsError:  # If-None-Match: something is there
            return None
        except OSError as e:
            if _condition_failed(e, missing_ok="IfMatch" in cond):
                return None
            raise
        etag = out.get("ETag") if isinstance(out, dict) else None
        if etag is None:  # an s3fs that returns nothing: ask for the version just written
            bucket, key, _ = self.fs.split_path(full)
            etag = self.fs.call_s3("head_object", Bucket=bucket, Key=key)["ETag"]
        return str(etag)

    def _s3_remove_if(self, full: str, expect: str) -> bool:
        bucket, key, _ = self.fs.split_path(full)
        try:
            self.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=expect)
        except OSError as e:
            if _condition_failed(e, missing_ok=True):
                return False
            raise
        return True


_MEMORY_CAS = threading.RLock()  # memory:// lives in this process: one lock makes write_if atomic
_MAX_CONDITIONAL_BYTES = 2**20  # lock records are a few hundred bytes


def _condition_failed(err: BaseException, *, missing_ok: bool) -> bool:
    """Whether an S3 error means "the condition did not hold" (412, or 409 when two conditional
    writes raced; with ``missing_ok`` also a missing key under ``If-Match``)."""
    seen: BaseException | None = err
    for _ in range(8):
        if seen is None:
            break
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            code = str((response.get("Error") or {}).get("Code", ""))
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return True
            if missing_ok and code == "NoSuchKey":
                return True
            return False
        seen = seen.__cause__ or seen.__context__
    return False
