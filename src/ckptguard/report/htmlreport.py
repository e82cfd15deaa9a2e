"""``render_html`` / ``write_report``: a :class:`~ckptguard.report.runreport.RunReport` as ONE
self-contained HTML file: inline CSS and SVG, no script, no font, image or link to fetch; it opens
offline and can be mailed or attached to an issue. Every string from the run is escaped.

>>> write_report(collect_report("runs/exp1"), "report.html")
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ckptguard.report.plotting import value_at
from ckptguard.report.runreport import CATEGORY_ORDER, CheckpointRow, RunReport
from ckptguard.report.sessions import SessionRow
from ckptguard.report.svgchart import Mark, Series, VLine, esc, line_chart, mark_symbol
from ckptguard.storage import LocalStorage

__all__ = ["render_html", "write_report"]

MAX_CURVES = 6
MAX_POINTS = 4000  # per curve drawn; longer curves are thinned (min and max per bucket)
_OUTCOME_COLOR = {"clean": "#2ca02c", "preempted": "#1f77b4", "hang": "#ff7f0e", "killed": "#d62728",
                  "killed or running": "#9e9e9e", "NaN rollback": "#7b1fa2"}
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#f4f5f8;color:#1d1d27}
main{max-width:1060px;margin:0 auto;padding:18px 20px 60px}
h1{font-size:22px;margin:8px 0 2px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d8d8e0;padding-bottom:4px}
.sub{color:#5b5b6b;font-size:13px;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:14px 0}
.card{background:#fff;border:1px solid #dcdce4;border-radius:8px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:20px} .card span{color:#5b5b6b;font-size:12px}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}
th,td{border:1px solid #e0e0e8;padding:4px 7px;text-align:left;vertical-align:top}
th{background:#eef0f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
table.checkpoints td:nth-child(-n+3),table.checkpoints td:nth-child(5),table.sessions td:nth-child(-n+2){white-space:nowrap}
.badge{display:inline-block;border-radius:10px;padding:1px 8px;color:#fff;font-size:12px;margin:1px 2px}
.legend{display:flex;flex-wrap:wrap;gap:14px;margin:6px 0 2px;font-size:13px}
.legend svg{vertical-align:middle}
.chart{background:#fff;border:1px solid #dcdce4;border-radius:6px;margin:6px 0;max-width:100%;height:auto}
.ctitle{font-size:13px;font-weight:600;fill:#1d1d27} .tick{font-size:11px;fill:#5b5b6b} .axis{font-size:12px;fill:#3b3b4b}
.vlabel{font-size:10px}
.problem{background:#fff4f4;border-left:4px solid #d62728;padding:6px 10px;margin:4px 0;word-break:break-word}
.sev-error{color:#b71c1c;font-weight:600} .sev-warning{color:#a86400;font-weight:600} .sev-info{color:#1f5f9f}
.muted{color:#7b7b8b}
"""


def _t(ts: float | None) -> str:
    if ts is None:
        return "?"
    try:
        return dt.datetime.fromtimestamp(ts, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, ValueError, OSError):  # a hostile or damaged record: 1e300, nan
        return f"? ({ts!r})"


def _dur(seconds: float | None) -> str:
    if seconds is None or seconds < 0:
        return "?"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """A table; cells are HTML already (escape before)."""
    out = [f'<table class="{cls}"><tr>' + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows]
    return "".join(out) + "</table>"


def _badge(text: str) -> str:
    return f'<span class="badge" style="background:{_OUTCOME_COLOR.get(text, "#555")}">{esc(text)}</span>'


def _legend(checkpoints: Sequence[CheckpointRow]) -> str:
    counts = {k: sum(1 for c in checkpoints if c.category == k) for k in CATEGORY_ORDER}
    counts["slimmed"] = sum(1 for c in checkpoints if c.slimmed)
    items = [f'<span class="legend-item" data-category="{k}"><svg width="26" height="22">{mark_symbol(k, 13, 11)}</svg>'
             f"{esc(k)} ({counts[k]})</span>" for k in CATEGORY_ORDER]
    return f'<div class="legend">{"".join(items)}</div>'


