"""``ckptguard verify CKPT|RUN``: check every byte; exit 0 only when everything is sound.

A tiered run's faster tiers on this host (hot memory, local disk: what ``ckptguard ls`` lists) are
verified too, each in a table of its own (``--json``: under ``tiers``); its durable tier holding
no checkpoint yet is then no problem.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import Any

from rich.table import Table

from ckptguard.cli.common import add_json_flag, check_target, console, err_console, human_bytes, print_json, tier_note
from ckptguard.cli.progress import delayed_progress
from ckptguard.run.catalog import scan
from ckptguard.storage import Storage
from ckptguard.tiers.tiered import tier_listing
from ckptguard.verification.verify import VerifyReport, resolve_target, verify


def register(sub: Any) -> None:
    p = sub.add_parser("verify", help="verify one checkpoint or every checkpoint of a run")
    p.add_argument("target", help="checkpoint directory or run directory (URLs too)")
    add_json_flag(p)
    p.set_defaults(func=run)


def _faster_tiers(storage: Storage, target: str, names: list[str]) -> list[tuple[str, Storage]]:
    """A run's faster tiers on this host (``ckptguard ls`` lists them too); none for one checkpoint."""
    if len(names) == 1 and target.rstrip("/").endswith(names[0]):
        return []
    return [(name, tier) for name, tier in tier_listing(storage)[0][:-1] if scan(tier, check_files=False)]


def run(args: argparse.Namespace) -> int:
    check_target(args.target, want="checkpoint")
    storage, names = resolve_target(args.target)
    faster = _faster_tiers(storage, args.target, names)
    note = tier_note(storage) if not faster and (len(names) != 1 or not args.target.rstrip("/").endswith(names[0])) else None
    if args.json:
        report = verify(args.target)
        doc = report.to_json()
        tiers = {name: verify(tier.url) for name, tier in faster}
        if tiers:
            doc["tiers"] = {name: r.to_json() for name, r in tiers.items()}
            doc["ok"] = _ok(report, tiers.values())  # every tier's
        print_json(doc)
        if note:
            err_console().print(note, highlight=False)
        return 0 if _ok(report, tiers.values()) else 1
    report = _verify_shown(storage, args.target, names, "")
    tiers = {name: _verify_shown(tier, tier.url, [c.name for c in scan(tier, check_files=False)], f" ({name} tier)")
             for name, tier in faster}
    if note:
        console().print(note, highlight=False)
    return 0 if _ok(report, tiers.values()) else 1


def _ok(report: VerifyReport, tiers: Iterable[VerifyReport]) -> bool:
    """Every tier sound; an empty durable tier is no problem while a faster tier holds the run."""
    tiers = list(tiers)
    durable = report.ok or (bool(tiers) and not report.checkpoints and len(report.problems) == 1)
    return durable and all(t.ok for t in tiers)


def _verify_shown(storage: Storage, target: str, names: list[str], what: str) -> VerifyReport:
    sizes = {c.name: c.size_bytes for c in scan(storage, check_files=False)}
    done: list[str] = []

    def step(advance: Callable[..., None], name: str) -> None:
        advance(sizes.get(done[-1], 0) if done else 0, description=f"verifying {name}")
        done.append(name)

    with delayed_progress("verifying", sum(sizes.get(n, 0) for n in names) or None) as advance:
        report = verify(target, progress=lambda n: step(advance, n))
    t = Table(title=f"verify {report.target}{what}")
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
    return report
