"""Host buffers reused from one async save to the next.

``Stager.stage`` copies every tensor of a snapshot into a buffer kept from the previous save
(allocated once; re-allocated only when a shape or dtype changes). With CUDA the buffers are
pinned and the copies non-blocking on a side stream, synchronised once at the end. Training
blocks only for this copy; the background writer then works from the buffers.

The first copy into fresh memory costs 3-5x a copy into reused buffers (page faults: 0.34-0.41 s
against 0.08 s per GB measured here), so ``prepare`` allocates and touches the buffers on a
low-priority thread ahead of the first save (the manager calls it on the first ``save()`` call
that is not due); ``stage`` waits for that thread before using them.
"""

from __future__ import annotations

import logging
import threading
import types
from collections.abc import Callable, Mapping

import torch

from ckptguard.errors import CheckpointError
from ckptguard.persist.parallel_io import lower_thread_priority

__all__ = ["Stager"]

log = logging.getLogger(__name__)


class Stager:
    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self._preparing: threading.Thread | None = None
        self.prepared = False
        self.last_bytes = 0

    @staticmethod
    def _fits(buf: torch.Tensor | None, t: torch.Tensor) -> bool:
        return buf is not None and buf.shape == t.shape and buf.dtype == t.dtype

    @staticmethod
    def _allocate(t: torch.Tensor) -> torch.Tensor:
        pin = t.device.type == "cuda" and torch.cuda.is_available()
        return torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)

    def _buffer(self, key: tuple[str, str], t: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if not self._fits(buf, t):
            buf = self._buffers[key] = self._allocate(t)
        return buf  # type: ignore[return-value]

    def prepare(self, files: Callable[[], Mapping[str, Mapping[str, torch.Tensor]]]) -> None:
        """Allocate and touch the buffers that ``files()`` (the tensors a save would stage) will
        need, on a low-priority thread; once. A CheckpointError from ``files()`` is left for the
        save itself to report."""
        if self.prepared:
            return
        self.prepared = True
        try:
            wanted = [((f, n), t) for f, g in files().items() for n, t in g.items()]
        except CheckpointError as e:
            log.debug("Not preparing staging buffers: %s", e)
            return

        def run() -> None:
            lower_thread_priority()
            try:
                for key, t in wanted:
                    buf = self._allocate(t)
                    buf.reshape(-1).view(torch.uint8).numpy().fill(0)  # fault the pages in; numpy: no OpenMP team
                    self._buffers[key] = buf
            except (RuntimeError, MemoryError) as e:  # the save allocates what is missing, and reports
                log.debug("Preparing staging buffers stopped: %s", e)

        thread = threading.Thread(target=run, name="ckptguard-stage-prepare", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # interpreter shutting down: the save allocates them
            return
        self._preparing = thread

    @property
    def buffers(self) -> Mapping[tuple[str, str], torch.Tensor]:
        """The buffers kept for the next save, by (file, tensor name), read-only; waits for a
        preparation in progress (see ``prepare``)."""
        self._join()
        return types.MappingProxyType(self._buffers)

    def _join(self) -> None:
        if self._preparing is not None:
            self._preparing.join()
            self._preparing = None

    def stage(
        self, files: Mapping[str, Mapping[str, torch.Tensor]]
    ) -> dict[str, dict[str, torch.Tensor]]:
        self._join()
        self.prepared = True
        out: dict[str, dict[str, torch.Tensor]] = {}
        any_cuda = False
        nbytes = 0
        live = set()
        with torch.no_grad():
            for fname, tensors in files.items():
                group: dict[str, torch.Tensor] = {}
                for name, t in tensors.items():
                    key = (fname, name)
                    live.add(key)
                    buf = self._buffer(key, t)
                    src = t.detach()
                    if src.device.type == "cuda":
                        any_cuda = True
                        buf.copy_(src, non_blocking=True)
                    else:
                        buf.copy_(src)
                    group[name] = buf
                    nbytes += buf.numel() * buf.element_size()
                out[fname] = group
        if any_cuda:
            torch.cuda.synchronize()
        for key in list(self._buffers):
            if key not in live:
                del self._buffers[key]
        self.last_bytes = nbytes
        return out
