"""``ckptguard diff A B``: config, environment, metrics, probe and per-tensor changes."""

from __future__ import annotations

import argparse
from typing import Any

from rich.progress import Progress
from rich.table import Table

from ckptguard.cli.common import add_json_flag, check_target, console, print_json
from ckptguard.report.diffing import CheckpointDiff, diff


def register(sub: Any) -> None:
    p = sub.add_parser("diff", help="compare two checkpoints (config, environment, tensors, metrics)")
    p.add_argument("a", help="checkpoint directory or URL (a run means its newest checkpoint)")
    p.add_argument("b", help="checkpoint directory or URL")
    p.add_argument("--all", action="store_true", help="list unchanged tensors too")
    p.add_argument("--metadata", action="store_true",
                   help="compare tensors by checksum only (reads no tensor data; fast, no torch)")
    add_json_flag(p)
    p.set_defaults(func=run)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "-" if v is None else str(v)


def _pairs(title: str, rows: list[tuple[str, Any, Any]], a: str, b: str) -> Table | None:
    if not rows:
        return None
    t = Table(title=title)
    for col in ("key", a, b):
        t.add_column(col, overflow="fold")
    for k, x, y in rows:
        t.add_row(k, _fmt(x), _fmt(y))
    return t


def render(d: CheckpointDiff, show_all: bool = False) -> None:
    c = console()
    a, b = f"A (step {d.step_a})", f"B (step {d.step_b})"
    c.print(f"[bold]A[/] {d.a}\n[bold]B[/] {d.b}", highlight=False)
    for title, rows in (("config", d.config), ("environment", d.environment)):
        t = _pairs(title, rows, a, b)
        c.print(t if t is not None else f"{title}: identical")
    metrics = [(k, x, y) for k, (x, y) in d.metrics.items()]
    t = _pairs("metrics", metrics, a, b)
    if t is not None:
        c.print(t)
    t = _pairs("fields (add_manifest_fields, extra)", d.fields, a, b)
    if t is not None:
        c.print(t)
    if d.probe != (None, None):
        c.print(_pairs("probe output", [(k, (d.probe[0] or {}).get(k), (d.probe[1] or {}).get(k)) for k in ("hash", "mean", "std", "max_abs")], a, b))
    tt = Table(title="model tensors")
    for col in ("tensor", "status", "shape A", "shape B", "max |B-A|", "||B-A||/||A||"):
        tt.add_column(col, overflow="fold")
    shown = 0
    for ch in d.tensors:
        if ch.status == "same" and not show_all:
            continue
        shown += 1
        tt.add_row(ch.name, ch.status, _fmt(ch.shape_a), _fmt(ch.shape_b), _fmt(ch.max_abs), _fmt(ch.rel))
    same = sum(ch.status == "same" for ch in d.tensors)
    if shown:
        c.print(tt)
    c.print(f"{len(d.tensors)} tensor(s): {same} identical, {len(d.tensors) - same} different")


def run(args: argparse.Namespace) -> int:
    check_target(args.a, want="checkpoint")
    check_target(args.b, want="checkpoint")
    values = not args.metadata
    if args.json:
        print_json(diff(args.a, args.b, values=values).to_json())
        return 0
    with Progress(transient=True, console=console()) as prog:
        task = prog.add_task("comparing tensors", total=None)
        d = diff(args.a, args.b, progress=lambda n: prog.update(task, description=f"comparing {n}"), values=values)
    render(d, args.all)
    return 0
