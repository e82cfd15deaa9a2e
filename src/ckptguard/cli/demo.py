"""``ckptguard demo``: train, get killed, resume, and prove the result is bit-identical.

1. A reference run trains uninterrupted in a child process.
2. The same run in a fresh directory is started as a child and killed with SIGKILL mid-epoch,
   restarted and killed again with SIGKILL inside a save (after the data files, before the
   manifest), and restarted until it finishes.
3. The final weights of both are compared byte for byte, and every checkpoint is verified.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ckptguard.cli.common import console


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="train a small network, kill it twice, resume, prove bit-identical")
    p.add_argument("--steps", type=int, default=600, help="training steps (default 600)")
    p.add_argument("--every", type=int, default=50, help="save every N steps (default 50)")
    p.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the run directories")
    p.set_defaults(func=run)


def _child(run_dir: str, steps: int, every: int, hold: int | None = None) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "ckptguard.cli.demo_train", run_dir, "--steps", str(steps), "--every", str(every)]
    if hold is not None:
        cmd += ["--hold-in-save", str(hold)]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _drive(
    proc: subprocess.Popen[str], progress: Progress, task: Any, kill_at_step: int | None = None, kill_on_hold: bool = False
) -> dict[str, Any]:
    """Follow a child's events; SIGKILL it at a step or when it holds inside a save."""
    out: dict[str, Any] = {"start": None, "last_step": None, "killed": None, "done": None}
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        kind = ev.get("event")
        if kind == "start":
            out["start"] = ev["step"]
        elif kind == "step":
            out["last_step"] = ev["step"]
            progress.update(task, completed=ev["step"])
            if kill_at_step is not None and ev["step"] >= kill_at_step:
                proc.send_signal(signal.SIGKILL)
                out["killed"] = f"SIGKILL at step {ev['step']} (mid-epoch)"
                break
        elif kind == "holding" and kill_on_hold:
            proc.send_signal(signal.SIGKILL)
            out["killed"] = f"SIGKILL inside the save of step {ev['step']}"
            break
        elif kind == "done":
            out["done"] = ev
    proc.wait()
    progress.stop_task(task)
    if out["killed"] is None and proc.returncode != 0:
        err = proc.stderr.read() if proc.stderr else ""
        raise RuntimeError(f"demo child failed with exit code {proc.returncode}:\n{err[-3000:]}")
    out["returncode"] = proc.returncode
    return out


def _print_result(c: Any, rows: list[tuple[str, str, str, str]], ref: dict[str, Any], final: dict[str, Any],
                  torn: int, sound: bool, seconds: float) -> None:
    """The runs' table and the result: kills, leftovers, checkpoints, accuracy, weights compared."""
    table = Table(title="runs")
    for col in ("run", "resumed at step", "how it ended", "last step"):
        table.add_column(col)
    for r in rows:
        table.add_row(*r)
    c.print(table)
    summary = Table(show_header=False, title="result")
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("kills", "2 x SIGKILL (one mid-epoch, one inside a save)")
    summary.add_row("torn save left behind", f"{torn} staging dir(s), ignored by restore, cleaned by the next save")
    summary.add_row("checkpoints kept", ", ".join(str(s) for s in final["checkpoints"]) + f"  (verify: {'all sound' if sound else 'PROBLEMS'})")
    summary.add_row("validation accuracy", f"reference {ref['val_acc']:.4f}, preempted {final['val_acc']:.4f}")
    summary.add_row("final weights (xxh3-128)", f"reference {ref['digest'][:16]}, preempted {final['digest'][:16]}")
    summary.add_row("bit-identical", "[green]YES[/]" if ref["digest"] == final["digest"] else "[red]NO[/]")
    summary.add_row("time", f"{seconds:.1f}s")
    c.print(summary)


def run(args: argparse.Namespace) -> int:
    c = console()
    steps, every = args.steps, args.every
    if every < 1 or steps < 4 * every:
        from ckptguard.cli.common import fail

        return fail(ValueError(f"demo needs --every >= 1 and --steps >= 4 x --every (got --steps {steps} --every {every}): "
                               "it kills the run twice between saves."))
    work = args.dir or tempfile.mkdtemp(prefix="ckptguard-demo-")
    os.makedirs(work, exist_ok=True)
    ref_dir, run_dir = os.path.join(work, "reference"), os.path.join(work, "preempted")
    for d in (ref_dir, run_dir):
        shutil.rmtree(d, ignore_errors=True)
    kill1 = max(2, int(steps * 0.22))
    if kill1 % every == 0:
        kill1 += 1
    hold = ((int(steps * 0.55) // every) or 1) * every
    c.print(f"[bold]ckptguard demo[/]: digits MLP, {steps} steps, dropout + AdamW + warm-up/cosine, shuffled sampler, save every {every}")
    t0 = time.perf_counter()
    rows: list[tuple[str, str, str, str]] = []
    with Progress(TextColumn("{task.description:<28}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=c) as progress:
        t = progress.add_task("reference (uninterrupted)", total=steps)
        ref = _drive(_child(ref_dir, steps, every), progress, t)
        rows.append(("reference", "0", "ran to the end", str(steps)))
        t = progress.add_task("attempt 1", total=steps)
        a1 = _drive(_child(run_dir, steps, every), progress, t, kill_at_step=kill1)
        rows.append(("attempt 1", str(a1["start"]), a1["killed"] or "finished", str(a1["last_step"])))
        t = progress.add_task("attempt 2", total=steps)
        a2 = _drive(_child(run_dir, steps, every, hold=hold), progress, t, kill_on_hold=True)
        rows.append(("attempt 2", str(a2["start"]), a2["killed"] or "finished", str(a2["last_step"])))
        debris = [n for n in os.listdir(run_dir) if n.startswith(".tmp-")]
        t = progress.add_task("attempt 3", total=steps)
        a3 = _drive(_child(run_dir, steps, every), progress, t)
        rows.append(("attempt 3", str(a3["start"]), "ran to the end", str(a3["last_step"])))
    from ckptguard.verification.verify import verify

    report = verify(run_dir)
    same = ref["done"]["digest"] == a3["done"]["digest"]
    _print_result(c, rows, ref["done"], a3["done"], len(debris), report.ok, time.perf_counter() - t0)
    if not args.keep and args.dir is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        c.print(f"run directories kept in {work}")
    ok = same and report.ok and a2["start"] is not None and a2["start"] % every == 0 and a3["start"] == hold - every
    if not ok:
        c.print("[red]demo failed[/]: " + ("weights differ" if not same else "unexpected resume points or verification problems"))
    return 0 if ok else 1
