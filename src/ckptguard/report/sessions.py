"""The sessions of a run, how each ended and the work each failure cost (``ckptguard report``).

A session is one process's life with the run (``RUN/ckptguard.json``, see ckptguard.run.runrecord).
Its end is read from the record: ``clean`` (closed), ``preempted`` (a signal: saved at the next
``save()`` call, then exited), ``hang`` (the watchdog ended it), else ``killed`` (no ``close()``: a
SIGKILL, an OOM, a crash; for the newest session also "still running"). Loss-guard rollbacks
(``loss_guard.trips`` in the manifests the session committed) are events inside a session.

The work a failure cost, in steps:

- a rollback: the steps from the step it rolled back to up to the trip (trained again);
- a hang: from the session's last commit to the last step the watchdog saw;
- a kill: nothing records the last step a killed process reached, so the cost is bounded: the
  steps the next session had to redo from the commits it could not use (``lost_min``), plus less
  than one save interval (``every_steps`` of the session's saves) of work after its last commit;
- a preemption: what the next session redid beyond the preemption save (normally nothing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["Commit", "Rollback", "SessionRow", "session_rows"]


@dataclasses.dataclass(frozen=True)
class Commit:
    """A checkpoint the run committed: its step, when (the manifest's ``created_unix``; for a
    pruned one, the wall time metrics.csv logged at its step) and its manifest (None: pruned)."""

    step: int
    time: float | None
    manifest: Mapping[str, Any] | None = None


@dataclasses.dataclass(frozen=True)
class Rollback:
    """One loss-guard trip and the rollback that followed."""

    step: int
    restored_step: int
    kind: str
    value: float | str
    why: str

    @property
    def lost_steps(self) -> int:
        return max(0, self.step - self.restored_step)


@dataclasses.dataclass(frozen=True)
class SessionRow:
    """One session: when, from where, what it committed, how it ended and what that cost."""

    index: int
    id: str
    start: float | None
    last_seen: float | None
    resumed_from: int | None  # the step it started from (see ``start_inferred``)
    saves: int
    outcome: str  # clean, preempted, hang, killed, running?
    steps: tuple[int, ...]  # the checkpoints it committed (by their creation time)
    rollbacks: tuple[Rollback, ...] = ()
    lost_steps: int | None = None  # exact when known
    lost_min: int = 0  # at least this many (a kill)
    lost_max: int | None = None  # at most this many (a kill: min + one save interval - 1)
    note: str = ""
    start_inferred: bool = False  # a rollback's restore overwrote the recorded start: the previous session's last commit

    @property
    def last_commit(self) -> int | None:
        return self.steps[-1] if self.steps else None


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _int(v: Any) -> int | None:
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else None


def _trips(ckpts: Sequence[Commit]) -> tuple[Rollback, ...]:
    seen: dict[tuple[Any, ...], Rollback] = {}
    for c in ckpts:
        guard = (c.manifest or {}).get("loss_guard")
        trips = guard.get("trips") if isinstance(guard, dict) else None
        for t in trips if isinstance(trips, list) else []:
            if not isinstance(t, dict) or _int(t.get("step")) is None or _int(t.get("restored_step")) is None:
                continue
            value = t.get("value")
            r = Rollback(int(t["step"]), int(t["restored_step"]), str(t.get("kind", "loss")),
                         value if isinstance(value, (int, float, str)) else str(value), str(t.get("why", "")))
            seen.setdefault((r.step, r.restored_step, r.kind), r)
    return tuple(sorted(seen.values(), key=lambda r: (r.restored_step, r.step)))


def _every_steps(ckpts: Sequence[Commit]) -> int | None:
    for c in reversed(ckpts):
        interval = (c.manifest or {}).get("save_interval")
        if isinstance(interval, dict) and _int(interval.get("every_steps")):
            return int(interval["every_steps"])
    return None


def _outcome(s: Mapping[str, Any], newest: bool) -> str:
    if isinstance(s.get("hang"), dict):
        return "hang"
    if s.get("clean") is True:
        return "clean"
    if s.get("preempted") is True:
        return "preempted"
    return "killed or running" if newest else "killed"


def _cost(outcome: str, s: Mapping[str, Any], mine: Sequence[Commit], next_start: int | None,
          base: int | None, every: int | None) -> dict[str, Any]:
    """lost_steps / lost_min / lost_max / note for one session (see the module docstring).
    ``next_start``: the step the next session started from; ``base``: this one's; ``every``: the
    save interval in steps when its own manifests do not say."""
    last = mine[-1].step if mine else base
    redo = max(0, last - next_start) if last is not None and next_start is not None else 0
    redo_note = (f"; the next session resumed from step {next_start}, not from step {last}, and redid {redo} steps"
                 if redo else "")
    if outcome == "hang":
        hang = s["hang"]
        hstep = _int(hang.get("step"))
        lost = max(0, hstep - (last or 0)) if hstep is not None else None
        return {"lost_steps": lost, "note": f"rank {hang.get('rank')} hung after step {hstep}: {hang.get('reason', '')}"}
    if outcome == "preempted":
        return {"lost_steps": redo, "note": f"saved at the signal (step {last}){redo_note}"}
    if outcome == "killed":
        every = _every_steps(mine) or every
        since = f"after step {last}" if last is not None else "since it started"
        bound = f"less than one save interval ({every} steps) {since}" if every else f"the work {since}"
        return {"lost_min": redo, "lost_max": redo + every - 1 if every else None,
                "note": f"no clean close; the steps it trained past its last commit are lost: {bound}{redo_note}"}
    return {"lost_steps": 0} if outcome == "clean" else {}


def session_rows(record: Mapping[str, Any], commits: Sequence[Commit], problems: list[str]) -> list[SessionRow]:
    """The run record's sessions, oldest first, with their commits (by time), ends and costs.
    A malformed session entry is skipped and said in ``problems``. The save interval of a session
    whose checkpoints were all pruned is the nearest one recorded (a manifest's, else the run's)."""
    raw = record.get("sessions")
    if raw is None:
        return []
    if not isinstance(raw, list):
        problems.append(f"ckptguard.json: 'sessions' is a {type(raw).__name__}, not a list; sessions are not shown")
        return []
    sessions = []
    for i, s in enumerate(raw):
        if not isinstance(s, dict) or _num(s.get("start")) is None:
            problems.append(f"ckptguard.json: session #{i + 1} is malformed (no numeric 'start'); skipped")
            continue
        sessions.append(s)
    sessions.sort(key=lambda s: float(s["start"]))
    dated = sorted((c for c in commits if c.time is not None), key=lambda c: c.step)
    parts = []
    for i, s in enumerate(sessions):
        end = float(sessions[i + 1]["start"]) if i + 1 < len(sessions) else float("inf")
        mine = [c for c in dated if c.time is not None and float(s["start"]) <= c.time < end]
        parts.append((s, mine, _trips(mine)))
    starts = _starts(parts)
    interval = record.get("save_interval")
    every = _every_steps(commits) or (_int(interval.get("every_steps")) if isinstance(interval, dict) else None)
    rows: list[SessionRow] = []
    for i, (s, mine, rollbacks) in enumerate(parts):
        newest = i + 1 == len(parts)
        outcome = _outcome(s, newest)
        cost = _cost(outcome, s, mine, None if newest else starts[i + 1][0], starts[i][0], every)
        extra = sum(r.lost_steps for r in rollbacks)
        if extra:
            for key in ("lost_steps", "lost_max"):
                if cost.get(key) is not None:
                    cost[key] += extra
            cost["lost_min"] = cost.get("lost_min", 0) + extra
        rows.append(SessionRow(
            index=len(rows) + 1, id=str(s.get("id", "?")), start=float(s["start"]), last_seen=_num(s.get("last_seen")),
            resumed_from=starts[i][0], saves=_int(s.get("saves")) or 0, outcome=outcome,
            steps=tuple(c.step for c in mine), rollbacks=rollbacks, start_inferred=starts[i][1], **cost,
        ))
    return rows


def _starts(parts: Sequence[tuple[Mapping[str, Any], Sequence[Commit], tuple[Rollback, ...]]]) -> list[tuple[int | None, bool]]:
    """(the step each session started from, inferred?). A rollback's restore overwrites the
    session's recorded ``resumed_from``; the session then started from the newest commit before it
    (the previous session's last one), or fresh."""
    out: list[tuple[int | None, bool]] = []
    for i, (s, _mine, rollbacks) in enumerate(parts):
        recorded = _int(s.get("resumed_from"))
        if rollbacks and recorded == rollbacks[-1].restored_step:
            prev = [c.step for _s, m, _r in parts[:i] for c in m]
            out.append((max(prev) if prev else None, True))
        else:
            out.append((recorded, False))
    return out
