"""``ckptguard prune RUN [--dry-run]``: apply the retention policy and say why for each checkpoint.

The policy is the one the run recorded in ``RUN/ckptguard.json``; flags override its fields.
Invariants always hold: the newest valid checkpoint, the best one, the one the last session resumed
from, pinned ones, and every lineage's newest and best when a directory holds several runs.
A real prune takes the run lock (it refuses while a live run writes) and removes debris too.
With ``full_last`` (recorded, or ``--full-last N``) it also slims every kept checkpoint older than
the newest N full ones to its weights; ``--dry-run`` shows ``keep, would slim`` for each.
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from ckptguard.cli.common import add_json_flag, console, err_console, human_bytes, print_json, require_run
from ckptguard.errors import CheckpointError, CheckpointNotFoundError
from ckptguard.persist.gc import collect
from ckptguard.persist.prune import apply_decisions
from ckptguard.persist.writer import clean_debris
from ckptguard.policies.pins import lineage_protection, pinned_steps
from ckptguard.policies.retention import Decision, Retention, budget_overrun, plan_retention
from ckptguard.run.catalog import find_debris, find_unknown, scan
from ckptguard.run.lock import RunLock
from ckptguard.run.runrecord import read_run_record
from ckptguard.storage import Storage, open_storage

# flag dest -> Retention field
_FLAGS = {
    "keep_last": "keep_last", "keep_best": "keep_best", "metric": "metric", "mode": "mode",
    "keep_every": "keep_every", "phased": "phased", "total_steps": "total_steps",
    "phase_head": "phase_head", "phase_tail": "phase_tail", "phase_thin": "phase_thin",
    "keep_config_changes": "keep_config_changes", "max_bytes": "max_bytes", "full_last": "full_last",
}


def register(sub: Any) -> None:
    p = sub.add_parser("prune", help="apply the retention policy (what is kept and why)")
    p.add_argument("run", help="run directory or URL")
    p.add_argument("--dry-run", action="store_true", help="only show what would be deleted")
    p.add_argument("--keep-last", type=int, default=None, metavar="N", help="ring buffer of the newest N")
    p.add_argument("--keep-best", type=int, default=None, metavar="N", help="the N best by --metric")
    p.add_argument("--metric", default=None, help="metric for --keep-best and the best invariant")
    p.add_argument("--mode", choices=("min", "max"), default=None, help="lower or higher is better")
    p.add_argument("--keep-every", type=int, default=None, metavar="STEPS", help="every multiple of STEPS")
    p.add_argument("--phased", action="store_true", default=None, help="dense first/last, thin middle")
    p.add_argument("--total-steps", type=int, default=None, help="planned run length (for --phased)")
    p.add_argument("--phase-head", type=float, default=None, metavar="FRAC", help="dense head (0.2)")
    p.add_argument("--phase-tail", type=float, default=None, metavar="FRAC", help="dense tail (0.15)")
    p.add_argument("--phase-thin", type=int, default=None, metavar="N", help="every Nth in the middle (10)")
    p.add_argument("--keep-config-changes", action="store_true", default=None,
                   help="keep every checkpoint that preceded a config change")
    p.add_argument("--max-bytes", type=float, default=None, help="byte budget for kept checkpoints")
    p.add_argument("--full-last", type=int, default=None, metavar="N",
                   help="keep optimizer state only in the newest N kept checkpoints; slim older ones to weights")
    add_json_flag(p)
    p.set_defaults(func=run)


def resolve_policy(storage: Storage, args: argparse.Namespace) -> tuple[Retention, str]:
    """The run's recorded policy with flags applied; and where it came from."""
    recorded = read_run_record(storage).get("retention")
    base: dict[str, Any] = dict(recorded) if isinstance(recorded, dict) else {}
    given = {field: getattr(args, dest) for dest, field in _FLAGS.items() if getattr(args, dest) is not None}
    if "max_bytes" in given:
        given["max_bytes"] = int(given["max_bytes"])
    source = "recorded policy" if base else "no recorded policy"
    if given:
        source += " + flags"
    try:
        return Retention.from_json({**base, **given}), source
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"Invalid retention policy for {storage.describe('')}: {e}") from e


def plan(storage: Storage, retention: Retention) -> list[Decision]:
    ckpts = scan(storage)
    protected = {**lineage_protection(ckpts, retention), **pinned_steps(storage, ckpts)}
    sessions = read_run_record(storage).get("sessions") or []
    last = sessions[-1] if sessions and isinstance(sessions[-1], dict) else {}
    if isinstance(last.get("resumed_from"), int):
        step = last["resumed_from"]
        protected[step] = f"{protected[step]}; resumed from" if step in protected else "resumed from"
    return plan_retention(ckpts, retention, protected=protected)


