"""``collect_report``: everything ``ckptguard report`` shows about a run, read from the run itself.

Sources (each one optional; a damaged one is reported in ``RunReport.problems``, never fatal):
``metrics.csv`` (curves), the manifests (checkpoints: status, metrics, save cost, probe drift,
environment, config hash, loss-guard trips, ``slimmed``), ``STATUS.json`` marks, ``history.jsonl``
(pruned checkpoints), ``ckptguard.json`` (sessions, retention, save interval) and ``doctor`` on
the newest checkpoint (every byte of it is read).

>>> rep = collect_report("runs/exp1")
>>> [(s.outcome, s.lost_steps) for s in rep.sessions]
[('killed', None), ('preempted', 0), ('clean', 0)]

Local paths and fsspec URLs alike. Rendering is :mod:`ckptguard.report.htmlreport`'s.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

from ckptguard.errors import CheckpointError, StorageUnavailableError
from ckptguard.format import safejson
from ckptguard.persist.reader import CheckpointReader
from ckptguard.report.diffing import dict_diff
from ckptguard.report.plotting import best_rule, categorize
from ckptguard.report.sessions import Commit, SessionRow, session_rows
from ckptguard.run.catalog import CheckpointInfo, scan
from ckptguard.run.history import HISTORY_FILE, read_history
from ckptguard.run.runrecord import RUN_FILE, read_run_record
from ckptguard.storage import Storage, open_storage

__all__ = ["CATEGORY_ORDER", "Change", "CheckpointRow", "RunReport", "collect_report"]

# Every category a checkpoint mark can have, in the legend's order (``slimmed`` is a ring added to
# the mark of a slimmed checkpoint, whatever its category).
CATEGORY_ORDER = ("kept", "best", "verified", "failed", "corrupt", "pruned", "slimmed")
_ENV_IGNORE = frozenset({"pid"})


@dataclasses.dataclass(frozen=True)
class CheckpointRow:
    """One checkpoint (or a pruned one, known from history.jsonl only)."""

    step: int
    name: str
    category: str  # kept, best, verified, failed, corrupt, pruned
    slimmed: bool = False
    status: str = ""
    problems: tuple[str, ...] = ()
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    created: float | None = None
    save_seconds: float | None = None
    blocked_seconds: float | None = None
    size_bytes: int = 0
    reason: str = ""
    probe_drift: float | None = None  # relative change of the probe output against drift_from
    drift_from: int | None = None
    drift_exceeded: bool = False
    probe_mean: float | None = None


@dataclasses.dataclass(frozen=True)
class Change:
    """A config or environment key that differs between two consecutive checkpoints."""

    step: int
    prev_step: int
    kind: str  # "config" or "environment"
    key: str
    old: Any
    new: Any


@dataclasses.dataclass(frozen=True)
class RunReport:
    url: str
    generated: float
    columns: list[str]
    rows: list[dict[str, Any]]
    checkpoints: list[CheckpointRow]
    sessions: list[SessionRow]
    changes: list[Change]
    best: tuple[str, str]
    save_interval: dict[str, Any]
    doctor: Any = None  # a DoctorReport, or None (not run, or it failed: doctor_error)
    doctor_error: str = ""
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def metric_names(self) -> list[str]:
        """The numeric columns of metrics.csv (in file order)."""
        return [c for c in self.columns if c not in ("step", "wall_time")
                and any(isinstance(r.get(c), float) for r in self.rows)]


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _category(c: CheckpointInfo, marks: dict[str, list[int]]) -> str:
    if not c.valid or c.status in ("failed", "corrupt", "invalid"):
        return "failed" if c.status == "failed" else "corrupt"
    return next((k for k in ("best", "verified") if c.step in marks[k]), "kept")


def _row(c: CheckpointInfo, marks: dict[str, list[int]]) -> CheckpointRow:
    m = c.manifest or {}
    probe = _dict(m.get("probe"))
    drift = _dict(probe.get("drift"))
    return CheckpointRow(
        step=c.step, name=c.name, category=_category(c, marks), slimmed=isinstance(m.get("slimmed"), dict),
        status=c.status, problems=c.problems, metrics=c.metrics,
        created=c.created.timestamp() if c.created is not None else None,
        save_seconds=_num(m.get("save_seconds")), blocked_seconds=_num(m.get("blocked_seconds")),
        size_bytes=c.size_bytes, reason=c.reason,
        probe_drift=_num(drift.get("rel_change")), drift_from=drift.get("from_step") if isinstance(drift.get("from_step"), int) else None,
        drift_exceeded=drift.get("exceeded") is True, probe_mean=_num(probe.get("mean")),
    )


def _config_of(storage: Storage, c: CheckpointInfo) -> Any:
    reader = CheckpointReader(storage, c.name, c.manifest or {})
    return safejson.yaml_loads(reader.blob("config.yaml")) if reader.has("config.yaml") else None


def _changes(storage: Storage, ckpts: list[CheckpointInfo], problems: list[str]) -> list[Change]:
    """Environment and config keys that changed from one checkpoint to the next (by step)."""
    out: list[Change] = []
    usable = [c for c in ckpts if c.manifest is not None]
    configs: dict[str, Any] = {}

    def config(c: CheckpointInfo) -> Any:
        if c.name not in configs:
            try:
                configs[c.name] = _config_of(storage, c)
            except (CheckpointError, ValueError) as e:
                problems.append(f"{c.path}/config.yaml cannot be read for the config changes: {e}")
                configs[c.name] = None
        return configs[c.name]

    for a, b in zip(usable, usable[1:]):
        ma, mb = a.manifest or {}, b.manifest or {}
        env_a, env_b = ma.get("environment"), mb.get("environment")
        if isinstance(env_a, dict) and isinstance(env_b, dict):
            out += [Change(b.step, a.step, "environment", k, x, y) for k, x, y in dict_diff(env_a, env_b, _ENV_IGNORE)]
        if ma.get("config_hash") != mb.get("config_hash"):
            ca, cb = config(a), config(b)
            diffs = dict_diff(ca, cb) if ca is not None and cb is not None else []
            out += [Change(b.step, a.step, "config", k, x, y) for k, x, y in diffs] or [
                Change(b.step, a.step, "config", "config_hash", ma.get("config_hash"), mb.get("config_hash"))
            ]
    return out


def _run_doctor(run: str, storage_options: dict[str, Any] | None, current: Any) -> tuple[Any, str]:
    try:
        from ckptguard.verification.doctor import doctor

        return doctor(run, current, storage_options=storage_options), ""
    except StorageUnavailableError:
        raise
    except (CheckpointError, ValueError, OSError) as e:
        return None, f"{type(e).__name__}: {e}"


def _metrics(storage: Storage, problems: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    from ckptguard.run.metrics_log import read_metrics  # imports torch

    try:
        return read_metrics(storage)
    except StorageUnavailableError:
        raise
    except CheckpointError as e:
        problems.append(f"metrics.csv cannot be read, no curves: {e}")
        return ["step", "wall_time"], []


def _record(storage: Storage, problems: list[str]) -> dict[str, Any]:
    record = read_run_record(storage)
    if not record and storage.exists(RUN_FILE):
        problems.append(f"{storage.describe(RUN_FILE)} exists but cannot be read (not a JSON object, or too large): "
                        "sessions, retention and save interval are not shown")
    return record


def collect_report(
    run: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    doctor: bool = True,
    current: Any = None,
    progress: Callable[[str], None] | None = None,
) -> RunReport:
    """Read run ``run`` (a path or URL) into a :class:`RunReport`. ``doctor``: examine the newest
    checkpoint (``current``: today's TrainState or model for the doctor's key and probe checks)."""
    say = progress or (lambda _msg: None)
    target = os.fspath(run)
    storage = open_storage(target, storage_options)
    problems: list[str] = []
    say("reading the checkpoints")
    ckpts = scan(storage)
    record = _record(storage, problems)
    columns, rows = _metrics(storage, problems)
    history = read_history(storage)
    if not history and storage.exists(HISTORY_FILE) and storage.size(HISTORY_FILE) > 0:
        problems.append(f"{storage.describe(HISTORY_FILE)} holds no readable event: pruned checkpoints are not shown")
    pruned = {int(e["step"]) for e in history if e["event"] == "pruned"}
    metric = "loss" if "loss" in columns else next((c for c in columns if c not in ("step", "wall_time")), "loss")
    best = best_rule(storage, metric)
    marks = categorize(ckpts, pruned, *best)
    logged = {int(r["step"]): r["wall_time"] for r in rows if isinstance(r.get("wall_time"), float)}
    table = [_row(c, marks) for c in ckpts] + [
        CheckpointRow(step=s, name="", category="pruned", created=logged.get(s)) for s in marks["pruned"]
    ]
    table.sort(key=lambda r: r.step)
    for c in ckpts:
        if c.status == "invalid" or c.problems:
            problems.extend(p if c.path in p else f"{c.path}: {p}" for p in c.problems[:3])
    commits = [Commit(c.step, c.created.timestamp() if c.created else None, c.manifest) for c in ckpts]
    sessions = session_rows(record, commits + [Commit(r.step, r.created) for r in table if r.category == "pruned"], problems)
    say("comparing configs and environments")
    changes = _changes(storage, ckpts, problems)
    found, doctor_error = (None, "")
    if doctor and ckpts:
        say("doctor: checking the newest checkpoint")
        found, doctor_error = _run_doctor(target, storage_options, current)
    interval = record.get("save_interval")
    return RunReport(
        url=storage.describe(""), generated=time.time(), columns=list(columns), rows=rows, checkpoints=table,
        sessions=sessions, changes=changes, best=best, save_interval=interval if isinstance(interval, dict) else {},
        doctor=found, doctor_error=doctor_error, problems=problems,
    )
