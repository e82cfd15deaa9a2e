"""Tensor sinks: how a tensor file of a checkpoint becomes bytes on storage.

A :class:`TensorSink` takes ``(storage, rel, tensors)``, writes one tensor file durably and
returns its manifest entry. Two implementations:

- :func:`stream_tensor_file`: any storage; the file goes out as one stream through the storage's
  ``Writer`` (object stores, and the reference the parallel writer is checked against).
- :class:`ParallelTensorWriter`: storage whose writer is a
  :class:`~ckptguard.storage.base.PositionalWriter` (local files). A tensor file's layout is
  known before a byte is written (``plan_tensor_file``), so it is cut into pieces of
  ``piece_bytes`` written with positional writes, each tensor hashed once on the way;
  ``os.pwrite(v)``, numpy copies and ``xxhash`` release the GIL, so the work runs beside the
  training thread. ``direct=True`` writes through ``O_DIRECT`` (:mod:`ckptguard.persist.direct_io`);
  filesystems that refuse it (tmpfs, some overlays) get buffered ``pwritev`` by ``threads``
  threads. Any other writer gets the stream. The file is byte-identical to the stream's and its
  manifest entry (per-tensor xxh3-128, header digest, Merkle root) is the same. Segments may be
  produced lazily (incremental saves hash chunk k+1 while chunk k is written).

Example::

    sink = ParallelTensorWriter(threads=2, direct=True)
    write_checkpoint(storage, step, files, blobs, fields, tensor_writer=sink)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import xxhash

from ckptguard.errors import CheckpointError
from ckptguard.format.tensorfile import (
    digest_bytes,
    plan_tensor_file,
    tensor_file_entry,
    tensor_view,
    write_tensor_file,
)
from ckptguard.persist.direct_io import ALIGN, DIRECT_BUFFERS, BufferPool, Segment, write_direct
from ckptguard.storage.base import PositionalWriter, Storage, Writer, translate_os_error

if TYPE_CHECKING:  # tensors arrive from callers; listing and verifying import no torch
    import torch

__all__ = [
    "ALIGN",
    "BACKGROUND_NICE",
    "DIRECT_BUFFERS",
    "FIRST_PIECE",
    "IOV_MAX",
    "ParallelTensorWriter",
    "Segment",
    "TensorSink",
    "default_tensor_writer",
    "lower_thread_priority",
    "read_ahead",
    "stream_tensor_file",
    "write_file",
    "write_segments",
    "write_tensor_file_parallel",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

IOV_MAX = 512
FIRST_PIECE = 4 * 1024 * 1024  # O_DIRECT: a small first piece, so the disk starts sooner
BACKGROUND_NICE = 10  # niceness of async writer threads: training keeps the cores it needs


class TensorSink(Protocol):
    """Writes one tensor file of a checkpoint, durably, and returns its manifest entry.

    ``write_checkpoint(..., tensor_writer=sink)`` calls it once per tensor file; incremental
    saves (:class:`~ckptguard.persist.incremental.IncrementalSave`) are a sink too.
    """

    def __call__(self, storage: Storage, rel: str, tensors: Mapping[str, torch.Tensor], /) -> dict[str, Any]: ...


def write_file(storage: Storage, rel: str, body: Callable[[Writer], T]) -> T:
    """Create ``rel``, let ``body`` write it, close (durable); on any failure abort and re-raise.

    A storage with ``write_streaming`` (object stores: the bytes go straight into the upload,
    retried by running ``body`` again) is given ``body`` whole; ``body`` writes from memory."""
    streaming: Callable[[str, Callable[[Writer], T]], T] | None = getattr(storage, "write_streaming", None)
    if streaming is not None:
        return streaming(rel, body)
    w = storage.create(rel)
    try:
        out = body(w)
        w.close()
    except BaseException:
        w.abort()
        raise
    return out


def stream_tensor_file(storage: Storage, rel: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The generic :class:`TensorSink`: the file as one stream through the storage's writer."""
    return write_file(storage, rel, lambda w: write_tensor_file(w, tensors))


