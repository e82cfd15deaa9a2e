"""Disk use of a phased-retention run with and without slimming (``Retention(full_last=N)``).

A real model (an MLP regressor) trained with Adam on synthetic data for ``--steps`` steps, saving
every ``--every`` steps under ``Retention(phased=True, total_steps=...)`` (the Checkpoint Rot
schedule: dense first 20%, every 10th in the middle, dense final 15%), once as is and once with
``full_last=N``. Reported per run: the checkpoints kept, the bytes on disk at the end (apparent
file sizes and allocated blocks of everything under the run directory) and the largest disk use
seen after any save; the ratio of the two runs. Every slimmed checkpoint is verified and its
weights restored at the end.

    python benchmarks/slimming.py                     # ~1 min on 2 CPU cores
    python benchmarks/slimming.py --steps 4000 --width 1024 --full-last 2 --incremental
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ckptguard as cg


def disk_use(run: Path) -> tuple[int, int]:
    """(apparent bytes, allocated bytes) of every file under ``run``."""
    apparent = allocated = 0
    for root, _, files in os.walk(run):
        for f in files:
            st = os.lstat(os.path.join(root, f))
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def model_of(width: int, depth: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(32, width), nn.GELU()]
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def train(run: Path, args: argparse.Namespace, full_last: int | None) -> dict[str, Any]:
    torch.manual_seed(0)
    model = model_of(args.width, args.depth)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    teacher = torch.randn(32, 1)
    retention = cg.Retention(phased=True, total_steps=args.steps, full_last=full_last)
    state = cg.TrainState(model=model, optimizer=opt, config={"width": args.width, "depth": args.depth})
    peak = 0
    t0 = time.perf_counter()
    with cg.CheckpointManager(run, every_steps=args.every, retention=retention, incremental=args.incremental) as mgr:
        for step in range(1, args.steps + 1):
            x = torch.randn(64, 32)
            loss = (model(x) - x @ teacher).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if mgr.save(step, state, metrics={"loss": loss.item()}):
                mgr.wait()
                peak = max(peak, disk_use(run)[1])
        ckpts = mgr.checkpoints()
    apparent, allocated = disk_use(run)
    slimmed = [c.step for c in ckpts if "slimmed" in (c.manifest or {})]
    return {
        "full_last": full_last, "kept": len(ckpts), "slimmed": len(slimmed), "apparent_bytes": apparent,
        "allocated_bytes": allocated, "peak_allocated_bytes": peak, "seconds": round(time.perf_counter() - t0, 1),
        "params": sum(p.numel() for p in model.parameters()), "slimmed_steps": slimmed,
    }


def check(run: Path, args: argparse.Namespace, steps: list[int]) -> None:
    """Every checkpoint verifies; each slimmed one restores its weights by step."""
    report = cg.verify(run)
    assert report.ok, [str(p) for p in report.problems]
    for step in steps:
        model = model_of(args.width, args.depth)
        with cg.CheckpointManager(run, lock=False) as mgr:
            assert mgr.restore(cg.TrainState(model=model), step=step) == step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--full-last", type=int, default=2)
    p.add_argument("--incremental", action="store_true")
    p.add_argument("--dir", default=None, help="where the two runs go (default: a temporary directory)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)  # comparable timings on a shared machine
    logging.getLogger("ckptguard").setLevel(logging.ERROR)  # restoring a slimmed one warns, by design
    root = Path(args.dir or tempfile.mkdtemp(prefix="ckptguard-slimming-"))
    results = []
    try:
        for full_last in (None, args.full_last):
            run = root / ("full" if full_last is None else f"full_last_{full_last}")
            shutil.rmtree(run, ignore_errors=True)
            results.append(train(run, args, full_last))
            check(run, args, results[-1]["slimmed_steps"][:3] + results[-1]["slimmed_steps"][-2:])
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    base, slim = results
    ratio = base["allocated_bytes"] / max(1, slim["allocated_bytes"])
    if args.json:
        print(json.dumps({"args": vars(args), "runs": results, "ratio": ratio}, indent=1))
        return
    mode = "incremental" if args.incremental else "plain"
    print(f"phased retention over {args.steps} steps, a save every {args.every}, {base['params']:,} parameters, Adam, {mode} format")
    print(f"{'run':<18}{'kept':>6}{'slimmed':>9}{'on disk (MB)':>14}{'peak (MB)':>11}{'seconds':>9}")
    for r in results:
        name = "no slimming" if r["full_last"] is None else f"full_last={r['full_last']}"
        print(f"{name:<18}{r['kept']:>6}{r['slimmed']:>9}{r['allocated_bytes'] / 1e6:>14.1f}"
              f"{r['peak_allocated_bytes'] / 1e6:>11.1f}{r['seconds']:>9}")
    print(f"slimming: {ratio:.2f}x less disk at the end")


if __name__ == "__main__":
    main()
