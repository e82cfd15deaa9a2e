"""``plot_run``: a run's metric curve from ``metrics.csv`` with its checkpoints marked by status.

>>> summary = plot_run("runs/exp1", "loss.png", metric="loss", log_scale=True)
>>> summary.marks["best"]
[1200]

Checkpoint categories (a checkpoint shows in the first that applies):
failed (behavioural verification failed) / corrupt (bad bytes, missing files), best (by the run's
retention metric, else by the plotted one), verified, kept (committed), pruned (deleted by
retention, from ``RUN/history.jsonl``). Needs the ``plot`` extra (matplotlib); the Agg backend is
used, so no display is needed.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ckptguard.errors import CheckpointNotFoundError
from ckptguard.run.catalog import CheckpointInfo, scan
from ckptguard.run.history import read_history
from ckptguard.run.metrics_log import read_metrics
from ckptguard.run.runrecord import read_run_record
from ckptguard.storage import Storage, open_storage

__all__ = ["CATEGORIES", "PlotSummary", "best_rule", "categorize", "plot_run", "value_at"]

# category -> (label, marker, face colour, edge colour, size)
CATEGORIES: dict[str, tuple[str, str, str, str, float]] = {
    "pruned": ("pruned", "o", "none", "#9e9e9e", 40),
    "kept": ("kept", "o", "#1f77b4", "#0d3c61", 46),
    "verified": ("verified", "D", "#2ca02c", "#145214", 46),
    "best": ("best", "*", "#ffbf00", "#7a5c00", 220),
    "failed": ("failed / corrupt", "X", "#d62728", "#6b0f10", 90),
}


@dataclasses.dataclass(frozen=True)
class PlotSummary:
    """What was drawn: the output path, the metric, points plotted and the marks per category."""

    output: str
    metric: str
    points: int
    marks: dict[str, list[int]]


def best_rule(storage: Storage, metric: str) -> tuple[str, str]:
    """The run's retention metric and mode when recorded, else (plotted metric, "min")."""
    ret = read_run_record(storage).get("retention")  # {} when absent or unreadable
    if isinstance(ret, dict) and ret.get("metric"):
        return str(ret["metric"]), str(ret.get("mode") or "min")
    return metric, "min"


def categorize(
    ckpts: list[CheckpointInfo], pruned: set[int], best_metric: str, best_mode: str
) -> dict[str, list[int]]:
    """Steps per category (see the module docstring for the precedence)."""
    marks: dict[str, list[int]] = {k: [] for k in CATEGORIES}
    scored = [
        (float(c.metrics[best_metric]), c.step) for c in ckpts
        if c.valid and isinstance(c.metrics.get(best_metric), (int, float))
    ]
    best = (min(scored) if best_mode == "min" else max(scored))[1] if scored else None
    present = set()
    for c in ckpts:
        present.add(c.step)
        if not c.valid or c.status in ("failed", "corrupt", "invalid"):
            marks["failed"].append(c.step)
        elif c.step == best:
            marks["best"].append(c.step)
        elif c.status == "verified":
            marks["verified"].append(c.step)
        else:
            marks["kept"].append(c.step)
    marks["pruned"] = sorted(pruned - present)
    return marks


def value_at(step: int, steps: list[int], values: list[float], fallback: Any) -> float | None:
    """Where a checkpoint's mark sits: its own metric (``fallback``) when numeric, else the curve
    at the first logged step at or after ``step`` (None without a curve)."""
    if isinstance(fallback, (int, float)):
        return float(fallback)
    if not steps:
        return None
    import bisect

    i = min(bisect.bisect_left(steps, step), len(steps) - 1)
    return values[i]


def _metric_curve(storage: Storage, metric: str, log_scale: bool) -> tuple[list[int], list[float]]:
    """(steps, values) of ``metric`` from ``metrics.csv``; a resumed run repeats steps: the latest wins."""
    columns, rows = read_metrics(storage)
    if not rows:
        raise CheckpointNotFoundError(
            f"{storage.describe('metrics.csv')} has no rows: nothing to plot. Pass metrics to "
            "mgr.save(step, state, metrics={...}) during training."
        )
    if metric not in columns:
        have = ", ".join(c for c in columns if c not in ("step", "wall_time")) or "none"
        raise CheckpointNotFoundError(
            f"{storage.describe('metrics.csv')} has no column {metric!r} (columns: {have}). "
            "Choose one with --metric."
        )
    by_step: dict[int, float] = {}
    for r in rows:
        v = r.get(metric)
        if isinstance(v, float) and (v > 0 or not log_scale):
            by_step[int(r["step"])] = v
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _ema(values: list[float], smooth: int) -> list[float]:
    """The exponential moving average over about ``smooth`` points."""
    ema, acc, beta = [], values[0], 1.0 - 1.0 / smooth
    for v in values:
        acc = beta * acc + (1 - beta) * v
        ema.append(acc)
    return ema


def _draw_marks(
    ax: Any, marks: dict[str, list[int]], curve: tuple[list[int], list[float]], at: dict[int, Any], best_rule: tuple[str, str]
) -> None:
    """One scatter per category; a mark sits at the checkpoint's own metric (``at``), else on the curve."""
    steps, values = curve
    for cat, (label, marker, face, edge, size) in CATEGORIES.items():
        found = [(s, value_at(s, steps, values, at.get(s))) for s in marks[cat]]
        pts = [(s, y) for s, y in found if y is not None]
        if not pts:
            continue
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=size, facecolors=face,
                   edgecolors=edge, linewidths=1.3, zorder=3,
                   label=f"{label} by {best_rule[0]} ({best_rule[1]})" if cat == "best" else f"{label} ({len(pts)})")


def plot_run(
    run: str | os.PathLike[str] | Storage,
    output: str | os.PathLike[str],
    *,
    metric: str = "loss",
    log_scale: bool = False,
    smooth: int = 0,
    storage_options: dict[str, Any] | None = None,
    title: str | None = None,
) -> PlotSummary:
    """Draw ``metric`` over steps with checkpoint marks; write a PNG (or any matplotlib format)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    storage = open_storage(run, storage_options)
    steps, values = _metric_curve(storage, metric, log_scale)
    ckpts = scan(storage)
    pruned = {int(e["step"]) for e in read_history(storage) if e["event"] == "pruned"}
    best_metric, best_mode = best_rule(storage, metric)
    marks = categorize(ckpts, pruned, best_metric, best_mode)
    manifest_metric: dict[int, Any] = {c.step: c.metrics.get(metric) for c in ckpts}

    fig, ax = plt.subplots(figsize=(10, 5.2), dpi=110)
    ax.plot(steps, values, color="#4c72b0", alpha=0.35 if smooth > 1 else 0.9, lw=1.0, label=metric)
    if smooth > 1 and len(values) > 1:
        values = _ema(values, smooth)
        ax.plot(steps, values, color="#1f3b70", lw=1.8, label=f"{metric} (EMA {smooth})")
        manifest_metric = {}  # marks sit on the smoothed curve
    _draw_marks(ax, marks, (steps, values), manifest_metric, (best_metric, best_mode))
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{storage.describe('')}: {metric}, {len(ckpts)} checkpoint(s)", fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(loc="upper right", fontsize=9, framealpha=0.9)
    fig.tight_layout()
    out = os.fspath(output)
    fig.savefig(out)
    plt.close(fig)
    return PlotSummary(out, metric, len(steps), marks)
