"""``ckptguard doctor CKPT --model module:factory``: rot found before a resume, not after.

Builds the current code's objects with the factory (an ``nn.Module`` or a ``TrainState``; the
module may be an importable name or a ``.py`` path) and reports what would go wrong when they
resume from CKPT. Exit 0: no error finding; 1: at least one error; 2: bad input.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from ckptguard.cli.common import add_json_flag, console, print_json
from ckptguard.doctor import DoctorReport, build_current, doctor

_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def register(sub: Any) -> None:
    p = sub.add_parser("doctor", help="check a checkpoint against the current code before resuming")
    p.add_argument("ckpt", help="checkpoint directory (RUN/step-000001200) or a run (its newest)")
    p.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                   help="factory returning an nn.Module or a ckptguard.TrainState (module name or file.py)")
    add_json_flag(p)
    p.set_defaults(func=run)


def render(report: DoctorReport) -> None:
    c = console()
    c.print(f"[bold]doctor[/] {report.checkpoint} (step {report.step})", highlight=False)
    if not report.findings:
        c.print("[green]no findings: the current code resumes this checkpoint as it was saved[/]")
        return
    t = Table(show_lines=True)
    for col in ("severity", "code", "finding"):
        t.add_column(col, overflow="fold")
    for f in report.findings:
        body = f.message + "".join(f"\n  - {d}" for d in f.details[:12])
        if len(f.details) > 12:
            body += f"\n  ... {len(f.details) - 12} more"
        t.add_row(f"[{_STYLE[f.severity]}]{f.severity}[/]", f.code, body)
    c.print(t)
    n_err, n_warn = len(report.errors), len(report.warnings)
    verdict = "[bold red]do not resume as is[/]" if n_err else "[yellow]resumable, read the warnings[/]" if n_warn else "[green]resumable[/]"
    c.print(f"{n_err} error(s), {n_warn} warning(s), {len(report.findings) - n_err - n_warn} note(s): {verdict}")


def run(args: argparse.Namespace) -> int:
    current = build_current(args.model)
    if args.json:
        report = doctor(args.ckpt, current)
    else:
        with console().status(f"examining {args.ckpt} (every byte is checked)"):
            report = doctor(args.ckpt, current)
    if args.json:
        print_json(report.to_json())
    else:
        render(report)
    return 0 if report.ok else 1
