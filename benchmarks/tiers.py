"""Tiered checkpoints: what a hot save blocks, how fast a killed run is back, what a failure costs.

    python benchmarks/tiers.py --quick                  # the small state only (make bench)
    python benchmarks/tiers.py --output BENCHMARKS.md   # the 1.1 GB state too; rewrites its section

For each state (the 1.1 GB Linear stack + Adam of BENCHMARKS.md, and a small training loop's
state), in one run:

1. *Blocked per hot save*: ``save()`` of an async tiered manager (hot tier in /dev/shm) returns
   after copying the state into reused host buffers; its blocked time (the manifest's
   ``blocked_seconds``) against the bare copy of the same tensors into preallocated buffers, and
   against an async save straight to the durable directory. Also the background time of each
   (until committed) and the hot tier's peak size (sampled every 2 ms) in copies of the state.
2. *Recovery*: a trainer process saves and SIGKILLs itself; a new process is started and the time
   from its start to its first training step after the restore is measured, restoring from the hot
   tier (memory kept by the keeper), the local tier (warm page cache: a process crash) and the
   durable tier (local disk with the page cache dropped for the files; and S3 on moto on 127.0.0.1).
3. *Lost work per failure at a 1% saving budget*: each way of saving may block training for at
   most 1% of the time, so its interval is max(blocked / 0.01, background write time); expected
   lost work per failure = interval / 2 + recovery (first order).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import ckptguard as cg  # noqa: E402
from ckptguard.tiers import Tiers  # noqa: E402
from ckptguard.tiers.options import hot_root  # noqa: E402
from harness import FULL, QUICK, StateSpec, build_state, evict, machine, replace_section, start_s3  # noqa: E402

NEVER = 1e9  # a lower tier's cadence that never comes during a measurement
SMALL = StateSpec(layers=4, width=512)  # a small training loop's state (~12.6 MB)


def tiers_for(mode: str, local: str) -> Tiers | None:
    if mode == "hot":
        return Tiers(local=None, durable_every_seconds=NEVER, grace_seconds=600)
    if mode == "local":
        return Tiers(hot=False, local=local, durable_every_seconds=NEVER)
    return None


def dir_bytes(path: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except OSError:
                pass
    return total


class PeakDir(threading.Thread):
    """Samples a directory's size every 2 ms (the hot tier's memory)."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path, self.peak, self.stop = path, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, dir_bytes(self.path))
            time.sleep(0.002)


def timed_saves(mgr: cg.CheckpointManager, state: cg.TrainState, saves: int) -> tuple[list[float], list[float]]:
    """A first save (it allocates the host buffers), then ``saves`` more: the seconds each blocked
    training and the seconds until each was committed (``wait()``)."""
    mgr.save(1, state, force=True)
    mgr.wait()
    blocked, total = [], []
    for i in range(saves):
        t0 = time.perf_counter()
        mgr.save(i + 2, state, force=True)
        blocked.append(mgr.last_blocked_seconds or 0.0)
        mgr.wait()
        total.append(time.perf_counter() - t0)
    return blocked, total


def blocked(spec: StateSpec, saves: int, tmp: Path) -> dict[str, Any]:
    """Part 1 (in this process)."""
    model, opt = build_state(spec)
    state = cg.TrainState(model=model, optimizer=opt)
    tensors = [t for t in list(model.state_dict().values()) + [v for s in opt.state.values() for v in s.values()] if t.dim()]
    buffers = [torch.empty_like(t) for t in tensors]
    bare = []
    for _ in range(saves):
        t0 = time.perf_counter()
        for b, t in zip(buffers, tensors):
            b.copy_(t)
        bare.append(time.perf_counter() - t0)
    del buffers
    out: dict[str, Any] = {"state_bytes": spec.nbytes, "bare_copy": statistics.median(bare)}
    for mode in ("hot", "durable"):
        run = str(tmp / f"blocked-{mode}-{uuid.uuid4().hex[:6]}")
        mgr = cg.CheckpointManager(run, async_save=True, tiers=tiers_for(mode, ""), lock=False, retention=cg.Retention(keep_last=1))
        hot = hot_root("/dev/shm", mgr.storage.url)
        sampler = PeakDir(hot if mode == "hot" else run)
        sampler.start()
        b, total = timed_saves(mgr, state, saves)
        sampler.stop.set()
        sampler.join()
        one = mgr.checkpoints()[-1].size_bytes  # one copy: the state's tensors + its metadata
        mgr.close()
        out[mode] = {"blocked": statistics.median(b), "until_committed": statistics.median(total),
                     "peak_copies": sampler.peak / one}
    return out


