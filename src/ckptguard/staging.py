"""Host buffers reused from one async save to the next.

``Stager.stage`` copies every tensor of a snapshot into a buffer kept from the previous save
(allocated once; re-allocated only when a shape or dtype changes). With CUDA the buffers are
pinned and the copies non-blocking on a side stream, synchronised once at the end. Training
blocks only for this copy; the background writer then works from the buffers.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["Stager"]


class Stager:
    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self.last_bytes = 0

    def _buffer(self, key: tuple[str, str], t: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            pin = t.device.type == "cuda" and torch.cuda.is_available()
            buf = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=pin)
            self._buffers[key] = buf
        return buf

    def stage(
        self, files: Mapping[str, Mapping[str, torch.Tensor]]
    ) -> dict[str, dict[str, torch.Tensor]]:
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