def _tip(c: CheckpointRow) -> str:
    parts = [f"step {c.step}: {c.category}" + (" + slimmed" if c.slimmed else "")]
    parts += [f"{k}={v}" for k, v in list(c.metrics.items())[:6]]
    parts += list(c.problems[:2])
    return "; ".join(parts)


def _resume_lines(sessions: Sequence[SessionRow]) -> list[VLine]:
    lines = []
    for prev, s in zip(sessions, sessions[1:]):
        if s.resumed_from is not None:
            color = _OUTCOME_COLOR.get(prev.outcome, "#888")
            lines.append(VLine(s.resumed_from, f"session {s.index} resumed ({prev.outcome})", color))
    for s in sessions:
        lines += [VLine(r.restored_step, f"NaN rollback {r.step}->{r.restored_step}", _OUTCOME_COLOR["NaN rollback"])
                  for r in s.rollbacks]
    return lines


def thin(points: list[tuple[float, float]], buckets: int = MAX_POINTS // 2) -> list[tuple[float, float]]:
    """At most ~``MAX_POINTS`` points of a long curve: per bucket of consecutive points, its lowest
    and highest (so spikes stay visible), in step order."""
    if len(points) <= MAX_POINTS:
        return points
    size = -(-len(points) // buckets)
    out: list[tuple[float, float]] = []
    for i in range(0, len(points), size):
        part = points[i:i + size]
        lo, hi = min(part, key=lambda p: p[1]), max(part, key=lambda p: p[1])
        out += sorted({lo, hi})
    return out


def _curves(rep: RunReport) -> str:
    names = rep.metric_names
    vlines = _resume_lines(rep.sessions)
    if not names:
        marks = [Mark(c.step, None, c.category, _tip(c), c.slimmed) for c in rep.checkpoints]
        note = '<p class="muted">metrics.csv holds no numeric metric: checkpoints are shown on the step axis.</p>'
        return note + line_chart([], marks, title="checkpoints", vlines=vlines, height=180)
    out = []
    for name in names[:MAX_CURVES]:
        pts = [(float(r["step"]), r[name]) for r in rep.rows if isinstance(r.get(name), float)]
        steps, values = [int(p[0]) for p in pts], [p[1] for p in pts]
        marks = [Mark(c.step, value_at(c.step, steps, values, c.metrics.get(name)), c.category, _tip(c), c.slimmed)
                 for c in rep.checkpoints]
        out.append(line_chart([Series(name, thin(pts))], marks, title=f"{name} ({len(pts)} steps)", ylabel=name, vlines=vlines))
    if len(names) > MAX_CURVES:
        out.append(f'<p class="muted">{len(names) - MAX_CURVES} more metric(s) not drawn: {esc(", ".join(names[MAX_CURVES:]))}</p>')
    return "".join(out)


def _lost(s: SessionRow) -> str:
    if s.lost_steps is not None:
        return str(s.lost_steps)
    if s.lost_max is not None:
        return f"{s.lost_min}&ndash;{s.lost_max}"
    return f"&ge; {s.lost_min}" if s.lost_min else "?"


def _started(s: SessionRow) -> str:
    if s.resumed_from is None:
        return "fresh start" if not s.start_inferred else "?"
    if s.start_inferred:
        return f'&asymp; {s.resumed_from} <span class="muted">(the last restore was a rollback\'s)</span>'
    return str(s.resumed_from)


def _sessions(rep: RunReport) -> str:
    if not rep.sessions:
        return '<p class="muted">No session recorded (RUN/ckptguard.json has none).</p>'
    rows = []
    for s in rep.sessions:
        badges = _badge(s.outcome) + "".join(_badge("NaN rollback") for _ in s.rollbacks)
        notes = [esc(s.note)] if s.note else []
        notes += [esc(f"NaN rollback: {r.kind} {r.value} at step {r.step} ({r.why}); rolled back to step {r.restored_step}, "
                      f"{r.lost_steps} steps trained again") for r in s.rollbacks]
        steps = f"{s.steps[0]}&ndash;{s.steps[-1]} ({len(s.steps)})" if s.steps else "none kept"
        end = s.last_seen if s.last_seen is not None else s.start
        rows.append([str(s.index), esc(_t(s.start)), esc(_dur((end or 0) - (s.start or 0))),
                     _started(s), steps, badges,
                     f'<span class="lost">{_lost(s)}</span>', "<br>".join(notes)])
    head = ["#", "started", "alive (to last write)", "resumed from", "checkpoints", "ended", "steps lost", "what happened"]
    return f'<div class="sessions">{_table(head, rows, "sessions")}</div>'


def _save_cost(rep: RunReport) -> str:
    saved = [c for c in rep.checkpoints if c.category != "pruned" and c.created is not None]
    cost = [(float(c.step), c.save_seconds) for c in saved if c.save_seconds is not None]
    blocked = [(float(c.step), c.blocked_seconds) for c in saved if c.blocked_seconds is not None]
    gaps = [(float(b.step), b.created - a.created) for a, b in zip(saved, saved[1:])
            if a.created is not None and b.created is not None]
    series = [Series("save seconds", cost, "#4c72b0", bars=True)] + ([Series("blocked seconds", blocked, "#d62728")] if blocked else [])
    interval = ", ".join(f"{esc(k)}={esc(v)}" for k, v in rep.save_interval.items()) or "not recorded"
    out = [f'<p>Save interval (run record): {interval}. Bars: seconds per save'
           + ("; red line: seconds training was blocked (async saves)" if blocked else "") + ".</p>"]
    if cost:
        out.append(line_chart(series, title="save cost", ylabel="seconds", height=240, zero=True))
    if gaps:
        out.append(line_chart([Series("seconds since the previous checkpoint", gaps, "#8c564b")],
                              title="interval between checkpoints (includes time between sessions)", ylabel="seconds",
                              height=220, zero=True))
    return "".join(out) or '<p class="muted">No save timings recorded.</p>'


def _drift(rep: RunReport) -> str:
    pts = [c for c in rep.checkpoints if c.probe_drift is not None]
    if not pts:
        return '<p class="muted">No probe drift recorded (pass probe= to CheckpointManager to record it).</p>'
    marks = [Mark(c.step, c.probe_drift, "failed" if c.drift_exceeded else "kept",
                  f"step {c.step}: probe output changed {c.probe_drift:.4g} (relative) since step {c.drift_from}")
             for c in pts if c.probe_drift is not None]
    chart = line_chart([Series("relative change of the probe output", [(float(m.x), m.y or 0.0) for m in marks], "#17becf")],
                       marks, title="probe drift between checkpoints", ylabel="relative change", height=240, zero=True)
    exceeded = [c.step for c in pts if c.drift_exceeded]
    note = f"<p>Drift over the threshold at step(s): {esc(', '.join(map(str, exceeded)))}.</p>" if exceeded else ""
    return chart + note


def _changes(rep: RunReport) -> str:
    if not rep.changes:
        return '<p class="muted">Neither the environment nor the config changed between checkpoints.</p>'
    rows = [[f"{c.prev_step} &rarr; {c.step}", esc(c.kind), esc(c.key),
             esc(c.old), esc(c.new)] for c in rep.changes[:300]]
    more = f'<p class="muted">{len(rep.changes) - 300} more not shown.</p>' if len(rep.changes) > 300 else ""
    return _table(["steps", "what", "key", "before", "after"], rows, "changes") + more


def _doctor(rep: RunReport) -> str:
    if rep.doctor_error:
        return f'<div class="problem">doctor could not examine the newest checkpoint: {esc(rep.doctor_error)}</div>'
    d = rep.doctor
    if d is None:
        return '<p class="muted">doctor was not run (no checkpoint, or --no-doctor).</p>'
    head = f"<p>{esc(d.checkpoint)} (step {d.step}): {len(d.errors)} error(s), {len(d.warnings)} warning(s).</p>"
    if not d.findings:
        return head + "<p>No findings.</p>"
    rows = [[f'<span class="sev-{esc(f.severity)}">{esc(f.severity)}</span>', esc(f.code),
             esc(f.message) + "".join(f"<br>&middot; {esc(x)}" for x in f.details[:8])] for f in d.findings]
    return head + _table(["severity", "code", "finding"], rows, "doctor")


def _checkpoint_table(rep: RunReport) -> str:
    rows = []
    for c in rep.checkpoints:
        metrics = ", ".join(f"{esc(k)}={esc(v if not isinstance(v, float) else f'{v:.5g}')}" for k, v in list(c.metrics.items())[:5])
        cat = f'<svg width="22" height="20">{mark_symbol(c.category, 11, 10, 4.5, ring=c.slimmed)}</svg>{esc(c.category)}'
        rows.append([str(c.step), cat + (" + slimmed" if c.slimmed else ""), esc(c.status), metrics,
                     esc(_t(c.created)) if c.created else "", esc("; ".join(c.problems[:3]))])
    return _table(["step", "mark", "status", "metrics", "created", "problems"], rows, "checkpoints")


def render_html(rep: RunReport) -> str:
    """The report as one HTML document (a string)."""
    interrupted = [s for s in rep.sessions if s.outcome not in ("clean", "killed or running")]
    rollbacks = sum(len(s.rollbacks) for s in rep.sessions)
    lost = sum(s.lost_steps if s.lost_steps is not None else s.lost_min for s in rep.sessions)
    live = [c for c in rep.checkpoints if c.category != "pruned"]
    cards = [(len(live), "checkpoints"), (sum(1 for c in rep.checkpoints if c.category == "pruned"), "pruned"),
             (len(rep.sessions), "sessions"), (len(interrupted), "interruptions"), (rollbacks, "NaN rollbacks"),
             (lost, "steps lost (at least)"), (sum(1 for c in live if c.category in ("failed", "corrupt")), "failed / corrupt")]
    problems = "".join(f'<div class="problem">{esc(p)}</div>' for p in rep.problems) or '<p class="muted">None.</p>'
    sections = [
        ("Metric curves and checkpoints", _legend(rep.checkpoints) + _curves(rep)),
        ("Sessions: how each ended and what it cost", _sessions(rep)),
        ("Save cost and interval", _save_cost(rep)),
        ("Probe drift", _drift(rep)),
        ("Environment and config changes", _changes(rep)),
        ("Doctor: the newest checkpoint", _doctor(rep)),
        ("Checkpoints", _checkpoint_table(rep)),
        ("Problems reading the run", problems),
    ]
    body = "".join(f'<section id="s{i}"><h2>{esc(title)}</h2>{content}</section>' for i, (title, content) in enumerate(sections))
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; style-src \'unsafe-inline\'; img-src data:">'
        f"<title>ckptguard report: {esc(rep.url)}</title><style>{_CSS}</style></head><body><main>"
        f'<h1>ckptguard run report</h1><div class="sub">{esc(rep.url)} &middot; generated {esc(_t(rep.generated))}'
        f" &middot; best by {esc(rep.best[0])} ({esc(rep.best[1])})</div>"
        '<div class="cards">' + "".join(f"<div class=\"card\"><b>{n}</b><span>{esc(label)}</span></div>" for n, label in cards)
        + f"</div>{body}</main></body></html>"
    )


def write_report(rep: RunReport, output: str | os.PathLike[str]) -> Path:
    """Write the report to the local file ``output`` (atomically: temp file, fsync, rename)."""
    out = Path(output).expanduser().absolute()
    folder = LocalStorage(out.parent)
    folder.makedirs("")
    folder.replace_file(out.name, render_html(rep).encode("utf-8"))
    return out
