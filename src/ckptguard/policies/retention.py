"""What to keep: small policies that combine, and the invariants no policy can break.

A policy looks at the committed checkpoints (ordered by step) and names the ones it keeps, with a
reason. :class:`Retention` combines them: a checkpoint survives if any policy keeps it or an
invariant protects it (the checkpoint the run resumed from, the newest valid one, the best one,
pinned ones). Policies: :class:`KeepLast` (ring buffer), :class:`KeepBest`, :class:`KeepEvery`,
:class:`KeepPhased` (the Checkpoint Rot schedule), :class:`KeepBeforeConfigChange`; a byte budget
(``max_bytes``) then deletes the oldest checkpoints that only a policy keeps. ``full_last`` keeps
the training-only state (the optimizer's tensors) of the newest N kept checkpoints only: older kept ones are decided "slim" (``Decision.slim``, see
:mod:`ckptguard.policies.slimming`), and :mod:`ckptguard.persist.slim` drops those files
(policies decide, never delete). Ordering is always by step number, never by name or time.

>>> Retention(keep_last=3, keep_best=1, metric="val_loss", mode="min")
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from ckptguard.policies.slimming import plan_slimming
from ckptguard.run.catalog import CheckpointInfo

__all__ = [
    "Decision",
    "KeepBeforeConfigChange",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "KeepPhased",
    "Policy",
    "Retention",
    "budget_overrun",
    "plan_retention",
    "stored_size",
]

log = logging.getLogger(__name__)

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
        newest = valid[max(0, len(valid) - self.n) :] if self.n else []  # fewer than n: all of them
        return {c.step: f"last {self.n}" for c in newest}


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
class KeepPhased:
    """The Checkpoint Rot policy: dense early, thin in the middle, dense again at the end.

    Keeps every checkpoint in the first ``head`` fraction of ``total_steps`` (instabilities are
    most common there), every ``thin``-th in the middle, and every one in the final ``tail``
    fraction. "Every 10th" is decided on the step axis so that it is stable while checkpoints are
    deleted: the middle is cut into buckets of ``thin x interval`` steps and the first checkpoint
    of each bucket is kept. ``interval`` is the save interval in steps; ``None`` takes the
    ``every_steps`` the newest valid checkpoint recorded when the run saved by step count only,
    else the smallest gap between consecutive checkpoints (so one extra save, e.g. at a
    preemption, does not turn "every 10th" into "every 3rd" for the rest of a step-scheduled run).
    """

    total_steps: int
    head: float = 0.2
    tail: float = 0.15
    thin: int = 10
    interval: int | None = None

    def __post_init__(self) -> None:
        if self.total_steps <= 0:
            raise ValueError(f"KeepPhased(total_steps) needs total_steps > 0, got {self.total_steps}")
        if not (0.0 <= self.head <= 1.0 and 0.0 <= self.tail <= 1.0 and self.head + self.tail <= 1.0):
            raise ValueError(
                f"KeepPhased needs 0 <= head, tail and head + tail <= 1, got head={self.head}, tail={self.tail}"
            )
        if self.thin < 1:
            raise ValueError(f"KeepPhased(thin) needs thin >= 1, got {self.thin}")
        if self.interval is not None and self.interval < 1:
            raise ValueError(f"KeepPhased(interval) needs interval >= 1 or None, got {self.interval}")

    def keep(self, ckpts: Sequence[CheckpointInfo]) -> dict[int, str]:
        valid = [c for c in ckpts if c.valid]
        head_end = self.head * self.total_steps
        tail_start = (1.0 - self.tail) * self.total_steps
        interval = self.interval or _recorded_every_steps(valid[-1] if valid else None)
        if interval is None:
            gaps = [b.step - a.step for a, b in itertools.pairwise(valid) if b.step > a.step]
            interval = min(gaps) if gaps else 1
        width = max(1, self.thin * interval)
        out: dict[int, str] = {}
        seen_buckets: set[int] = set()
        for c in valid:
            if c.step <= head_end:
                out[c.step] = f"phase: first {self.head:.0%}"
            elif c.step > tail_start:
                out[c.step] = f"phase: final {self.tail:.0%}"
            else:
                bucket = int((c.step - head_end) // width)
                if bucket not in seen_buckets:
                    seen_buckets.add(bucket)
                    out[c.step] = f"phase: every {self.thin}th in the middle"
        return out


def _recorded_every_steps(c: CheckpointInfo | None) -> int | None:
    """The run's save interval in steps, when its checkpoints are scheduled by step count only."""
    rec = (c.manifest or {}).get("save_interval") if c is not None else None
    if not isinstance(rec, dict) or rec.get("every_seconds") is not None or rec.get("mode") is not None:
        return None
    n = rec.get("every_steps")
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else None


