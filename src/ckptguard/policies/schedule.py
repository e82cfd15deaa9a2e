"""When save() actually saves: every N steps, every T seconds (either fires), forced, or "auto".

``every="auto"`` picks the interval with the Young/Daly formula: with a save that stops training
for ``C`` seconds and a mean time between failures ``MTBF``, the interval minimizing the expected
waste (time spent saving + work lost at a failure) is ``T = sqrt(2 x C x MTBF)``; the waste is then
about ``C/T + T/(2 x MTBF)`` of the run. ``C`` is measured on the run's own saves (for async
saves, the time training was blocked), so the interval adapts to the storage it writes to.

>>> round(young_daly_interval(4.2, 3 * 3600))
301
>>> round(100 * wasted_fraction(301, 4.2, 3 * 3600), 1)
2.8
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "DEFAULT_MTBF_SECONDS",
    "SaveSchedule",
    "observed_mtbf",
    "wasted_fraction",
    "young_daly_interval",
]

log = logging.getLogger(__name__)

# Used when every="auto" and neither mtbf_seconds nor an observed history is available: large
# fleets see an interruption every few hours (Llama 3 405B: 419 in 54 days on 16K GPUs).
DEFAULT_MTBF_SECONDS = 4 * 3600.0


def young_daly_interval(save_cost: float, mtbf: float) -> float:
    """Young/Daly optimal checkpoint interval in seconds: sqrt(2 x save_cost x mtbf)."""
    if save_cost < 0 or mtbf <= 0:
        raise ValueError(f"need save_cost >= 0 and mtbf > 0, got {save_cost}, {mtbf}")
    return math.sqrt(2.0 * save_cost * mtbf)


def wasted_fraction(interval: float, save_cost: float, mtbf: float) -> float:
    """First-order expected fraction of time lost: saving (C/T) plus rework after failures (T/2M)."""
    if interval <= 0 or mtbf <= 0:
        raise ValueError(f"need interval > 0 and mtbf > 0, got {interval}, {mtbf}")
    return save_cost / interval + interval / (2.0 * mtbf)


def observed_mtbf(sessions: Iterable[Mapping[str, Any]]) -> float | None:
    """Mean time between interruptions from a run's session history, or None without any.

    Each session is ``{"start": t0, "last_seen": t1, "clean": bool}``; a session that did not end
    with a clean ``close()`` (crash, kill, preemption) counts as one interruption.
    """
    uptime = 0.0
    failures = 0
    for s in sessions:
        try:
            uptime += max(0.0, float(s["last_seen"]) - float(s["start"]))
        except (KeyError, TypeError, ValueError):
            continue
        if not s.get("clean"):
            failures += 1
    return uptime / failures if failures and uptime > 0 else None


@dataclasses.dataclass
class SaveSchedule:
    every_steps: int | None = None
    every_seconds: float | None = None
    last_save_time: float = dataclasses.field(default_factory=time.monotonic)
    auto: bool = False
    mtbf_seconds: float | None = None
    mtbf_source: str = "given"
    save_cost: float | None = None  # smoothed measured cost of a save (seconds training waits)
    what: str = "saving"  # what the interval is for, in the log ("copying to the durable tier")

    def __post_init__(self) -> None:
        if self.every_steps is not None and self.every_steps < 1:
            raise ValueError(f"every_steps must be >= 1 or None, got {self.every_steps}")
        if self.every_seconds is not None and self.every_seconds <= 0:
            raise ValueError(f"every_seconds must be > 0 or None, got {self.every_seconds}")
        if self.mtbf_seconds is not None and self.mtbf_seconds <= 0:
            raise ValueError(f"mtbf_seconds must be > 0 or None, got {self.mtbf_seconds}")
        if self.auto and self.mtbf_seconds is None:
            self.mtbf_seconds, self.mtbf_source = DEFAULT_MTBF_SECONDS, "default"

    @property
    def auto_seconds(self) -> float | None:
        """The Young/Daly interval from the measured cost, once a save has been measured."""
        if not self.auto or self.save_cost is None or self.mtbf_seconds is None:
            return None
        return young_daly_interval(self.save_cost, self.mtbf_seconds)

    def due(self, step: int, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self.every_steps is not None and step % self.every_steps == 0:
            return True
        if self.auto:
            t = self.auto_seconds
            if t is None:
                return True  # the first save() saves: it measures the cost
            if now - self.last_save_time >= t:
                return True
        return self.every_seconds is not None and now - self.last_save_time >= self.every_seconds

    def saved(self, now: float | None = None, cost: float | None = None) -> None:
        self.last_save_time = time.monotonic() if now is None else now
        if cost is not None and self.auto:
            self.record_cost(cost)

    def record_cost(self, cost: float) -> None:
        """Feed one measured save cost (exponentially smoothed); log when the interval moves."""
        before = self.auto_seconds
        cost = max(0.0, float(cost))
        self.save_cost = cost if self.save_cost is None else 0.7 * self.save_cost + 0.3 * cost
        after = self.auto_seconds
        if after is not None and (before is None or abs(after - before) > 0.2 * before):
            log.info(
                "every='auto': cost %.3fs, MTBF %.0fs (%s) -> %s every %.1fs "
                "(expected waste %.2f%%)",
                self.save_cost, self.mtbf_seconds, self.mtbf_source, self.what, after,
                100 * wasted_fraction(max(after, 1e-9), self.save_cost, self.mtbf_seconds or 1.0),
            )

    def use_observed_mtbf(self, mtbf: float | None) -> None:
        """Adopt an MTBF observed from the run's history unless one was given."""
        if self.auto and mtbf is not None and self.mtbf_source != "given":
            self.mtbf_seconds, self.mtbf_source = float(mtbf), "observed"

    def describe(self) -> dict[str, Any]:
        """What the manifest and ckptguard.json record about the interval."""
        out: dict[str, Any] = {"every_steps": self.every_steps, "every_seconds": self.every_seconds}
        if self.auto:
            out.update(
                mode="auto",
                auto_seconds=None if self.auto_seconds is None else round(self.auto_seconds, 3),
                save_cost_seconds=None if self.save_cost is None else round(self.save_cost, 6),
                mtbf_seconds=self.mtbf_seconds,
                mtbf_source=self.mtbf_source,
            )
        return out
