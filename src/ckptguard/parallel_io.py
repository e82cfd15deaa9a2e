"""Parallel tensor-file writes for local storage.

A tensor file's layout is known before a byte is written (``plan_tensor_file``), so its ranges
can be written by several threads at once with positional writes. Each job writes a batch of
about ``piece_bytes`` with one ``pwritev`` and hashes the tensors that start in it; ``os.pwritev``
and ``xxhash`` both release the GIL, so the threads run truly in parallel and the training
thread keeps the interpreter. The file is byte-identical to the sequential writer's output and
its manifest entry (per-tensor xxh3-128, header digest, Merkle root) is the same.

``direct=True`` writes through ``O_DIRECT`` from page-aligned bounce buffers (one per thread,
reused): it skips page-cache growth, which on some VMs costs more than the disk. Filesystems
that refuse ``O_DIRECT`` (tmpfs, some overlays) fall back to buffered writes.

Writers without ``pwritev`` (object stores) go through the plain sequential path.

>>> write = ParallelTensorWriter(threads=2)
>>> write_checkpoint(storage, step, files, blobs, fields, tensor_writer=write)
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import mmap
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import xxhash

from ckptguard.errors import CheckpointError
from ckptguard.storage.base import Storage, Writer, translate_os_error
from ckptguard.tensorfile import (
    digest_bytes,
    plan_tensor_file,
    tensor_file_entry,
    tensor_view,
    write_tensor_file,
)

__all__ = [
    "BACKGROUND_NICE",
    "ParallelTensorWriter",
    "default_tensor_writer",
    "lower_thread_priority",
    "read_ahead",
    "write_tensor_file_parallel",
]

log = logging.getLogger(__name__)

ALIGN = 4096
IOV_MAX = 512
BACKGROUND_NICE = 10  # niceness of async writer threads: training keeps the cores it needs


@dataclasses.dataclass(frozen=True)
class _Segment:
    """The bytes of ``view`` land at file offset ``offset``."""

    offset: int
    view: memoryview


@dataclasses.dataclass(frozen=True)
class ParallelTensorWriter:
    """A ``tensor_writer`` for ``write_checkpoint`` that writes each file with several threads.

    Args:
        threads: writer threads per file (2 fills a local NVMe on a 2-core VM).
        piece_bytes: bytes per write job (one ``pwritev``).
        direct: write with ``O_DIRECT`` through aligned bounce buffers (local files only).
    """

    threads: int = 2
    piece_bytes: int = 32 * 1024 * 1024
    direct: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be a positive int, got {self.threads!r}")
        if self.piece_bytes < ALIGN or self.piece_bytes % ALIGN:
            raise ValueError(f"piece_bytes must be a positive multiple of {ALIGN}, got {self.piece_bytes}")

    def __call__(self, storage: Storage, rel: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        from ckptguard.writer import (
            write_file,  # writer -> catalog -> reader -> this module
        )

        def body(w: Writer) -> dict[str, Any]:
            if hasattr(w, "pwritev"):
                return write_tensor_file_parallel(w, tensors, options=self)
            return write_tensor_file(w, tensors)

        return write_file(storage, rel, body)


def default_tensor_writer(
    storage: Storage, *, background: bool = False
) -> Callable[[Storage, str, Mapping[str, torch.Tensor]], dict[str, Any]]:
    """Parallel O_DIRECT writes on local storage; the plain sequential writer elsewhere.

    ``background=True`` (async saves) writes with one thread: training runs beside it, and on a
    2-core machine a second writer thread took a core from training (a compute loop beside a
    writer busy all the time slowed 44% with 2 threads, 32% with 1).

    O_DIRECT because growing the page cache costs more than the disk on the VMs measured
    (PERF-NOTES.md, BENCHMARKS.md); where a filesystem refuses it the writer falls back to
    buffered parallel writes.
    """
    from ckptguard.storage.local import LocalStorage
    from ckptguard.writer import write_local_tensor_file

    if isinstance(storage, LocalStorage):
        return ParallelTensorWriter(threads=1 if background else 2, direct=True)
    return write_local_tensor_file


def lower_thread_priority(nice: int = BACKGROUND_NICE) -> None:
    """Lower the calling thread's CPU priority (Linux: per thread; threads it starts inherit it)."""
    get_id = getattr(threading, "get_native_id", None)
    if get_id is None or not hasattr(os, "setpriority"):
        return
    try:
        tid = get_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), nice))
    except OSError as e:
        log.debug("Could not lower the writer thread's priority: %s", e)


