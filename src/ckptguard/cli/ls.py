"""``ckptguard ls RUN``: the checkpoints of a run, newest last."""

from __future__ import annotations

import argparse
import os
from typing import Any

from rich.table import Table

from ckptguard.cli.common import add_json_flag, check_target, console, human_bytes, print_json, problem_text, tier_note
from ckptguard.errors import CheckpointNotFoundError
from ckptguard.report.sizes import RunSizes, run_sizes
from ckptguard.run.catalog import CheckpointInfo, find_debris, find_unknown, scan
from ckptguard.storage import Storage, open_storage
from ckptguard.tiers.tiered import tier_listing


def register(sub: Any) -> None:
    p = sub.add_parser("ls", help="list the checkpoints of a run")
    p.add_argument("run", help="run directory or URL")
    add_json_flag(p)
    p.set_defaults(func=run)


def _with_tiers(storage: Storage, ckpts: list[CheckpointInfo]) -> tuple[list[CheckpointInfo], dict[int, list[str]], str | None]:
    """A tiered run: add the checkpoints only its faster tiers on this host hold; step -> the
    tiers holding a valid copy, fastest first (empty for a run without tiers)."""
    tiers, note = tier_listing(storage)
    if len(tiers) == 1 and note is None:
        return ckpts, {}, None
    by_step = {c.step: c for c in ckpts}
    where: dict[int, list[str]] = {}
    for name, tier in tiers:
        for c in ckpts if tier is storage else scan(tier):
            if c.valid:
                where.setdefault(c.step, []).append(name)
            if c.step not in by_step or (c.valid and not by_step[c.step].valid):
                by_step[c.step] = c  # the listing shows the fastest valid copy
    return sorted(by_step.values(), key=lambda c: c.step), where, note


def _open_listing(target: str) -> tuple[Storage, list[CheckpointInfo], str | None]:
    """The run's storage, its checkpoints and, for a checkpoint directory, that one's name."""
    only: str | None = None
    if check_target(target, want="run") == "checkpoint":
        # A checkpoint directory: list its run, showing that one checkpoint.
        text = os.path.abspath(target.rstrip("/"))
        parent, only = os.path.dirname(text), os.path.basename(text)
        storage = open_storage(parent)
    else:
        storage = open_storage(target)
    if not storage.isdir(""):
        raise CheckpointNotFoundError(f"{storage.describe('')} does not exist. Pass a run directory (runs/exp1).")
    ckpts = scan(storage)
    if only is not None:
        ckpts = [c for c in ckpts if c.name == only]
        if not ckpts:
            raise CheckpointNotFoundError(
                f"{target} is a checkpoint directory, not a run, and not a committed checkpoint of its run "
                f"{storage.describe('')} (no valid MANIFEST.json: debris of an interrupted save?). "
                f"Run 'ckptguard ls {storage.describe('')}' or 'ckptguard verify {target}'."
            )
    return storage, ckpts, only


def run(args: argparse.Namespace) -> int:
    storage, ckpts, only = _open_listing(args.run)
    ckpts, tiers, elsewhere = _with_tiers(storage, ckpts) if only is None else (ckpts, {}, None)
    debris = find_debris(storage) if only is None else []
    unknown = find_unknown(storage) if only is None else []
    sizes = run_sizes(storage, ckpts)  # logical vs physical: see ckptguard.report.sizes
    if args.json:
        print_json(
            {
                "run": storage.describe(""),
                "checkpoints": [
                    {
                        "step": c.step, "name": c.name, "path": c.path, "valid": c.valid,
                        "status": c.status, "reason": c.reason, "size_bytes": c.size_bytes,
                        "created": c.created.isoformat() if c.created else None,
                        "metrics": c.metrics, "problems": list(c.problems),
                        "logical_bytes": sizes.checkpoints[c.name].logical,
                        "physical_bytes": sizes.checkpoints[c.name].physical,
                        "slimmed": _slimmed(c),
                        **({"tiers": tiers.get(c.step, [])} if tiers else {}),
                    }
                    for c in ckpts
                ],
                "logical_bytes": sizes.logical,
                "physical_bytes": sizes.physical,
                "debris": debris,
                "unknown": unknown,
            }
        )
        return 0
    console().print(_table(storage, ckpts, sizes, tiers))
    _print_problems(ckpts)
    held = tier_note(storage) if tiers else None
    if held or elsewhere:
        console().print(held or f"a tiered run: {elsewhere}", highlight=False)
    if only is not None:
        console().print(f"{args.run} is one checkpoint of the run {storage.describe('')}: "
                        f"'ckptguard ls {storage.describe('')}' lists them all.", highlight=False)
        return 0
    _print_run_notes(ckpts, sizes, debris, unknown)
    return 0


def _table(storage: Storage, ckpts: list[CheckpointInfo], sizes: RunSizes, tiers: dict[int, list[str]]) -> Table:
    metric_names = sorted({k for c in ckpts for k in c.metrics})[:4]
    t = Table(title=f"{storage.describe('')}: {len(ckpts)} checkpoint(s)")
    for col in ("step", "created (UTC)", "logical", "physical", "status", "reason", *(["tiers"] if tiers else []), *metric_names):
        t.add_column(col, justify="right" if col in ("step", "logical", "physical") or col in metric_names else "left")
    for c in ckpts:
        style = None if c.valid else "red"
        vals = [f"{c.metrics[m]:.4g}" if isinstance(c.metrics.get(m), float) else str(c.metrics.get(m, "")) for m in metric_names]
        t.add_row(
            str(c.step),
            c.created.strftime("%Y-%m-%d %H:%M:%S") if c.created else "?",
            human_bytes(sizes.checkpoints[c.name].logical),
            human_bytes(sizes.checkpoints[c.name].physical),
            (f"{c.status}, slimmed" if _slimmed(c) else c.status) if c.valid else f"{c.status} (see below)",
            c.reason,
            *([",".join(tiers.get(c.step, [])) or "-"] if tiers else []),
            *vals,
            style=style,
        )
    return t


def _slimmed(c: CheckpointInfo) -> bool:
    """Whether retention slimmed ``c`` to its weights (Retention(full_last=N)): it cannot resume exactly."""
    return isinstance((c.manifest or {}).get("slimmed"), dict)


def _print_problems(ckpts: list[CheckpointInfo]) -> None:
    for c in ckpts:
        if not c.valid:
            for text in c.problems or ("",):
                console().print(f"[red]step {c.step} is {c.status}[/]" + (f": {problem_text(c.status, text)}" if text else ""), highlight=False)


def _print_run_notes(ckpts: list[CheckpointInfo], sizes: RunSizes, debris: list[str], unknown: list[str]) -> None:
    if not ckpts:
        console().print("no committed checkpoint in this directory" + (" (only leftovers of interrupted saves)" if debris else "")
                        + ": is it the run directory?", highlight=False)
    console().print(
        f"run total: logical {human_bytes(sizes.logical)}, physical {human_bytes(sizes.physical)} on "
        "storage (physical per checkpoint = bytes it added that no older checkpoint holds)",
        highlight=False,
    )
    if debris:
        console().print(f"[yellow]{len(debris)} leftover(s) of interrupted saves[/] (removed by the next save or 'ckptguard prune'): {', '.join(debris)}")
    if unknown:
        console().print(
            f"[yellow]{len(unknown)} step folder(s) without a manifest[/] that no interrupted save left "
            f"(deleted by hand?): {', '.join(unknown)}. Never restored, never deleted: put the "
            "MANIFEST.json back from a backup, or remove the folder yourself.",
            highlight=False,
        )