def config_hash_of(c: CheckpointInfo) -> str | None:
    h = (c.manifest or {}).get("config_hash")
    return h if isinstance(h, str) else None


@dataclasses.dataclass(frozen=True)
class KeepBeforeConfigChange:
    """Every checkpoint whose config hash differs from the next checkpoint's: the fault lines
    (optimizer switch, batch size change, data pipeline update) worth returning to."""

    def keep(self, ckpts: Sequence[CheckpointInfo]) -> dict[int, str]:
        valid = [c for c in ckpts if c.valid]
        return {
            a.step: "before config change"
            for a, b in itertools.pairwise(valid)
            if config_hash_of(a) != config_hash_of(b)
        }


@dataclasses.dataclass(frozen=True)
class Decision:
    """keep/delete for one checkpoint and why. ``protected``: an invariant keeps it (newest
    valid, best, resumed from, pinned, another run's history); no budget can delete it."""

    step: int
    name: str
    keep: bool
    reasons: tuple[str, ...]
    size_bytes: int = 0
    protected: bool = False
    own_bytes: int | None = None  # bytes in its own files (None: size_bytes); for budgets
    packs: tuple[tuple[str, int], ...] = ()  # shared packs it references, with sizes (incremental)
    slim: bool = False  # kept as weights only (Retention.full_last): to be slimmed, or slimmed before
    slimmed: bool = False  # slimmed before (slim is True too)
    slim_bytes: int = 0  # the bytes of the training-only files slimming drops (0 when slimmed before)


def stored_fields(c: CheckpointInfo, without: Sequence[str] = ()) -> dict[str, Any]:
    """``own_bytes`` and ``packs`` of a checkpoint's Decision, from its manifest: what it really
    stores is its own files plus shared packs that other checkpoints may reference too.
    ``without``: files not counted (those slimming drops)."""
    files = (c.manifest or {}).get("files")
    if not isinstance(files, dict):
        return {}
    own, packs = 0, dict[str, int]()
    for fname, entry in files.items():
        if fname in without:
            continue
        if isinstance(entry.get("packs"), dict):
            packs.update(entry["packs"])
        else:
            own += int(entry.get("size", 0))
    return {"own_bytes": own, "packs": tuple(sorted(packs.items()))}


def stored_size(decisions: Sequence[Decision]) -> int:
    """Bytes the given checkpoints really store together: each one's own files, plus every
    shared pack any of them references counted once (it is freed only when none is kept)."""
    packs: dict[str, int] = {}
    own = 0
    for d in decisions:
        own += d.size_bytes if d.own_bytes is None else d.own_bytes
        packs.update(d.packs)
    return own + sum(packs.values())


