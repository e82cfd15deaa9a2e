"""ckptguard's saves and restores against the disk's own limits, in one process, interleaved.

    python benchmarks/io_limits.py            # 0.57 GB state (47M params + Adam), 5 rounds
    python benchmarks/io_limits.py --quick    # tiny state, 3 rounds (make bench)
    python benchmarks/io_limits.py --json out.json

Per round, every method once, in an order that rotates from round to round (A B C .. then
B C .. A), so machine noise and page-cache state hit every method alike; medians over rounds.

- raw O_DIRECT write + fsync: the state's byte count from one page-aligned buffer, 64 MiB
  writes, no copy, no checksum, one file (the disk's write limit);
- raw read: the raw file read cold (its pages dropped first) into an existing buffer;
- torch.save + fsync of the model's and optimizer's state dicts;
- ckptguard first save: a fresh ``CheckpointManager`` on a new run directory, constructed and
  saving at once (lock, environment, run record, every file fsync'd, manifest, renames);
- ckptguard steady-state save: a manager that already saved, saving again (retention
  keep_last=2: the prune of the oldest checkpoint is included);
- ckptguard restore: a fresh manager restoring the newest checkpoint cold, verified, into the
  existing model and optimizer.

The ratios that matter: first and steady-state save over the raw O_DIRECT write (target
<= 1.15x) and restore over the raw read (target <= 1.15x).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "src"))
import ckptguard as cg  # noqa: E402
from harness import StateSpec, build_state, evict, fsync_path, machine, replace_section  # noqa: E402

FULL = StateSpec(layers=25, width=1372)  # 47.1M params + Adam: 0.565 GB
QUICK = StateSpec(layers=10, width=256)
PIECE = 64 << 20


class Bench:
    """The methods, sharing one training state and one scratch directory."""

    def __init__(self, spec: StateSpec, tmp: Path) -> None:
        self.model, self.opt = build_state(spec)
        self.state = cg.TrainState(model=self.model, optimizer=self.opt)
        self.nbytes = spec.nbytes
        self.tmp = tmp
        size = -(-self.nbytes // 4096) * 4096
        self.wbuf = mmap.mmap(-1, size)
        self.wbuf.write(b"\1" * size)
        self.rbuf = bytearray(size)
        self.rounds = 0
        self.steady = cg.CheckpointManager(tmp / "steady", retention=cg.Retention(keep_last=2))
        self.steps = 1
        self.steady.save(self.steps, self.state, force=True)  # steady state: it saved before

    def raw_direct(self) -> None:
        path = self.tmp / "raw.bin"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        try:
            view, pos = memoryview(self.wbuf), 0
            while pos < len(view):
                pos += os.pwrite(fd, view[pos : pos + PIECE], pos)
            os.ftruncate(fd, self.nbytes)
            os.fsync(fd)
        finally:
            os.close(fd)

    def raw_read(self) -> None:
        with open(self.tmp / "raw.bin", "rb", buffering=0) as f:
            view = memoryview(self.rbuf)
            while len(view):
                n = f.readinto(view)
                if not n:
                    break
                view = view[n:]

    def torch_save(self) -> None:
        path = self.tmp / "torch.pt"
        torch.save({"model": self.model.state_dict(), "optim": self.opt.state_dict()}, path)
        fsync_path(str(path))

    def first_save(self) -> None:
        self.rounds += 1
        with cg.CheckpointManager(self.tmp / f"fresh-{self.rounds}") as mgr:
            mgr.save(1, self.state, force=True)

    def steady_save(self) -> None:
        self.steps += 1
        self.steady.save(self.steps, self.state, force=True)

    def restore(self) -> None:
        with cg.CheckpointManager(self.tmp / "steady", lock=False) as mgr:
            if mgr.restore(self.state) != self.steps:
                raise RuntimeError("ckptguard restored another step than the newest")

    def before(self, name: str) -> None:
        """Untimed preparation: cold reads, and no file of an earlier round left to overwrite."""
        if name == "raw_read":
            evict(self.tmp / "raw.bin")
        elif name == "restore":
            evict(self.tmp / "steady")
        elif name == "first_save":
            shutil.rmtree(self.tmp / f"fresh-{self.rounds}", ignore_errors=True)
        elif name == "torch_save":
            (self.tmp / "torch.pt").unlink(missing_ok=True)


ORDER = ["raw_direct", "first_save", "steady_save", "torch_save", "raw_read", "restore"]
LABELS = {
    "raw_direct": "raw O_DIRECT write + fsync (the disk's write limit)",
    "first_save": "ckptguard first save, fresh manager",
    "steady_save": "ckptguard steady-state save",
    "torch_save": "torch.save + fsync",
    "raw_read": "raw read, cold, into an existing buffer",
    "restore": "ckptguard restore, cold, verified, in place",
}
RATIOS = [  # (method, limit, target)
    ("first_save", "raw_direct", 1.15),
    ("steady_save", "raw_direct", 1.15),
    ("torch_save", "raw_direct", None),
    ("restore", "raw_read", 1.15),
]


def run(spec: StateSpec, rounds: int, base: Path, log: Callable[[str], None]) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(dir=base))
    try:
        bench = Bench(spec, tmp)
        times: dict[str, list[float]] = {m: [] for m in ORDER}
        bench.raw_direct()  # a raw file exists before the first raw read (later: this or the last round's)
        for r in range(rounds):
            order = ORDER[r % len(ORDER):] + ORDER[: r % len(ORDER)]
            for name in order:
                bench.before(name)
                t0 = time.perf_counter()
                getattr(bench, name)()
                times[name].append(time.perf_counter() - t0)
            log(f"round {r + 1}/{rounds}: " + ", ".join(f"{m} {times[m][-1]:.3f}" for m in ORDER))
        bench.steady.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    ratios = [
        {"method": m, "limit": lim, "ratio": med[m] / med[lim], "target": tgt,
         "paired": statistics.median(a / b for a, b in zip(times[m], times[lim]))}
        for m, lim, tgt in RATIOS
    ]
    return {"spec": {**spec.__dict__, "params": spec.params, "nbytes": spec.nbytes}, "rounds": rounds,
            "seconds": times, "median": med, "ratios": ratios}


def render(res: dict[str, Any], loadavg: tuple[float, float]) -> str:
    m = res["machine"]
    gb = res["spec"]["nbytes"] / 1e9
    lines = [
        f"Command: `{res['command']}` — {m['date']}, {res['rounds']} rounds, methods interleaved (medians).",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, torch {m['torch']}; load average "
        f"{loadavg[0]:.1f} before, {loadavg[1]:.1f} after.",
        "",
        f"State: {res['spec']['layers']} x Linear({res['spec']['width']}) + Adam: {res['spec']['params'] / 1e6:.1f}M "
        f"parameters, {gb:.3f} GB.",
        "",
        "| method | median s | GB/s | all rounds s |",
        "|---|---|---|---|",
    ]
    for name in ORDER:
        s = res["median"][name]
        every = " ".join(f"{x:.3f}" for x in res["seconds"][name])
        lines.append(f"| {LABELS[name]} | {s:.3f} | {gb / s:.2f} | {every} |")
    lines += ["", "| ratio | of medians | median of per-round ratios | target |  |", "|---|---|---|---|---|"]
    for r in res["ratios"]:
        tgt = f"<= {r['target']:.2f}x" if r["target"] else ""
        verdict = "" if not r["target"] else ("met" if r["ratio"] <= r["target"] else "MISSED")
        lines.append(f"| {LABELS[r['method']]} / {LABELS[r['limit']].split(' (')[0]} | {r['ratio']:.2f}x | "
                     f"{r['paired']:.2f}x | {tgt} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny state, 3 rounds (CI smoke)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds (default 5, quick 3)")
    ap.add_argument("--dir", default=None, help="where to write (default: .bench-tmp beside the repo)")
    ap.add_argument("--output", default=None, help="markdown file whose io-limits section is rewritten")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 5)
    base = Path(args.dir) if args.dir else ROOT / ".bench-tmp"
    base.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"  .. {msg}", file=sys.stderr, flush=True)

    load0 = os.getloadavg()[0]
    res = run(QUICK if args.quick else FULL, rounds, base, log)
    res["machine"] = machine()
    res["command"] = "python benchmarks/io_limits.py" + (" --quick" if args.quick else "") + (f" --rounds {args.rounds}" if args.rounds else "")
    text = render(res, (load0, os.getloadavg()[0]))
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if args.output:
        replace_section(Path(args.output), text, "io-limits")
        print(f"updated {args.output}")
    return 0


if __name__ == "__main__":
    import logging

    logging.disable(logging.WARNING)
    raise SystemExit(main())