@dataclasses.dataclass(frozen=True)
class ParallelTensorWriter:
    """The :class:`TensorSink` for local files: positional writes on several threads, or O_DIRECT.

    Args:
        threads: writer threads per file for buffered writes (``O_DIRECT`` writes always use
            one staging thread and one writing thread).
        piece_bytes: bytes per write job (one ``pwritev`` / one ``O_DIRECT`` write).
        direct: write with ``O_DIRECT`` through aligned staging buffers (local files only); the
            writer keeps ``DIRECT_BUFFERS`` of them for its life (a manager keeps one writer).
    """

    threads: int = 2
    piece_bytes: int = 32 * 1024 * 1024
    direct: bool = False
    pool: BufferPool = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.threads, int) or self.threads < 1:
            raise ValueError(f"threads must be a positive int, got {self.threads!r}")
        if self.piece_bytes < ALIGN or self.piece_bytes % ALIGN:
            raise ValueError(f"piece_bytes must be a positive multiple of {ALIGN}, got {self.piece_bytes}")
        object.__setattr__(self, "pool", BufferPool(self.piece_bytes))

    def __call__(self, storage: Storage, rel: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        return write_file(storage, rel, functools.partial(self.write_to, tensors=tensors))

    def write_to(self, w: Writer, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Write the tensor file into the open ``w`` (the caller closes it); the entry."""
        if isinstance(w, PositionalWriter):
            self.prepare()  # first save: the other buffers are made while the first piece is staged
            return write_tensor_file_parallel(w, tensors, options=self)
        return write_tensor_file(w, tensors)

    def write_segments_to(self, w: Writer, segs: Iterable[Segment]) -> int:
        """Write contiguous ``segs`` (file order, from offset 0; may be produced lazily) into the
        open ``w``: positional / O_DIRECT writes where ``w`` allows them, else as one stream.
        Returns the file size; the caller closes ``w``."""
        if isinstance(w, PositionalWriter):
            return write_segments(w, segs, self)
        size = 0
        for seg in segs:
            w.write(seg.view)
            size = seg.offset + len(seg.view)
        return size

    def prepare(self) -> None:
        """Allocate the ``O_DIRECT`` staging buffers now, in the background, once (the first
        write does it; a caller that knows a save is coming, e.g. at the first ``save()`` call
        that is not due, can call it earlier so that the first save finds them ready)."""
        if self.direct:
            self.pool.prepare()


def default_tensor_writer(storage: Storage, *, background: bool = False) -> TensorSink:
    """Parallel O_DIRECT writes where the storage's writers are :class:`PositionalWriter` (the
    local disk, also behind a wrapper such as ``ckptguard.testing.FaultyStorage``); the stream
    elsewhere (object stores), decided per file by :meth:`ParallelTensorWriter.write_to`.

    ``background=True`` (async saves): a buffered fallback writes with one thread, not two:
    training runs beside it, and on a 2-core machine a second copying thread took a core from
    training (a compute loop beside a writer busy all the time slowed 44% with 2 threads, 32%
    with 1). The O_DIRECT path always copies on one thread.

    O_DIRECT because growing the page cache costs more than the disk on the VMs measured
    (PERF-NOTES.md, BENCHMARKS.md); where a filesystem refuses it the writer falls back to
    buffered parallel writes.
    """
    return ParallelTensorWriter(threads=1 if background else 2, direct=True)


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


def _segments(head: bytes | bytearray, views: Iterable[memoryview], offset: int = 0) -> Iterator[Segment]:
    """``head`` then ``views``, laid end to end from ``offset`` (empty views are skipped)."""
    for v in (memoryview(head), *views):
        if len(v):
            yield Segment(offset, v)
        offset += len(v)


def _pieces(segs: Iterable[Segment], piece: int, *, aligned: bool, first: int = 0) -> Iterator[list[Segment]]:
    """Group contiguous segments (in file order, from offset 0) into write jobs of ``piece``
    bytes, each yielded as soon as it is complete, so that a lazy ``segs`` (incremental saves
    hash while earlier pieces are written) keeps the writers busy. ``aligned``: job k covers
    exactly ``[k * piece, (k + 1) * piece)`` (O_DIRECT); otherwise a job also ends at IOV_MAX
    segments (one ``pwritev`` each). ``first`` (a multiple of ALIGN, at most ``piece``): the
    first job is that long instead, then every job starts ``first + k * piece``."""
    cur: list[Segment] = []
    boundary = first or piece
    for seg in segs:
        view, offset = seg.view, seg.offset
        while len(view):
            take = min(len(view), boundary - offset)
            cur.append(Segment(offset, view[:take]))
            view, offset = view[take:], offset + take
            if offset == boundary or (not aligned and len(cur) >= IOV_MAX):
                yield cur
                cur, boundary = [], offset + piece
    if cur:
        yield cur


class _Recorded:
    """Segments as they are produced, kept so that a refused O_DIRECT write can start over."""

    def __init__(self, segs: Iterable[Segment]) -> None:
        self.source = iter(segs)
        self.seen: list[Segment] = []
        self.size = 0

    def __iter__(self) -> Iterator[Segment]:
        for seg in self.source:
            self.seen.append(seg)
            self.size = max(self.size, seg.offset + len(seg.view))
            yield seg

    def all(self) -> list[Segment]:
        for _ in self:  # produce what is left
            pass
        return self.seen


def write_tensor_file_parallel(
    writer: PositionalWriter,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    options: ParallelTensorWriter = ParallelTensorWriter(),
) -> dict[str, Any]:
    """Like ``tensorfile.write_tensor_file``, with positional writes on several threads.

    The caller closes the writer (which fsyncs the file). OS errors (full disk...) come out of
    ``write_segments`` as the library's errors, with the path.
    """
    head, table = plan_tensor_file(tensors, metadata)
    names = list(tensors)
    views = [tensor_view(tensors[n]) for n in names]
    digests = [digest_bytes(b"") if not len(v) else "" for v in views]
    starts = {len(head) + table[n]["offsets"][0]: i for i, n in enumerate(names) if len(views[i])}

    def hash_started(piece: Sequence[Segment]) -> None:
        """Hash the tensors that begin in ``piece`` (each tensor is hashed by exactly one job)."""
        for seg in piece:
            i = starts.get(seg.offset)
            if i is not None:
                digests[i] = xxhash.xxh3_128(views[i]).hexdigest()  # releases the GIL

    write_segments(writer, _segments(bytearray(head), views), options, hash_started)
    for i, n in enumerate(names):
        table[n]["xxh3_128"] = digests[i]
    return tensor_file_entry(head, table)


def write_segments(
    writer: PositionalWriter,
    segs: Iterable[Segment],
    options: ParallelTensorWriter,
    after: Callable[[Sequence[Segment]], None] = lambda piece: None,
) -> int:
    """Write contiguous ``segs`` (file order, from offset 0; may be produced lazily) through
    ``writer``: O_DIRECT when asked and allowed, else buffered, on ``options.threads`` threads.
    ``after(piece)`` runs once per piece, on the thread that staged (O_DIRECT) or wrote
    (buffered) it; again for pieces re-written after O_DIRECT was refused. Returns the file
    size. The caller closes the writer (which fsyncs the file)."""
    recorded = _Recorded(segs)
    try:
        if options.direct:
            pieces = _pieces(recorded, options.piece_bytes, aligned=True, first=min(FIRST_PIECE, options.piece_bytes))
            if write_direct(writer, pieces, options.pool, after):
                writer.truncate(recorded.size)
                return recorded.size
            log.info("O_DIRECT refused for %s; writing buffered.", writer.path)
            recorded = _Recorded(recorded.all())

        def job(batch: list[Segment]) -> None:
            writer.pwritev([x.view for x in batch], batch[0].offset)
            after(batch)

        _run(job, _pieces(recorded, options.piece_bytes, aligned=False), options.threads)
        return recorded.size
    except CheckpointError:
        raise
    except OSError as e:
        raise translate_os_error(e, writer.path, "writing") from e


Job = TypeVar("Job")


def _run(job: Callable[[Job], None], todo: Iterator[Job], threads: int) -> None:
    """Run ``job`` on every item of ``todo`` with ``threads`` threads; re-raise the first error.
    Items are taken under a lock, so a lazy ``todo`` produces them one at a time.

    Plain threads rather than an executor: an async save still running at interpreter exit must
    be able to finish, and executors refuse new work once shutdown has begun.
    """
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker() -> None:
        while not errors:
            try:
                with lock:
                    item = next(todo, None)
                if item is None:
                    return
                job(item)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                errors.append(e)

    helpers: list[threading.Thread] = []
    for k in range(threads - 1):
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
