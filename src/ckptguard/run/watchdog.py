"""Hang watchdog: turn a rank stuck in a collective or in user code into a crash with evidence.

A daemon thread watches a heartbeat (the monotonic time of the last completed step). When no
step completes for ``seconds``, it writes every thread's stack (and the collective flight
recorder's dump where the backend offers one) to ``RUN/hangs/hang-<host>-rank<r>-<utc>.txt``,
logs an ERROR naming that file and the step it was stuck after, and ends the process with
:data:`HANG_EXIT_CODE` through ``os._exit`` (a main thread stuck in C code cannot be interrupted
politely). Under ``torchrun --max-restarts=N`` the elastic agent then restarts every worker, and
the run resumes from its newest checkpoint.

Saves by the manager are not steps that hang: while one runs (:meth:`Watchdog.saving`) the
deadline is ``save_seconds`` instead, and when it is the save that overruns, the message says so.
The end of the watch (leaving the ``with`` block, or ``CheckpointManager.close()``) first waits for
the pending async save under that same deadline (``drain``), so a save that hangs at the very end
is caught too. Before exiting, the watchdog hands the hang to ``on_hang`` (the manager records it
in the run's history, where the observed MTBF counts it).

>>> with mgr.watchdog(300):              # CheckpointManager.watchdog starts one
...     for step in range(start, total):
...         train_step()
...         mgr.save(step + 1, state)    # every save() call is a heartbeat
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import faulthandler
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from ckptguard.storage import Storage

__all__ = ["HANG_EXIT_CODE", "HANGS_DIR", "Watchdog", "WatchdogOptions", "stack_report"]

log = logging.getLogger(__name__)

HANG_EXIT_CODE = 75
"""Exit status of a process the watchdog ended (EX_TEMPFAIL: retrying may succeed)."""

HANGS_DIR = "hangs"
"""Where in the run directory the stack reports go."""


@dataclasses.dataclass(frozen=True)
class WatchdogOptions:
    """How the watchdog decides that a rank hangs.

    Args:
        seconds: a hang is this long without a heartbeat (a completed step or a ``save()`` call).
        save_seconds: the deadline of one save by the manager (default ``4 x seconds``); keep
            it shorter than the collective timeout (``init_process_group(timeout=...)``).
        poll_seconds: how often the thread looks (default ``min(1, seconds / 4)``).
        dump_seconds: the most time spent writing the report before exiting anyway.
        exit_code: the process's exit status after a hang.
        collective_timeout: the ``init_process_group(timeout=...)`` in seconds, if known: both
            deadlines must then be shorter, so that the watchdog fires (and leaves Python stacks)
            before the collective's own timeout does.
    """

    seconds: float
    save_seconds: float | None = None
    poll_seconds: float | None = None
    dump_seconds: float = 20.0
    exit_code: int = HANG_EXIT_CODE
    collective_timeout: float | None = None

    def __post_init__(self) -> None:
        for name in ("seconds", "save_seconds", "poll_seconds", "dump_seconds", "collective_timeout"):
            value = getattr(self, name)
            if value is None and name != "seconds":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf"):
                raise ValueError(f"WatchdogOptions.{name} must be a positive number of seconds, got {value!r}")
        if isinstance(self.exit_code, bool) or not isinstance(self.exit_code, int) or not 1 <= self.exit_code <= 255:
            raise ValueError(f"WatchdogOptions.exit_code must be an exit status in 1..255, got {self.exit_code!r}")
        limit = self.collective_timeout
        if limit is not None and max(self.seconds, self.save_deadline) >= limit:
            raise ValueError(
                f"WatchdogOptions: the step deadline (seconds={self.seconds:g}) and the save deadline "
                f"(save_seconds={self.save_deadline:g}{'' if self.save_seconds is not None else ', by default 4 x seconds'}) "
                f"must both be shorter than collective_timeout={limit:g} s, or the collective times out first and no "
                "Python stacks are written; pass a smaller save_seconds= / seconds=, or raise init_process_group(timeout=...)"
            )

    @property
    def save_deadline(self) -> float:
        """Seconds one save may block the training thread."""
        return self.save_seconds if self.save_seconds is not None else 4 * self.seconds

    @property
    def poll(self) -> float:
        """Seconds between two looks at the heartbeat."""
        return self.poll_seconds if self.poll_seconds is not None else min(1.0, self.seconds / 4)


def stack_report() -> str:
    """Every thread's Python stack, by thread name, innermost frame last."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f"--- thread {names.get(ident, '?')} (id {ident}) ---\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(parts)


