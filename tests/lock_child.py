"""A user's training script for the lock tests: DataLoader workers, periodic saves, killed,
stopped and resumed by the parent.

    python lock_child.py RUN OUT --total N [--workers 2] [--every-steps K | --every-seconds S]
        [--stale-after T --heartbeat H] [--step-seconds D] [--writer NAME]

It resumes from RUN when it holds checkpoints, trains to ``--total`` steps and writes the final
weights to ``OUT/final.safetensors``. Progress for the parent: every DataLoader worker touches
``OUT/worker-<pid>`` when it starts; after each committed save the step is appended to
``OUT/progress``. If the run is taken over (RunLockedError, RunLockLostError included), the message
goes to ``OUT/lost.txt`` and the script exits with code 3, the way a user's script reports it.
``--step-seconds`` only slows the loop (the weights do not depend on it).
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

import ckptguard as cg
from ckptguard.run.lock import LockPolicy
from trainlib import Net, NoisyDataset, train_step


def build(workers: int = 0, out: Path | None = None, writer: str = "A") -> tuple[dict[str, Any], cg.TrainState]:
    """The user's objects: model, optimizer, scheduler, a DataLoader over a ResumableSampler."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.9)
    ds = NoisyDataset()
    sampler = cg.ResumableSampler(ds, shuffle=True, seed=0)

    def worker_init(_: int) -> None:
        if out is not None:
            (out / f"worker-{os.getpid()}").touch()

    loader = DataLoader(ds, batch_size=8, sampler=sampler, num_workers=workers, worker_init_fn=worker_init)
    s = {"model": model, "opt": opt, "sched": sched, "scaler": None, "loader": loader}
    state = cg.TrainState(
        model=model, optimizer=opt, scheduler=sched, dataloader=loader,
        extra={"epoch": 0, "seen": 0, "writer": writer},
    )
    return s, state


def train(mgr: cg.CheckpointManager, s: dict[str, Any], state: cg.TrainState, step: int, total: int,
          step_seconds: float = 0.0) -> int:
    """The user's loop: epochs over the loader, save() at every step (it saves when due)."""
    while step < total:
        for xb, yb in s["loader"]:
            loss = train_step(s, xb, yb)
            step += 1
            state.extra["seen"] += len(xb)
            mgr.save(step, state, metrics={"loss": loss})
            if step_seconds:
                time.sleep(step_seconds)
            if step >= total:
                break
        else:
            state.extra["epoch"] += 1
    return step


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("out")
    p.add_argument("--total", type=int, required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--every-steps", type=int, default=None)
    p.add_argument("--every-seconds", type=float, default=None)
    p.add_argument("--stale-after", type=float, default=None)
    p.add_argument("--heartbeat", type=float, default=None)
    p.add_argument("--step-seconds", type=float, default=0.0)
    p.add_argument("--writer", default="A")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    s, state = build(a.workers, out, a.writer)
    lock = LockPolicy(stale_after=a.stale_after, heartbeat_seconds=a.heartbeat) if a.stale_after else True
    mgr = cg.CheckpointManager(a.run, every_steps=a.every_steps, every_seconds=a.every_seconds, lock=lock)
    mgr.add_post_commit_hook(lambda m: _append(out / "progress", f"{m['step']}\n"))
    step = mgr.restore(state) or 0
    state.extra["writer"] = a.writer
    try:
        step = train(mgr, s, state, step, a.total, a.step_seconds)
        mgr.save(step, state, force=True)
        mgr.close()
    except cg.RunLockedError as e:  # RunLockLostError included: another writer owns the run
        (out / "lost.txt").write_text(f"{type(e).__name__}: {e}")
        return 3
    save_file({k: v.contiguous() for k, v in s["model"].state_dict().items()}, str(out / "final.safetensors"))
    return 0


def _append(path: Path, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


if __name__ == "__main__":
    raise SystemExit(main())
