"""What to keep: small policies that combine, and the invariants no policy can break.

A policy looks at the committed checkpoints (ordered by step) and names the ones it keeps, with a
reason. :class:`Retention` combines them: a checkpoint survives if any policy keeps it or an
invariant protects it (the checkpoint the run resumed from, the newest valid one, the best one).

>>> Retention(keep_last=3, keep_best=1, metric="val_loss", mode="min")
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from ckptguard.catalog import CheckpointInfo

__all__ = ["Decision", "KeepBest", "KeepEvery", "KeepLast", "Policy", "Retention", "plan_retention"]


@runtime_checkable
class Policy(Protocol):
    def keep(self, ckpts: Sequence[CheckpointInfo]) -> dict[int, str]:
        """Map step -> reason for every checkpoint this policy keeps (ckpts sorted by step)."""
        ...


@dataclasses.dataclass(frozen=True)
class KeepLast:
    """The ring buffer: the newest ``n`` valid checkpoints."""

    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"KeepLast(n) needs n >= 0, got {self.n}")

    def keep(self, ckpts: Sequence[CheckpointInfo]) -> dict[int, str]:
        valid = [c for c in ckpts if c.valid]
        return {c.step: f"last {self.n}" for c in valid[len(valid) - self.n :]} if self.n else {}


def _metric(c: CheckpointInfo, metric: str) -> float | None:
    v = c.metrics.get(metric)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


@dataclasses.dataclass(frozen=True)
class KeepBest:
    """The ``n`` best valid checkpoints by ``metric`` (``mode`` "min" or "max")."""

    n: int
    metric: str
    mode: str = "min"

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"KeepBest(n) needs n >= 0, got {self.n}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"KeepBest(mode=...) must be 'min' or 'max', got {self.mode!r}")
        if not self.metric:
            raise ValueError("KeepBest needs the name of a metric")

    def ranked(self, ckpts: Sequence[CheckpointInfo]) -> list[CheckpointInfo]:
        scored = [(v, c) for c in ckpts if c.valid and (v := _metric(c, self.metric)) is not None]
        scored.sort(key=lambda vc: (vc[0] if self.mode == "min" else -vc[0], -vc[1].step))
        return [c for _, c in scored]

    def keep(self, ckpts: Sequence[CheckpointInfo]) -> dict[int, str]:
        return {
            c.step: f"best {self.metric}={c.metrics[self.metric]:.6g}"
            for c in self.ranked(ckpts)[: self.n]
        }


@dataclasses.dataclass(frozen=True)
class KeepEvery:
    """Every checkpoint whose step is a multiple of ``steps`` (long-term history)."""

    steps: int

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"KeepEvery(steps) needs steps > 0, got {self.steps}")

    def keep(self, ckpts: Sequence[CheckpointInfo]) -> dict[int, str]:
        return {c.step: f"every {self.steps} steps" for c in ckpts if c.valid and c.step % self.steps == 0}


@dataclasses.dataclass(frozen=True)
class Decision:
    step: int
    name: str
    keep: bool
    reasons: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Retention:
    """Which checkpoints to keep. ``None`` everywhere keeps everything.

    ``keep_last``: ring buffer of the newest N. ``keep_best`` (with ``metric`` and ``mode``): the N
    best. ``keep_every``: every checkpoint at a multiple of that many steps. ``policies``: more
    Policy objects to combine.
    """

    keep_last: int | None = None
    keep_best: int = 0
    metric: str | None = None
    mode: str = "min"
    keep_every: int | None = None
    policies: tuple[Policy, ...] = ()

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"Retention(keep_last=...) must be >= 1 or None, got {self.keep_last}")
        if self.keep_best and not self.metric:
            raise ValueError("Retention(keep_best=...) needs metric='name of a metric'")
        if self.mode not in ("min", "max"):
            raise ValueError(f"Retention(mode=...) must be 'min' or 'max', got {self.mode!r}")
        for p in self.policies:
            if not isinstance(p, Policy):
                raise TypeError(f"Retention(policies=...) items need a keep() method, got {p!r}")

    @property
    def keeps_everything(self) -> bool:
        return self.keep_last is None and not self.policies

    def all_policies(self) -> list[Policy]:
        out: list[Policy] = []
        if self.keep_last is not None:
            out.append(KeepLast(self.keep_last))
        if self.keep_best and self.metric:
            out.append(KeepBest(self.keep_best, self.metric, self.mode))
        if self.keep_every:
            out.append(KeepEvery(self.keep_every))
        out.extend(self.policies)
        return out

    def best(self, ckpts: Sequence[CheckpointInfo]) -> CheckpointInfo | None:
        if not self.metric:
            return None
        ranked = KeepBest(1, self.metric, self.mode).ranked(ckpts)
        return ranked[0] if ranked else None

    def to_json(self) -> dict[str, Any]:
        return {
            "keep_last": self.keep_last,
            "keep_best": self.keep_best,
            "metric": self.metric,
            "mode": self.mode,
            "keep_every": self.keep_every,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Retention:
        fields = {f.name for f in dataclasses.fields(cls)} - {"policies"}
        return cls(**{k: v for k, v in data.items() if k in fields})


def plan_retention(
    ckpts: Sequence[CheckpointInfo],
    retention: Retention,
    *,
    protected: Mapping[int, str] | None = None,
) -> list[Decision]:
    """Decide keep/delete for every checkpoint (sorted by step number, never by name or time)."""
    ckpts = sorted(ckpts, key=lambda c: c.step)
    reasons: dict[int, list[str]] = {c.step: [] for c in ckpts}
    if retention.keeps_everything:
        for c in ckpts:
            reasons[c.step].append("keep all (no limit set)")
    for policy in retention.all_policies():
        for step, why in policy.keep(ckpts).items():
            reasons.setdefault(step, []).append(why)
    valid = [c for c in ckpts if c.valid]
    if valid:
        reasons[valid[-1].step].append("newest valid")
    best = retention.best(ckpts)
    if best is not None:
        reasons[best.step].append(f"best {retention.metric}")
    for step, why in (protected or {}).items():
        if step in reasons:
            reasons[step].append(why)
    out = []
    for c in ckpts:
        why = tuple(dict.fromkeys(reasons[c.step]))
        if not why:
            why = (("not valid: " + "; ".join(c.problems)) if not c.valid else "outside the policy",)
            out.append(Decision(c.step, c.name, False, why))
        else:
            out.append(Decision(c.step, c.name, True, why))
    return out
