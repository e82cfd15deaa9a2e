"""Progress bars that appear only when a transfer takes longer than a couple of seconds.

>>> with delayed_progress("verifying", total_bytes) as advance:
...     for chunk in work():
...         advance(len(chunk))

Quick commands print nothing extra; a long verify or download shows a transient rich bar (bytes,
speed, time left) on stderr after ``delay`` seconds, and it disappears when the work is done.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from ckptguard.cli.common import err_console

__all__ = ["DELAY_SECONDS", "delayed_progress"]

DELAY_SECONDS = 2.0


class _Advance:
    """``advance(n, description=None)``; ``shown`` tells whether the bar appeared."""

    def __init__(self, prog: Progress, task: TaskID, started: threading.Event) -> None:
        self._prog = prog
        self._task = task
        self._started = started

    @property
    def shown(self) -> bool:
        return self._started.is_set()

    def __call__(self, n: float = 1, description: str | None = None) -> None:
        if description is None:
            self._prog.update(self._task, advance=n)
        else:
            self._prog.update(self._task, advance=n, description=description)


@contextlib.contextmanager
def delayed_progress(
    description: str, total: float | None, *, delay: float = DELAY_SECONDS, unit_bytes: bool = True
) -> Iterator[_Advance]:
    """Yield ``advance(n, description=None)``; the bar shows only once ``delay`` seconds pass."""
    columns = [TextColumn("{task.description}"), BarColumn()]
    if unit_bytes:
        columns += [DownloadColumn(), TransferSpeedColumn()]
    columns.append(TimeRemainingColumn())
    prog = Progress(*columns, console=err_console(), transient=True)
    task = prog.add_task(description, total=total)
    started = threading.Event()
    lock = threading.Lock()

    def start() -> None:
        with lock:
            if not closed.is_set():
                prog.start()
                started.set()

    closed = threading.Event()
    timer = threading.Timer(delay, start)
    timer.daemon = True
    timer.start()

    advance = _Advance(prog, task, started)
    try:
        yield advance
    finally:
        timer.cancel()
        with lock:
            closed.set()
            if started.is_set():
                prog.stop()