def read_ahead(fh: object) -> None:
    """Ask the kernel to read a whole local file ahead, asynchronously, while it is consumed.

    One reader issuing 8-16 MiB reads one after the other leaves a virtual disk idle between
    them (0.4 GB/s measured, against 1.9 GB/s for one large read); WILLNEED keeps it busy.
    """
    fileno = getattr(fh, "fileno", None)
    if fileno is None or not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = fileno()
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except (OSError, ValueError) as e:  # not a real file (an fsspec stream): nothing to do
        log.debug("No read-ahead: %s", e)


def _segments(head: bytes | bytearray, views: Sequence[memoryview]) -> list[_Segment]:
    segs = [_Segment(0, memoryview(head))]
    offset = len(head)
    for v in views:
        if len(v):
            segs.append(_Segment(offset, v))
        offset += len(v)
    return segs


def _batches(segs: Sequence[_Segment], piece: int) -> list[list[_Segment]]:
    """Split the file into runs of about ``piece`` bytes (large tensors are cut into pieces)."""
    out: list[list[_Segment]] = []
    cur: list[_Segment] = []
    cur_bytes = 0
    for seg in segs:
        view, offset = seg.view, seg.offset
        while len(view):
            take = min(len(view), piece - cur_bytes)
            cur.append(_Segment(offset, view[:take]))
            cur_bytes += take
            view, offset = view[take:], offset + take
            if cur_bytes >= piece or len(cur) >= IOV_MAX:
                out.append(cur)
                cur, cur_bytes = [], 0
    if cur:
        out.append(cur)
    return out