def run(args: argparse.Namespace) -> int:
    require_run(args.run, "prune")
    storage = open_storage(args.run)
    if not storage.isdir(""):
        raise CheckpointNotFoundError(f"{storage.describe('')} does not exist. Check the run directory.")
    retention, source = resolve_policy(storage, args)
    lock = None if args.dry_run else RunLock(storage)
    if lock is not None:
        lock.acquire()  # RunLockedError (exit 2) while a live run writes
    try:
        # Debris first: a checkpoint an interrupted save or prune left whole in .trash-* is put
        # back now and planned with the others, so one prune converges.
        debris = [] if args.dry_run else clean_debris(storage)
        decisions = plan(storage, retention)
        failed: dict[int, str] = {}
        if args.dry_run:
            debris = find_debris(storage)
        else:
            failed = apply_decisions(storage, decisions)[1]
            debris += [d for d in clean_debris(storage) if d not in debris]
            gc_report = collect(storage)  # free shared data (incremental runs) nothing references
            if gc_report.deleted:
                err_console().print(f"freed {len(gc_report.deleted)} unreferenced pack(s) of shared tensor data")
    finally:
        if lock is not None:
            lock.release()
    _report(storage, args, retention, source, decisions, debris, failed)
    return 1 if failed else 0


def _report(
    storage: Storage, args: argparse.Namespace, retention: Retention, source: str,
    decisions: list[Decision], debris: list[str], failed: dict[int, str],
) -> None:
    verb = "would delete" if args.dry_run else "deleted"
    over = budget_overrun(decisions, retention)
    if args.json:
        print_json({
            "run": storage.describe(""), "dry_run": args.dry_run, "policy": retention.to_json(),
            "policy_source": source,
            "decisions": [
                {"step": d.step, "name": d.name, "keep": d.keep, "protected": d.protected,
                 "reasons": list(d.reasons), "size_bytes": d.size_bytes, "slim": d.slim,
                 "slimmed": d.slimmed, "slim_bytes": d.slim_bytes, "error": failed.get(d.step)}
                for d in decisions
            ],
            "debris": debris, "unknown": find_unknown(storage), "budget_overrun_bytes": over,
        })
        return
    t = Table(title=f"prune {storage.describe('')} ({'dry run' if args.dry_run else 'applied'}; {source})")
    t.add_column("step", justify="right")
    t.add_column("decision")
    t.add_column("size", justify="right")
    t.add_column("reasons")
    for d in decisions:
        t.add_row(str(d.step), _decision(d, failed, args.dry_run), human_bytes(d.size_bytes), "; ".join(d.reasons),
                  style=None if d.keep else "red")
    c = console()
    c.print(t)
    kept = [d for d in decisions if d.keep]
    gone = [d for d in decisions if not d.keep]
    slim = [d for d in kept if d.slim and not d.slimmed]
    slimming = (f"{'would slim' if args.dry_run else 'slimmed'} {len(slim)} to their weights "
                f"({human_bytes(sum(d.slim_bytes for d in slim))} of training state), " if slim else "")
    c.print(
        f"keep {len(kept)} ({human_bytes(sum(d.size_bytes for d in kept))}), {slimming}{verb} {len(gone)} "
        f"({human_bytes(sum(d.size_bytes for d in gone))}); debris {'to remove' if args.dry_run else 'removed'}: "
        f"{', '.join(debris) or 'none'}"
    )
    unknown = find_unknown(storage)
    if unknown:
        c.print(
            f"[yellow]left untouched: {len(unknown)} step folder(s) without a manifest[/] that no "
            f"interrupted save left (deleted by hand?): {', '.join(unknown)}",
            highlight=False,
        )
    if over:
        c.print(
            f"[yellow]The byte budget {human_bytes(retention.max_bytes or 0)} cannot be met: "
            f"{human_bytes(over)} over, all of it protected (newest valid, best, resumed-from, pinned). "
            "Unpin checkpoints or raise --max-bytes.[/]"
        )


def _decision(d: Decision, failed: dict[int, str], dry_run: bool) -> str:
    """The decision column: keep, keep slimmed (to its weights), delete, or a failure."""
    if d.step in failed:
        return f"FAILED: {failed[d.step][:60]}"
    if not d.keep:
        return "would delete" if dry_run else "deleted"
    if d.slim and not d.slimmed:
        return f"keep, {'would slim' if dry_run else 'slimmed'} (-{human_bytes(d.slim_bytes)})"
    return "keep (slimmed)" if d.slimmed else "keep"