def worker(role: str, mode: str, run: str, local: str, spec: StateSpec, opts: dict[str, Any]) -> None:
    """``setup``: save once, SIGKILL yourself. ``recover``: restore, one step, print timings."""
    t_start = time.time()
    model, opt = build_state(spec, seed=1 if role == "recover" else 0)
    state = cg.TrainState(model=model, optimizer=opt)
    mgr = cg.CheckpointManager(run, tiers=tiers_for(mode, local), **opts)
    if role == "setup":
        mgr.save(1, state, force=True)
        mgr.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.time()
    step = mgr.restore(state)
    t1 = time.time()
    for p in model.parameters():  # the first training step after the resume
        p.grad = torch.ones_like(p) * 1e-3
    opt.step()
    t2 = time.time()
    print(json.dumps({"step": step, "restore": t1 - t0, "first_step_at": t2, "start": t_start}), flush=True)
    mgr.close()


def recovery(spec: StateSpec, tmp: Path, s3_url: str | None) -> dict[str, Any]:
    """Part 2: new processes; seconds from the restarted process's start to its first step."""
    out: dict[str, Any] = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    cases = [("hot", "hot"), ("local", "local"), ("durable (local disk, cold)", "durable")]
    if s3_url:
        cases.append(("durable (S3 on loopback)", "s3"))
    for label, mode in cases:
        run = f"{s3_url}/{uuid.uuid4().hex[:8]}" if mode == "s3" else str(tmp / f"rec-{mode}-{uuid.uuid4().hex[:6]}")
        local = str(tmp / f"rec-local-{uuid.uuid4().hex[:6]}")
        tier_mode = "durable" if mode == "s3" else mode
        base = [sys.executable, __file__, "--worker", tier_mode, run, local, str(spec.layers), str(spec.width)]
        subprocess.run([*base, "setup"], env=env, capture_output=True, timeout=900)
        if mode == "durable":
            for dirpath, _, files in os.walk(run):
                for f in files:
                    evict(os.path.join(dirpath, f))
        t_launch = time.time()
        r = subprocess.run([*base, "recover"], env=env, capture_output=True, text=True, timeout=900)
        line = [x for x in r.stdout.splitlines() if x.startswith("{")]
        if r.returncode != 0 or not line:
            out[label] = {"error": (r.stderr or r.stdout)[-600:]}
            continue
        res = json.loads(line[-1])
        out[label] = {"to_first_step": res["first_step_at"] - t_launch, "restore": res["restore"], "step": res["step"]}
    return out


def lost_work(b: dict[str, Any], rec: dict[str, Any], budget: float = 0.01) -> dict[str, Any]:
    """Part 3 (first order): interval = max(blocked / budget, background write); lost = interval/2 + recovery."""
    out = {}
    durable_rec = rec.get("durable (S3 on loopback)", rec.get("durable (local disk, cold)", {})).get("to_first_step")
    rows = [("durable only, async", b["durable"]["blocked"], b["durable"]["until_committed"], durable_rec),
            ("durable only, sync", b["durable"]["until_committed"], 0.0, durable_rec),
            ("tiers: hot every interval", b["hot"]["blocked"], b["hot"]["until_committed"], rec.get("hot", {}).get("to_first_step"))]
    for label, cost, background, recover in rows:
        if recover is None:
            continue
        interval = max(cost / budget, background)
        out[label] = {"interval": interval, "lost_per_failure": interval / 2 + recover}
    return out


def lesson_table(r: dict[str, Any], budget: float = 0.01) -> list[str]:
    """The lesson's failures, what each costs (expected lost work + time back to training) with
    and without tiers, first order, from this run's measurements. Without tiers: an async save to
    the durable directory as often as the 1% budget allows. With tiers: hot saves as often as the
    budget allows; the durable copy (background, no blocked time) every 2x its write time."""
    b, rec = r["blocked"], r["recovery"]
    dur_rec = rec.get("durable (S3 on loopback)", rec.get("durable (local disk, cold)", {}))
    hot_rec = rec.get("hot", {})
    if "to_first_step" not in dur_rec or "to_first_step" not in hot_rec:
        return []
    t_d = max(b["durable"]["blocked"] / budget, b["durable"]["until_committed"])
    t_h = max(b["hot"]["blocked"] / budget, b["hot"]["until_committed"])
    t_c = 2 * b["durable"]["until_committed"]
    r_d, r_h = dur_rec["to_first_step"], hot_rec["to_first_step"]
    rows = [
        ("process crash, OOM kill (weekly)", t_d / 2 + r_d, t_h / 2 + r_h, "restart restores from memory"),
        ("node failure, spot preemption without notice (daily)", t_d / 2 + r_d, t_c / 2 + r_d,
         "memory and local disk lost: the durable copy, made in the background more often"),
        ("NaN spike, rolled back by LossGuard (monthly)", dur_rec["restore"], hot_rec["restore"],
         "in-process rollback: the restore alone (plus the steps since the good checkpoint)"),
    ]
    out = ["| failure (the lesson's frequency) | without tiers | with tiers | why |", "|---|---|---|---|"]
    out += [f"| {what} | {a:.1f} s | {t:.1f} s | {why} |" for what, a, t, why in rows]
    return out


