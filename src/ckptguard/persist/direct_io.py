"""``O_DIRECT`` writes of a tensor file through page-aligned staging buffers.

The calling thread copies each aligned piece of the file into one of ``DIRECT_BUFFERS`` staging
buffers and hashes it, while one writer thread issues the writes back to back, as a single
large-write stream does (one thread that both copies and writes leaves the disk idle while it
copies). The buffers come from a :class:`BufferPool` that outlives one save, because a first copy
into fresh memory costs several times a copy into reused memory on the VMs measured.

The file is reached only through its storage writer (:class:`~ckptguard.storage.base.PositionalWriter`):
the writer opens its own ``O_DIRECT`` handle, and ``close()`` makes the file durable.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

from ckptguard.storage.base import PositionalWriter

__all__ = ["ALIGN", "DIRECT_BUFFERS", "BufferPool", "Segment", "write_direct"]

log = logging.getLogger(__name__)

ALIGN = 4096
DIRECT_BUFFERS = 3  # staging buffers of one piece each in flight between the two threads


@dataclasses.dataclass(frozen=True)
class Segment:
    """The bytes of ``view`` land at file offset ``offset`` (the unit ``write_segments`` takes)."""

    offset: int
    view: memoryview


def _anonymous(size: int) -> mmap.mmap:
    """Page-aligned anonymous memory, its pages faulted in by the kernel in one call where it can
    (``MAP_POPULATE``: 11-13 ms for 32 MiB here, against 25-35 ms of page faults in a first copy)."""
    populate = getattr(mmap, "MAP_POPULATE", 0)
    try:
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | populate)
    except (OSError, ValueError):  # no MAP_PRIVATE/MAP_POPULATE here: the defaults
        return mmap.mmap(-1, size)


class BufferPool:
    """Page-aligned staging buffers of ``size`` bytes kept from one write to the next: on the VMs
    measured, a first copy into fresh memory runs at 0.7-2.3 GB/s against ~10 GB/s into reused
    memory. ``prepare()`` allocates them ahead, on a thread, so a first save finds them ready."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._free: list[mmap.mmap] = []
        self._cond = threading.Condition()
        self._coming = 0  # buffers the preparing thread has still to hand over
        self._prepared = False

    def prepare(self, count: int = DIRECT_BUFFERS) -> None:
        """Allocate ``count`` buffers in the background, each handed over as soon as it is ready
        (once per pool)."""
        with self._cond:
            if self._prepared:
                return
            self._prepared = True
            self._coming = count

        def run() -> None:
            try:
                for _ in range(count):
                    buf = _anonymous(self.size)
                    with self._cond:
                        self._free.append(buf)
                        self._coming -= 1
                        self._cond.notify_all()
            except (OSError, MemoryError) as e:  # the save allocates what is missing, and reports
                log.debug("Preparing O_DIRECT staging buffers stopped: %s", e)
            finally:
                with self._cond:
                    self._coming = 0
                    self._cond.notify_all()

        thread = threading.Thread(target=run, name="ckptguard-buffers", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # interpreter shutting down: take() allocates
            with self._cond:
                self._coming = 0

    def take(self) -> mmap.mmap:
        with self._cond:
            self._cond.wait_for(lambda: self._free or not self._coming)
            if self._free:
                return self._free.pop()
        return _anonymous(self.size)

    def give(self, bufs: Sequence[mmap.mmap]) -> None:
        with self._cond:
            self._free.extend(bufs)
            self._cond.notify_all()


def _stage(buf: mmap.mmap, segs: Sequence[Segment]) -> int:
    """Copy one piece (contiguous segments) to the start of ``buf``, zero-pad it to a whole page;
    return the padded length."""
    import numpy as np  # here: listing and verifying a run need no numpy

    arr = np.frombuffer(buf, dtype=np.uint8)
    base = segs[0].offset
    end = 0
    for s in segs:
        a = s.offset - base
        # numpy's copy is one memcpy without the GIL; torch's copy_ here would start an OpenMP
        # team on this thread that competes with training for the cores.
        np.copyto(arr[a : a + len(s.view)], np.frombuffer(s.view, dtype=np.uint8))
        end = a + len(s.view)
    length = -(-end // ALIGN) * ALIGN
    if length > end:
        arr[end:length] = 0
    return length


class _WriteThread:
    """The writing side: one thread issues the ``O_DIRECT`` writes of staged buffers in order and
    hands each buffer back through ``free``. Without a thread (interpreter exit) the caller's
    thread writes."""

    def __init__(self, w: PositionalWriter, free: queue.SimpleQueue[mmap.mmap | None]) -> None:
        self.w = w
        self.free = free
        self.full: queue.SimpleQueue[tuple[mmap.mmap, int, int] | None] = queue.SimpleQueue()
        self.failed: list[BaseException] = []
        self.refused = False
        self.thread: threading.Thread | None = threading.Thread(target=self._loop, name="ckptguard-direct-write", daemon=True)
        try:
            self.thread.start()
        except RuntimeError:  # interpreter shutting down: the caller's thread writes
            self.thread = None

    @property
    def stopped(self) -> bool:
        return self.refused or bool(self.failed)

    def put(self, buf: mmap.mmap, length: int, offset: int) -> None:
        if self.thread is None:
            self._write((buf, length, offset))
        else:
            self.full.put((buf, length, offset))

    def join(self) -> None:
        if self.thread is not None:
            self.full.put(None)
            self.thread.join()
            self.thread = None

    def _loop(self) -> None:
        while (item := self.full.get()) is not None:
            self._write(item)

    def _write(self, item: tuple[mmap.mmap, int, int]) -> None:
        buf, length, offset = item
        try:
            if not self.stopped:
                view = memoryview(buf)[:length]
                try:
                    self.refused = not self.w.pwrite_direct(view, offset)
                finally:
                    view.release()
        except BaseException as e:  # noqa: BLE001 - re-raised by the staging thread
            self.failed.append(e)
        finally:
            self.free.put(buf)


def write_direct(
    w: PositionalWriter,
    pieces: Iterator[list[Segment]],
    pool: BufferPool,
    after: Callable[[Sequence[Segment]], None],
) -> bool:
    """Write aligned ``pieces`` (each at most ``pool.size`` bytes, starting at a multiple of
    ALIGN) with ``O_DIRECT``: staged (copy, then ``after``: hashing) on the calling thread,
    written on one writer thread. Returns False, consuming nothing or leaving the file to be
    written again, where the filesystem refuses ``O_DIRECT``; raises what a write raised. The
    last page is padded: the caller truncates the file to its size, and closes it (durable)."""
    if not w.open_direct():
        return False
    free: queue.SimpleQueue[mmap.mmap | None] = queue.SimpleQueue()
    for _ in range(DIRECT_BUFFERS):
        free.put(None)  # taken from the pool on first use
    used: list[mmap.mmap] = []
    writes = _WriteThread(w, free)
    try:
        for segs in pieces:
            if writes.stopped:
                break
            buf = free.get()
            if buf is None:
                buf = pool.take()
                used.append(buf)
            length = _stage(buf, segs)
            after(segs)
            writes.put(buf, length, segs[0].offset)
    finally:
        writes.join()
        pool.give(used)
    if writes.failed:
        raise writes.failed[0]
    return not writes.refused