@dataclasses.dataclass(frozen=True)
class Retention:
    """Which checkpoints to keep. ``None`` everywhere keeps everything.

    ``keep_last``: ring buffer of the newest N. ``keep_best`` (with ``metric`` and ``mode``): the N
    best. ``keep_every``: every checkpoint at a multiple of that many steps. ``phased=True`` (needs
    ``total_steps``): the Checkpoint Rot policy, see :class:`KeepPhased` (``phase_head``,
    ``phase_tail``, ``phase_thin``). ``keep_config_changes``: every checkpoint that preceded a
    config change. ``max_bytes``: a byte budget; the oldest checkpoints that only a policy (not an
    invariant) keeps are deleted until the kept ones fit, counting bytes really stored (an
    incremental run's shared packs once, see :func:`stored_size`). ``policies``: more Policy objects.
    Invariants always win: the newest valid checkpoint, the best one (when ``metric`` is set), the
    one the run resumed from and pinned ones are never deleted.

    ``full_last``: keep the training-only state (the optimizer's tensors, see
    :mod:`ckptguard.policies.slimming`) of the newest N kept checkpoints only; every older kept
    one is *slimmed* to its weights (``Decision.slim``; :mod:`ckptguard.persist.slim`). Never
    slimmed: the one the run resumed from, the one just saved and pinned ones (the caller's
    ``protected``); the newest N are counted among kept, valid checkpoints that still have their training state. A slimmed
    checkpoint stays valid and restorable by its step (weights only); a plain ``restore()`` never
    resumes from one. The byte budget counts a checkpoint to be slimmed at its slimmed size.

    >>> Retention(keep_last=3, keep_best=1, metric="val_loss", phased=True, total_steps=100_000,
    ...           keep_config_changes=True, max_bytes=50e9, full_last=2)
    """

    keep_last: int | None = None
    keep_best: int = 0
    metric: str | None = None
    mode: str = "min"
    keep_every: int | None = None
    phased: bool = False
    total_steps: int | None = None
    phase_head: float = 0.2
    phase_tail: float = 0.15
    phase_thin: int = 10
    keep_config_changes: bool = False
    max_bytes: int | None = None
    policies: tuple[Policy, ...] = ()
    full_last: int | None = None

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"Retention(keep_last=...) must be >= 1 or None, got {self.keep_last}")
        if self.keep_best < 0:
            raise ValueError(f"Retention(keep_best=...) must be >= 0, got {self.keep_best}")
        if self.keep_best and not self.metric:
            raise ValueError("Retention(keep_best=...) needs metric='name of a metric'")
        if self.mode not in ("min", "max"):
            raise ValueError(f"Retention(mode=...) must be 'min' or 'max', got {self.mode!r}")
        if self.keep_every is not None and self.keep_every < 1:
            raise ValueError(f"Retention(keep_every=...) must be >= 1 or None, got {self.keep_every}")
        if self.phased:
            if not self.total_steps:
                raise ValueError("Retention(phased=True) needs total_steps=<planned length of the run>")
            KeepPhased(self.total_steps, self.phase_head, self.phase_tail, self.phase_thin)  # validates
        if self.max_bytes is not None and self.max_bytes <= 0:
            raise ValueError(f"Retention(max_bytes=...) must be > 0 or None, got {self.max_bytes}")
        if self.full_last is not None and (isinstance(self.full_last, bool) or self.full_last < 1):
            raise ValueError(f"Retention(full_last=...) must be >= 1 or None, got {self.full_last}")
        for p in self.policies:
            if not isinstance(p, Policy):
                raise TypeError(f"Retention(policies=...) items need a keep() method, got {p!r}")

    @property
    def keeps_everything(self) -> bool:
        return (
            self.keep_last is None and not self.phased and not self.policies and self.max_bytes is None
            and self.full_last is None
        )

    def all_policies(self) -> list[Policy]:
        out: list[Policy] = []
        if self.keep_last is not None:
            out.append(KeepLast(self.keep_last))
        if self.keep_best and self.metric:
            out.append(KeepBest(self.keep_best, self.metric, self.mode))
        if self.keep_every:
            out.append(KeepEvery(self.keep_every))
        if self.phased and self.total_steps:
            out.append(KeepPhased(self.total_steps, self.phase_head, self.phase_tail, self.phase_thin))
        if self.keep_config_changes:
            out.append(KeepBeforeConfigChange())
        out.extend(self.policies)
        return out

    def best(self, ckpts: Sequence[CheckpointInfo]) -> CheckpointInfo | None:
        if not self.metric:
            return None
        ranked = KeepBest(1, self.metric, self.mode).ranked(ckpts)
        return ranked[0] if ranked else None

    def unranked(self, step: int, metrics: Mapping[str, Any] | None) -> str | None:
        """Why the checkpoint of ``step`` can never be kept as the best (``keep_best``'s metric is
        missing from the metrics its save got), or None."""
        if not self.keep_best or not self.metric or self.metric in (metrics or {}):
            return None
        given = ", ".join(sorted(metrics or {})) or "none"
        return (
            f"Retention keeps the best checkpoint by {self.metric!r}, but the save of step {step} got "
            f"no {self.metric!r} (metrics given: {given}). A checkpoint is ranked only by the metrics "
            f"passed to the save() call that writes it: pass {self.metric!r} there (e.g. the last "
            "evaluation's value)."
        )

    def to_json(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "policies"}

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
    """Decide keep/delete for every checkpoint (sorted by step number, never by name or time).

    ``protected`` adds invariants from the caller (step -> reason): the checkpoint the run
    resumed from, pinned ones, another run's history.
    """
    ckpts = sorted(ckpts, key=lambda c: c.step)
    soft: dict[int, list[str]] = {c.step: [] for c in ckpts}
    hard: dict[int, list[str]] = {c.step: [] for c in ckpts}
    if retention.keep_last is None and not retention.phased and not retention.policies:
        for c in ckpts:
            soft[c.step].append("keep all (no limit set)")
    for policy in retention.all_policies():
        for step, why in policy.keep(ckpts).items():
            soft.setdefault(step, []).append(why)
    valid = [c for c in ckpts if c.valid]
    if valid:
        hard[valid[-1].step].append("newest valid")
    best = retention.best(ckpts)
    if best is not None:
        hard[best.step].append(f"best {retention.metric}={best.metrics[str(retention.metric)]:.6g}")
    for step, why in (protected or {}).items():
        if step in hard:
            hard[step].append(why)
    out = []
    for c in ckpts:
        reasons = tuple(dict.fromkeys(hard[c.step] + soft[c.step]))
        if not reasons:
            reasons = (("not valid: " + "; ".join(c.problems)) if not c.valid else "outside the policy",)
            out.append(Decision(c.step, c.name, False, reasons, c.size_bytes, **stored_fields(c)))
        else:
            out.append(Decision(c.step, c.name, True, reasons, c.size_bytes, protected=bool(hard[c.step]), **stored_fields(c)))
    if retention.full_last is not None:
        out = _with_slimming(ckpts, out, retention.full_last, protected or {})
    if retention.max_bytes is not None:
        out = _apply_budget(out, int(retention.max_bytes))
    return out


