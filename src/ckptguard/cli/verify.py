"""``ckptguard verify CKPT|RUN``: check every byte; exit 0 only when everything is sound."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from rich.table import Table

from ckptguard.cli.common import add_json_flag, check_target, console, err_console, human_bytes, print_json, tier_note
from ckptguard.cli.progress import delayed_progress
from ckptguard.run.catalog import scan
from ckptguard.verification.verify import resolve_target, verify


def register(sub: Any) -> None:
    p = sub.add_parser("verify", help="verify one checkpoint or every checkpoint of a run")
    p.add_argument("target", help="checkpoint directory or run directory (URLs too)")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_target(args.target, want="checkpoint")
    storage, names = resolve_target(args.target)
    note = tier_note(storage) if len(names) != 1 or not args.target.rstrip("/").endswith(names[0]) else None
    if args.json:
        report = verify(args.target)
        print_json(report.to_json())
        if note:
            err_console().print(note, highlight=False)
        return 0 if report.ok else 1
    sizes = {c.name: c.size_bytes for c in scan(storage, check_files=False)}
    done: list[str] = []

    def step(advance: Callable[..., None], name: str) -> None:
        advance(sizes.get(done[-1], 0) if done else 0, description=f"verifying {name}")
        done.append(name)

    with delayed_progress("verifying", sum(sizes.get(n, 0) for n in names) or None) as advance:
        report = verify(args.target, progress=lambda n: step(advance, n))
    t = Table(title=f"verify {report.target}")
    for col in ("checkpoint", "files", "size", "result"):
        t.add_column(col)
    for c in report.checkpoints:
        result = "[green]ok[/]" if c.ok else "[red]" + "; ".join(p.message.split(". ")[0] for p in c.problems)[:120] + "[/]"
        t.add_row(c.name, str(c.files), human_bytes(c.bytes), result)
    console().print(t)
    for name in report.cleared:
        console().print(f"{name}: every byte checks out; its corrupt mark is cleared", highlight=False)
    for name in report.marked:
        console().print(f"{name}: marked corrupt (restore skips it)", highlight=False)
    if report.ok:
        console().print(f"[green]all {len(report.checkpoints)} checkpoint(s) sound[/]")
    else:
        console().print(f"[red]{len(report.problems)} problem(s):[/]")
        for p in report.problems:
            console().print(f"  {p}", highlight=False)
    if note:
        console().print(note, highlight=False)
    return 0 if report.ok else 1