def flight_recorder_dump() -> bytes | None:
    """The process groups' flight-recorder trace (pickled by torch), where the backend offers one."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    try:
        from torch._C import _distributed_c10d as c10d  # the public dump API lives here (torch >= 2.4)

        dump = getattr(c10d, "_dump_fr_trace", None) or getattr(c10d, "_dump_nccl_trace", None)
        data = dump() if dump is not None else None
    except Exception as e:  # noqa: BLE001 - best effort: a backend without a recorder
        log.debug("No flight-recorder dump: %s", e)
        return None
    return data if isinstance(data, bytes) and data else None


class Watchdog:
    """A daemon thread that ends the process when no heartbeat arrives in time.

    Call :meth:`beat` after every step (``CheckpointManager.save`` does), wrap the manager's
    saves in :meth:`saving`, and :meth:`finish` (or leave the ``with`` block) when training ends.

    Args:
        storage: where the reports go (``RUN/hangs/``).
        options: the deadlines.
        rank: this process's rank (in the report's name and messages).
        drain: what :meth:`finish` waits for, under the save deadline, before the thread stops
            (the manager's pending async save); it may raise (the save's error).
        on_hang: called with the hang (``rank``, ``step``, ``reason``, ``report``: where the stacks
            went or None, ``time``) after the report is written, within ``dump_seconds``, just
            before the exit: the manager records it in the run's history.
    """

    def __init__(
        self, storage: Storage, options: WatchdogOptions, *, rank: int = 0,
        drain: Callable[[], None] | None = None, on_hang: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.storage = storage
        self.options = options
        self.rank = rank
        self.drain = drain
        self.on_hang = on_hang
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._step: int | None = None
        self._saving: tuple[float, str] | None = None  # (since, what) while the manager saves
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ckptguard-watchdog", daemon=True)  # not started

    def start(self) -> Watchdog:
        """Start watching (again, after :meth:`stop`); the clock starts now."""
        self.beat()
        if not self._thread.is_alive():
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._watch, name="ckptguard-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching (idempotent)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.options.poll + 1)

    def finish(self) -> None:
        """End the watch: wait for ``drain`` (the pending save) under the save deadline, then stop.
        A stopped watchdog only stops (nothing would catch a hang). Raises what ``drain`` raises."""
        try:
            if self.drain is not None and self.running:
                step = self._step
                after = "" if step is None else f", after step {step}"
                with self.saving(step, what=f"the pending async save (waited for at the end of the watch{after})"):
                    self.drain()
        finally:
            self.stop()

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.finish()  # a save that hangs after the last step is caught too
        else:
            self.stop()  # an error is on its way: the manager's close() waits for the save

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def beat(self, step: int | None = None) -> None:
        """A step completed (``step``: its number, for the message)."""
        with self._lock:
            self._last = time.monotonic()
            if step is not None:
                self._step = step

    @contextlib.contextmanager
    def saving(self, step: int | None, *, what: str | None = None) -> Iterator[None]:
        """The manager saves ``step``: the save deadline applies until the block ends (a beat).
        ``what``: the wait's name in the message (default ``"the save of step N"``)."""
        self.beat(step)
        with self._lock:
            self._saving = (time.monotonic(), what or f"the save of step {step}")
        try:
            yield
        finally:
            with self._lock:
                self._saving = None
            self.beat(step)

    def overdue(self) -> str | None:
        """Why the process counts as hung now, or None."""
        now = time.monotonic()
        with self._lock:
            last, step, saving = self._last, self._step, self._saving
        after = "before the first step" if step is None else f"after step {step}"
        if saving is not None:
            since, what = saving
            if now - since > self.options.save_deadline:
                return (
                    f"{what} has blocked for {now - since:.1f} s (save deadline "
                    f"{self.options.save_deadline:g} s): the save itself is what is slow (storage), or another "
                    "rank never reached it"
                )
            return None
        if now - last > self.options.seconds:
            return f"no step completed for {now - last:.1f} s (deadline {self.options.seconds:g} s), stuck {after}"
        return None

    def _watch(self) -> None:
        while not self._stop.wait(self.options.poll):
            reason = self.overdue()
            if reason is not None and not self._stop.is_set():
                self.fire(reason)

    def fire(self, reason: str) -> None:
        """Write the report, log it and end the process with the hang exit code."""
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        name = f"{HANGS_DIR}/hang-{socket.gethostname()}-rank{self.rank}-{stamp}"
        header = f"ckptguard watchdog: rank {self.rank} (pid {os.getpid()}) hangs: {reason}\n\n"
        text = header + stack_report()
        hang = {"rank": self.rank, "step": self._step, "reason": reason, "time": round(time.time(), 3)}
        written = self._write_bounded(name, text, hang)
        if written is None:
            sys.stderr.write(text)
            faulthandler.dump_traceback(all_threads=True)
        log.error(
            "Hang on rank %d: %s. Stacks of every thread: %s. Exiting with code %d so that the elastic "
            "agent restarts the group (torchrun --max-restarts); the run resumes from its newest checkpoint.",
            self.rank, reason, written or "stderr (the run directory could not be written)", self.options.exit_code,
        )
        with contextlib.suppress(Exception):
            sys.stderr.flush()
            sys.stdout.flush()
        os._exit(self.options.exit_code)

    def _write_bounded(self, name: str, text: str, hang: dict[str, Any]) -> str | None:
        """Write the report (and flight-recorder dump), then hand ``hang`` to ``on_hang``, within
        ``dump_seconds``; the report's location or None."""
        done: list[str] = []

        def write() -> None:
            try:
                self.storage.makedirs(HANGS_DIR)
                self.storage.replace_file(f"{name}.txt", text.encode())
                done.append(self.storage.describe(f"{name}.txt"))
                fr = flight_recorder_dump()
                if fr is not None:
                    self.storage.replace_file(f"{name}.flight-recorder.pkl", fr)
            except Exception as e:  # noqa: BLE001 - the process exits either way; say why on stderr
                log.error("Could not write the hang report %s: %s", name, e)
            if self.on_hang is not None:
                try:
                    self.on_hang({**hang, "report": done[0] if done else None})
                except Exception as e:  # noqa: BLE001 - as above: the exit comes next
                    log.error("Could not record the hang in the run's history: %s", e)

        t = threading.Thread(target=write, name="ckptguard-hang-report", daemon=True)
        t.start()
        t.join(self.options.dump_seconds)
        return done[0] if done else None