def _with_slimming(
    ckpts: Sequence[CheckpointInfo], decisions: list[Decision], n: int, protected: Mapping[int, str]
) -> list[Decision]:
    """``Retention.full_last`` (see :func:`plan_slimming`): a slim Decision's budget fields count
    only the files it keeps."""
    by_step = {c.step: c for c in ckpts}
    slim = plan_slimming([by_step[d.step] for d in decisions if d.keep], n, protected)
    out = []
    for d in decisions:
        drop = slim.get(d.step)
        if drop is None:
            out.append(d)
        elif not drop:
            out.append(dataclasses.replace(d, slim=True, slimmed=True, reasons=(*d.reasons, "slimmed: weights only")))
        else:
            c = by_step[d.step]
            out.append(dataclasses.replace(
                d, slim=True, reasons=(*d.reasons, f"slim: training state kept for the newest {n} only"),
                slim_bytes=sum(int((c.manifest or {})["files"][f].get("size", 0)) for f in drop), **stored_fields(c, drop),
            ))
    return out


def _apply_budget(decisions: list[Decision], budget: int) -> list[Decision]:
    """Delete the oldest checkpoints that only a policy keeps until the kept ones fit; the bytes
    counted are those really stored (:func:`stored_size`: shared packs once)."""
    kept = [d for d in decisions if d.keep]
    total = stored_size(kept)
    users: dict[str, int] = {}
    for d in kept:
        for pack, _ in d.packs:
            users[pack] = users.get(pack, 0) + 1
    out = list(decisions)
    for i, d in enumerate(out):
        if total <= budget:
            break
        if d.keep and not d.protected:
            total -= d.size_bytes if d.own_bytes is None else d.own_bytes
            for pack, size in d.packs:  # a pack is freed with the last kept checkpoint using it
                users[pack] -= 1
                total -= size if users[pack] == 0 else 0
            out[i] = dataclasses.replace(
                d, keep=False, reasons=(f"over byte budget {budget} (was: {'; '.join(d.reasons)})",), slim=False,
                slimmed=False, slim_bytes=0,
            )
    if total > budget:
        log.warning(
            "Retention: the byte budget of %d bytes cannot be met without breaking an invariant; "
            "%d bytes are kept (newest valid, best, resumed-from and pinned checkpoints).",
            budget, total,
        )
    return out


def budget_overrun(decisions: Sequence[Decision], retention: Retention) -> int:
    """Bytes kept beyond ``retention.max_bytes`` (0 when within budget or no budget set)."""
    if retention.max_bytes is None:
        return 0
    return max(0, stored_size([d for d in decisions if d.keep]) - int(retention.max_bytes))
