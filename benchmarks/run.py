"""ckptguard vs the alternatives, on one training state, in one run: saves, restores, throughput.

    python benchmarks/run.py            # full: 92.4M params + Adam (1.11 GB), 3 reps, ~10 min
    python benchmarks/run.py --quick    # CI smoke: a tiny state, 1 rep, < 60 s, no file written

Each method runs in its own subprocess (``worker.py``) so that its peak extra RSS is its own.
Saves are timed in two regimes (see PERF-NOTES.md): ``first`` writes into new files while the
previous outputs stay (the page cache grows), ``resave`` deletes the previous output first (its
pages are reused). Restores read cold (the files' pages are dropped with posix_fadvise first).
Results go to stdout as tables and, in full mode, into BENCHMARKS.md between markers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from harness import FULL, QUICK, StateSpec, machine, replace_section  # noqa: E402
from report import render_markdown, render_tables, targets  # noqa: E402

SAVE_METHODS = [
    "ckptguard_sync",
    "ckptguard_async",
    "ckptguard_buffered",
    "torch_save",
    "safetensors",
    "dcp_1thread",
    "dcp_2threads",
    "dcp_async",
    "raw_write",
    "raw_direct",
    "copy_reused",
]
RESTORE_METHODS = ["ckptguard", "torch_load", "safetensors", "dcp", "raw_read"]


IN_PROCESS = False  # --quick: run jobs in this process (no torch import per job; RSS is not meaningful)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    if IN_PROCESS:
        from worker import JOBS

        return JOBS[job["op"]](job)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(HERE / "worker.py"), json.dumps(job)],
        env=env, capture_output=True, text=True, check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"benchmark job {job['op']} {job.get('method', job.get('mode'))} failed:\n{proc.stderr[-3000:]}")


def median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def bench_saves(spec: StateSpec, reps: int, tmp: Path, log: Any) -> dict[str, Any]:
    log("saves: timing (all methods in one process, interleaved)")
    d = tmp / "save-timing"
    d.mkdir()
    timing = run_job({"op": "save_timing", "methods": SAVE_METHODS, "spec": spec.__dict__, "reps": reps, "dir": str(d)})
    shutil.rmtree(d, ignore_errors=True)
    out: dict[str, Any] = {}
    for method in SAVE_METHODS:
        log(f"saves: peak memory of {method}")
        d = tmp / f"save-{method}"
        d.mkdir()
        mem = run_job({"op": "save_memory", "method": method, "spec": spec.__dict__, "dir": str(d)})
        shutil.rmtree(d, ignore_errors=True)
        out[method] = {
            regime: {
                "blocked": median(rows, "blocked"),
                "durable": median(rows, "durable"),
                "extra_rss": mem["extra_rss"],
                "all": [round(r["durable"], 3) for r in rows],
                "all_blocked": [round(r["blocked"], 3) for r in rows],
            }
            for regime, rows in timing[method].items()
        }
    return out


def bench_restores(spec: StateSpec, reps: int, tmp: Path, log: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for method in RESTORE_METHODS:
        log(f"restore: {method}")
        d = tmp / f"restore-{method}"
        d.mkdir()
        prep = run_job({"op": "prepare", "method": method, "spec": spec.__dict__, "dir": str(d)})
        rows = [run_job({"op": "restore", "method": method, "spec": spec.__dict__, **prep}) for _ in range(reps)]
        shutil.rmtree(d, ignore_errors=True)
        if not all(r["ok"] for r in rows):
            raise RuntimeError(f"restore with {method} did not restore the saved values")
        out[method] = {"seconds": median(rows, "seconds"), "extra_rss": max(r["extra_rss"] for r in rows),
                       "all": [round(r["seconds"], 3) for r in rows]}
    return out


def bench_training(spec: StateSpec, seconds: float, interval: float, cycles: int, tmp: Path, log: Any) -> dict[str, Any]:
    batch = 64
    log("training throughput: none / async / sync, interleaved in one process")
    res = run_job({"op": "train", "spec": spec.__dict__, "batch": batch, "interval": interval,
                   "seconds": seconds, "cycles": cycles, "dir": str(tmp)})
    return {
        "spec": spec.__dict__, "batch": batch, "step_seconds": res["step_seconds"], "every": res["every"],
        "seconds": seconds,
        "modes": {m: {"rate": median(r, "rate"), "saves": median(r, "saves"), "blocked": median(r, "blocked"),
                      "cost": median(r, "cost"), "slowed": median(r, "slowed"),
                      "overlapped_steps": median(r, "overlapped_steps"),
                      "all": [round(x["rate"], 3) for x in r],
                      "all_cost": [round(x["cost"], 4) for x in r]} for m, r in res["modes"].items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny state, 1 repetition (CI smoke)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per method (default 3, quick 1)")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir beside the repo)")
    ap.add_argument("--output", default=None, help="markdown file to update (default BENCHMARKS.md in full mode)")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: save,restore,train")
    ap.add_argument("--merge", default=None, help="JSON of an earlier run whose skipped parts are reused")
    args = ap.parse_args(argv)
    spec = QUICK if args.quick else FULL
    global IN_PROCESS
    IN_PROCESS = args.quick
    reps = args.reps or (1 if args.quick else 3)
    skip = set(filter(None, args.skip.split(",")))
    output = args.output or (None if args.quick else str(ROOT / "BENCHMARKS.md"))

    def log(msg: str) -> None:
        print(f"  .. {msg}", file=sys.stderr, flush=True)

    base = Path(args.dir) if args.dir else ROOT / ".bench-tmp"
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=base))
    try:
        results: dict[str, Any] = {
            "machine": machine(),
            "command": "python benchmarks/run.py" + (" --quick" if args.quick else "") + (f" --reps {args.reps}" if args.reps else ""),
            "spec": {**spec.__dict__, "params": spec.params, "nbytes": spec.nbytes},
            "reps": reps,
        }
        if "save" not in skip:
            results["save"] = bench_saves(spec, reps, tmp, log)
        if "restore" not in skip:
            results["restore"] = bench_restores(spec, reps, tmp, log)
        if "train" not in skip:
            train_spec = StateSpec(layers=4, width=256) if args.quick else StateSpec(layers=12, width=1024)
            seconds, interval = (2.0, 0.7) if args.quick else (30.0, 10.0)
            results["train"] = bench_training(train_spec, seconds, interval, 1 if args.quick else 3, tmp, log)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.merge:
        earlier = json.loads(Path(args.merge).read_text())
        for part in ("save", "restore", "train"):
            if part in skip and part in earlier:
                results[part] = earlier[part]
                results.setdefault("merged", []).append(f"{part} from {earlier['machine']['date']}")
    results["targets"] = targets(results)
    render_tables(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if output:
        replace_section(Path(output), render_markdown(results), "bench")
        print(f"updated {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
