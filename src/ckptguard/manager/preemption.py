"""The manager's side of preemption: the guard in force, and the code every rank agrees on.

A signal only sets a flag (ckptguard.policies.preemption); ``save()`` polls :meth:`Preemption.code`,
the ranks agree on it (ckptguard.distributed.coordination) and, when any rank was preempted,
every rank :meth:`~Preemption.trigger`\\ s its own guard, saves the same step and exits with the
same code.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

from ckptguard.distributed.coordination import preempt_code, signum_of
from ckptguard.errors import CheckpointError
from ckptguard.policies.preemption import PreemptionGuard

__all__ = ["Preemption", "logged"]

log = logging.getLogger(__name__)


class Preemption:
    """The guard installed by ``preemption_guard()`` (or made when another rank was preempted)."""

    def __init__(self) -> None:
        self.guard: PreemptionGuard | None = None

    def code(self) -> int:
        """This process's preemption code: 0 none, else the signal number (or a stand-in)."""
        guard = self.guard
        return preempt_code(guard is not None and guard.poll(), guard.signum if guard is not None else None)

    def trigger(self, code: int) -> PreemptionGuard:
        """Preempted (here or on another rank, as ``code`` says): trigger the guard; return it."""
        if self.guard is None:
            self.guard = PreemptionGuard(())
        self.guard.trigger("preemption on another rank", signum_of(code))
        return self.guard

    @contextlib.contextmanager
    def installed(
        self, signals: tuple[int, ...], *, exit_code: int | None, pollers: tuple[Callable[[], bool], ...], poll_seconds: float
    ) -> Iterator[PreemptionGuard]:
        """Install a guard for the duration of the block; the previous one is back afterwards."""
        guard = PreemptionGuard(signals, exit_code=exit_code, pollers=pollers, poll_seconds=poll_seconds)
        guard.install()
        previous, self.guard = self.guard, guard
        try:
            yield guard
        finally:
            guard.uninstall()
            self.guard = previous

    def uninstall(self) -> None:
        if self.guard is not None:
            self.guard.uninstall()


@contextlib.contextmanager
def logged(kind: type[CheckpointError]) -> Iterator[None]:
    """Log an error of ``kind`` instead of raising it (where going on matters more: the exit)."""
    try:
        yield
    except kind as e:
        log.error("%s", e)