def _split(segs: Sequence[_Segment], piece: int) -> list[list[_Segment]]:
    """Cut the file into aligned chunks of ``piece`` bytes (for O_DIRECT)."""
    size = segs[-1].offset + len(segs[-1].view) if segs else 0
    out: list[list[_Segment]] = [[] for _ in range((size + piece - 1) // piece)]
    for s in segs:
        pos = 0
        while pos < len(s.view):
            off = s.offset + pos
            k = off // piece
            take = min(len(s.view) - pos, (k + 1) * piece - off)
            out[k].append(_Segment(off, s.view[pos : pos + take]))
            pos += take
    return out


def _hash_plan(groups: Sequence[Sequence[_Segment]], starts: Mapping[int, int]) -> list[list[int]]:
    """For each group, the tensors that begin in it (each tensor is hashed by exactly one job)."""
    plan: list[list[int]] = [[] for _ in groups]
    for g, group in enumerate(groups):
        for seg in group:
            i = starts.get(seg.offset)
            if i is not None:
                plan[g].append(i)
    return plan


def write_tensor_file_parallel(
    writer: Writer,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    options: ParallelTensorWriter = ParallelTensorWriter(),
) -> dict[str, Any]:
    """Like ``tensorfile.write_tensor_file``, with several threads; ``writer`` needs ``pwritev``.

    The caller closes the writer (which fsyncs the file).
    """
    try:
        return _write_parallel(writer, tensors, metadata, options)
    except CheckpointError:
        raise
    except OSError as e:  # full disk, I/O error: the library's errors, with the path
        raise translate_os_error(e, str(getattr(writer, "path", "?")), "writing") from e


def _write_parallel(
    writer: Writer, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None, options: ParallelTensorWriter
) -> dict[str, Any]:
    head, table = plan_tensor_file(tensors, metadata)
    names = list(tensors)
    views = [tensor_view(tensors[n]) for n in names]
    size = len(head) + sum(len(v) for v in views)
    digests = [digest_bytes(b"") if not len(v) else "" for v in views]
    starts = {len(head) + table[n]["offsets"][0]: i for i, n in enumerate(names) if len(views[i])}
    segs = _segments(bytearray(head), views)

    def hash_some(which: Sequence[int]) -> None:
        for i in which:
            digests[i] = xxhash.xxh3_128(views[i]).hexdigest()  # releases the GIL

    _write_segments(writer, segs, size, options, starts, hash_some)
    for i, n in enumerate(names):
        table[n]["xxh3_128"] = digests[i]
    return tensor_file_entry(head, table)


def write_views(writer: Writer, views: Sequence[memoryview], options: ParallelTensorWriter) -> None:
    """Write the concatenation of ``views`` through ``writer`` (which needs ``pwritev``) with the
    same parallel, O_DIRECT-when-possible path as tensor files. The caller closes the writer."""
    try:
        _write_segments(writer, _segments(b"", views), sum(len(v) for v in views), options, {}, lambda which: None)
    except CheckpointError:
        raise
    except OSError as e:
        raise translate_os_error(e, str(getattr(writer, "path", "?")), "writing") from e


def _write_segments(
    writer: Writer,
    segs: Sequence[_Segment],
    size: int,
    options: ParallelTensorWriter,
    starts: Mapping[int, int],
    hash_some: Callable[[Sequence[int]], None],
) -> None:
    """Write ``segs`` (a file of ``size`` bytes): O_DIRECT when asked and allowed, else buffered
    ``pwritev``; after each piece, ``hash_some`` hashes the views that piece completed."""
    if options.direct:
        fd = _open_direct(writer)
        if fd is not None:
            try:
                chunks = _split(segs, options.piece_bytes)
                done = _run_direct(fd, chunks, _hash_plan(chunks, starts), options, hash_some)
            finally:
                os.close(fd)
            if done:
                writer.truncate(size)  # type: ignore[attr-defined]
                return
            log.info("O_DIRECT refused for %s; writing buffered.", getattr(writer, "path", "?"))
    batches = _batches(segs, options.piece_bytes)
    plan = _hash_plan(batches, starts)

    def job(b: int) -> None:
        batch = batches[b]
        writer.pwritev([x.view for x in batch], batch[0].offset)  # type: ignore[attr-defined]
        hash_some(plan[b])

    _run(job, len(batches), options.threads)


def _run(job: Callable[[int], None], n: int, threads: int) -> None:
    """Run ``job(0..n-1)`` on ``threads`` threads; re-raise the first error.

    Plain threads rather than an executor: an async save still running at interpreter exit must
    be able to finish, and executors refuse new work once shutdown has begun.
    """
    errors: list[BaseException] = []
    lock = threading.Lock()
    todo = iter(range(n))

    def worker() -> None:
        while not errors:
            with lock:
                b = next(todo, None)
            if b is None:
                return
            try:
                job(b)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                errors.append(e)

    helpers: list[threading.Thread] = []
    for k in range(min(threads, n) - 1):
        t = threading.Thread(target=worker, name=f"ckptguard-write-{k}", daemon=True)
        try:
            t.start()
        except RuntimeError:  # interpreter shutting down: the calling thread does it all
            break
        helpers.append(t)
    worker()
    for t in helpers:
        t.join()
    if errors:
        raise errors[0]


# ---- O_DIRECT ----------------------------------------------------------------------------------


def _open_direct(writer: Writer) -> int | None:
    path = getattr(writer, "path", None)
    flag = getattr(os, "O_DIRECT", 0)
    if path is None or not flag or not hasattr(writer, "truncate"):
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError as e:
        log.info("Cannot open %s with O_DIRECT (%s); writing buffered.", path, e)
        return None


def _run_direct(
    fd: int,
    chunks: list[list[_Segment]],
    plan: list[list[int]],
    options: ParallelTensorWriter,
    hash_some: Any,
) -> bool:
    """Write aligned chunks through per-thread page-aligned buffers; False if O_DIRECT is refused."""
    piece = options.piece_bytes
    local = threading.local()
    refused = threading.Event()

    def job(k: int) -> None:
        if refused.is_set():
            return
        if getattr(local, "buf", None) is None:
            local.buf = mmap.mmap(-1, piece)  # page-aligned anonymous memory, reused by the thread
            local.arr = np.frombuffer(local.buf, dtype=np.uint8)
        bt: np.ndarray = local.arr
        base = k * piece
        end = 0
        for s in chunks[k]:
            a = s.offset - base
            # numpy's copy is one memcpy without the GIL; torch's copy_ here would start an OpenMP
            # team per writer thread that competes with training for the cores.
            np.copyto(bt[a : a + len(s.view)], np.frombuffer(s.view, dtype=np.uint8))
            end = a + len(s.view)
        length = -(-end // ALIGN) * ALIGN
        if length > end:
            bt[end:length] = 0
        view = memoryview(local.buf)[:length]
        try:
            off = base
            while len(view):
                n = os.pwrite(fd, view, off)
                view, off = view[n:], off + n
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            refused.set()
            return
        finally:
            view.release()
        hash_some(plan[k])

    _run(job, len(chunks), options.threads)
    return not refused.is_set()