def render(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"_`{res['command']}`; {res['when']}; {m['nproc']} vCPU, {m['ram_gb']} GB, torch {m['torch']}_", ""]
    for name, r in res["states"].items():
        b = r["blocked"]
        gb = b["state_bytes"] / 1e9
        lines += [f"### {name} ({gb:.3g} GB of state)", "",
                  "| save | blocked (median) | x bare copy | until committed | peak size of the tier (checkpoints) |",
                  "|---|---|---|---|---|",
                  f"| bare copy into reused host buffers | {b['bare_copy']:.4f} s | 1.00x | | |"]
        for mode, label in (("hot", "hot tier (async, /dev/shm)"), ("durable", "durable directory (async)")):
            m = b[mode]
            lines.append(f"| {label} | {m['blocked']:.4f} s | {m['blocked'] / b['bare_copy']:.2f}x | {m['until_committed']:.3f} s | {m['peak_copies']:.2f} |")
        lines += ["", "| restart after SIGKILL, restoring from | start to first step | of which restore |", "|---|---|---|"]
        for label, x in r["recovery"].items():
            lines.append(f"| {label} | {x['to_first_step']:.3f} s | {x['restore']:.3f} s |" if "error" not in x else f"| {label} | error | {x['error'][:80]} |")
        lines += ["", "| saving within 1% of training time | interval | expected lost work per failure |", "|---|---|---|"]
        for label, x in r["lost_work"].items():
            lines.append(f"| {label} | {x['interval']:.2f} s | {x['lost_per_failure']:.2f} s |")
        lesson = lesson_table(r)
        if lesson:
            lines += ["", "Expected cost of one failure (lost work + back to the first step), saving within 1% of the time:", "", *lesson]
        hot, dur = r["recovery"].get("hot", {}), r["recovery"].get("durable (S3 on loopback)", r["recovery"].get("durable (local disk, cold)", {}))
        ratio = hot["to_first_step"] / dur["to_first_step"] if "to_first_step" in hot and "to_first_step" in dur else float("nan")
        lines += ["", f"Targets: hot save blocked <= 1.2x the bare copy: {b['hot']['blocked'] / b['bare_copy']:.2f}x "
                  f"({'met' if b['hot']['blocked'] <= 1.2 * b['bare_copy'] else 'missed'}); recovery from hot <= 0.3x "
                  f"durable: {ratio:.2f}x ({'met' if ratio <= 0.3 else 'missed'}); hot tier memory <= 2 copies: "
                  f"{b['hot']['peak_copies']:.3f} ({'met' if b['hot']['peak_copies'] <= 2.005 else 'missed'}; a checkpoint's size counted with its metadata).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the small state only, fewer saves")
    ap.add_argument("--output", default=None, help="markdown file whose tiers section is rewritten")
    ap.add_argument("--no-s3", action="store_true", help="skip the S3 (moto) durable tier")
    ap.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        mode, run, local, layers, width, role = args.worker[0], args.worker[1], args.worker[2], *args.worker[3:]
        worker(role, mode, run, local, StateSpec(int(layers), int(width)), {})
        return 0
    s3_url = None
    if not args.no_s3:
        server, endpoint = start_s3()
        import boto3

        bucket = f"tiers-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        s3_url = f"s3://{bucket}"
    specs = {"small training loop": QUICK if args.quick else SMALL}
    if not args.quick:
        specs["1.1 GB state"] = FULL
    res: dict[str, Any] = {"states": {}, "machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "command": "python benchmarks/tiers.py" + (" --quick" if args.quick else "")}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        for name, spec in specs.items():
            b = blocked(spec, 3 if args.quick or spec is FULL else 7, Path(d))
            rec = recovery(spec, Path(d), s3_url)
            res["states"][name] = {"blocked": b, "recovery": rec, "lost_work": lost_work(b, rec)}
            print(json.dumps({name: res["states"][name]}, indent=1), flush=True)
    text = render(res)
    print(text)
    if args.output:
        replace_section(Path(args.output), "## Tiered checkpoints: hot memory, local disk, durable\n\n" + text, "tiers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
