"""Benchmark building blocks: the training state, an RSS sampler, fsync helpers, the machine.

Every measurement that reports memory runs in a fresh subprocess (``worker.py``), so the peak RSS
of one method is never inflated by the allocations of another.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class StateSpec:
    """A stack of ``layers`` Linear(width, width): 2 tensors per layer in the model, 2 more per
    parameter (Adam's exp_avg and exp_avg_sq) after one step (plus Adam's scalar ``step``s).

    The full spec (50 x 1359) is 92.4M parameters, 300 large tensors, 1.11 GB of state.
    """

    layers: int = 50
    width: int = 1359

    @property
    def params(self) -> int:
        return self.layers * (self.width * self.width + self.width)

    @property
    def nbytes(self) -> int:
        return 3 * 4 * self.params + 4 * 2 * self.layers  # fp32 params + 2 Adam moments + steps


FULL = StateSpec()
QUICK = StateSpec(layers=10, width=256)


def build_state(spec: StateSpec, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Model + Adam after one step (so the optimizer holds its full state)."""
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(spec.width, spec.width) for _ in range(spec.layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for p in model.parameters():  # a cheap "step": gradients without a forward pass
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples RSS every ``interval`` seconds on a thread; ``extra`` = peak - RSS at start.

    ``/proc/self/status`` VmHWM would miss nothing but cannot be reset portably inside a process;
    a 2 ms sampler sees every allocation that lives longer than that (a full state copy does).
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.base = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def extra(self) -> int:
        return max(0, self.peak - self.base)


def evict(path: str | os.PathLike[str]) -> None:
    """Drop a file's or a tree's pages from the page cache (a cold read without root)."""
    paths = [os.path.join(r, f) for r, _d, fs in os.walk(path) for f in fs] if os.path.isdir(path) else [path]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fsync_path(path: str) -> None:
    """fsync a file, or every file in a directory tree and the directories themselves."""
    if os.path.isdir(path):
        for root, _dirs, files in os.walk(path):
            for name in files:
                fsync_path(os.path.join(root, name))
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    else:
        fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def machine() -> dict[str, Any]:
    mem = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "ram_gb": round(mem / 1e9, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def replace_section(path: Path, body: str, name: str) -> None:
    """Rewrite the part of ``path`` (BENCHMARKS.md) between ``<!-- name:begin -->`` and
    ``<!-- name:end -->`` with ``body``; append the section when the markers are not there yet."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def start_s3() -> tuple[Any, str]:
    """moto's standalone server on a free loopback port, the AWS environment pointed at it."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    import s3fs  # noqa: F401 - fail here, not in the ranks, when the s3 extra is missing
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint})
    return server, endpoint
