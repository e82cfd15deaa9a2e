"""Preemption: a signal only raises a flag; the next save() saves synchronously and exits.

Spot instances and schedulers send SIGTERM (Slurm: SIGUSR1 with --signal) some seconds before
the kill. :class:`PreemptionGuard` installs handlers that record the signal and nothing else.
``CheckpointManager.save`` checks the flag at its next call (a safe point between steps), saves
the step reached, waits for it to be durable, and exits with ``exit_code``. A second signal while
the flag is already up restores the default handler and re-sends itself, so the process still
ends if the loop is stuck. Pollers (callables returning True when termination is near, e.g. a
cloud metadata check) raise the same flag; they are called from save() at most every
``poll_seconds``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

__all__ = ["DEFAULT_SIGNALS", "PreemptionGuard"]

log = logging.getLogger(__name__)
DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class PreemptionGuard:
    def __init__(
        self,
        signals: Sequence[int] = DEFAULT_SIGNALS,
        *,
        exit_code: int | None = None,
        pollers: Sequence[Callable[[], bool]] = (),
        poll_seconds: float = 5.0,
    ) -> None:
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.exit_code = exit_code
        self.pollers = tuple(pollers)
        self.poll_seconds = poll_seconds
        self.signum: int | None = None
        self.reason: str | None = None
        self._old: dict[signal.Signals, Any] = {}
        self._last_poll = 0.0
        self._installed = False

    @property
    def triggered(self) -> bool:
        return self.reason is not None

    def trigger(self, reason: str, signum: int | None = None) -> None:
        """Raise the flag (from a handler, a poller, or user code)."""
        if self.reason is None:
            self.reason = reason
            self.signum = signum

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if self.triggered:
            # Second signal: give up on a clean save, behave as if we never intervened.
            signal.signal(signum, self._old.get(signal.Signals(signum), signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.trigger(f"signal {signal.Signals(signum).name}", signum)

    def poll(self) -> bool:
        """Run the pollers (rate-limited); return whether the flag is up."""
        if not self.triggered and self.pollers:
            now = time.monotonic()
            if now - self._last_poll >= self.poll_seconds:
                self._last_poll = now
                for p in self.pollers:
                    try:
                        if p():
                            self.trigger(f"poller {getattr(p, '__name__', repr(p))}")
                            break
                    except Exception as e:  # noqa: BLE001 - a flaky poller must not kill training
                        log.warning("Preemption poller %r failed: %s", p, e)
        return self.triggered

    def resolved_exit_code(self) -> int:
        if self.exit_code is not None:
            return self.exit_code
        return 128 + self.signum if self.signum is not None else 0

    def install(self) -> None:
        if self._installed:
            return
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("preemption_guard() must be entered from the main thread")
        for s in self.signals:
            self._old[s] = signal.signal(s, self._handler)
        self._installed = True

    def uninstall(self) -> None:
        if not self._installed:
            return
        for s, old in self._old.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        self._old.clear()
        self._installed = False
