"""When save() actually saves: every N steps, every T seconds (either fires), or forced."""

from __future__ import annotations

import dataclasses
import time

__all__ = ["SaveSchedule"]


@dataclasses.dataclass
class SaveSchedule:
    every_steps: int | None = None
    every_seconds: float | None = None
    last_save_time: float = dataclasses.field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        if self.every_steps is not None and self.every_steps < 1:
            raise ValueError(f"every_steps must be >= 1 or None, got {self.every_steps}")
        if self.every_seconds is not None and self.every_seconds <= 0:
            raise ValueError(f"every_seconds must be > 0 or None, got {self.every_seconds}")

    def due(self, step: int, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self.every_steps is not None and step % self.every_steps == 0:
            return True
        return self.every_seconds is not None and now - self.last_save_time >= self.every_seconds

    def saved(self, now: float | None = None) -> None:
        self.last_save_time = time.monotonic() if now is None else now
