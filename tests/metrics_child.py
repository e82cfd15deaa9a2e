"""A user's training script for the metrics.csv crash test: the README loop shape, a save every 4
steps, metrics logged at every step and written at once (``flush_seconds = 0``), killed with
SIGKILL right after logging step ``kill_at`` (past its last checkpoint), then resumed.

Usage: python metrics_child.py RUN TOTAL KILL_AT   (KILL_AT 0: never killed)
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import torch

import ckptguard as cg
import trainlib


def main(run: Any, total: int, kill_at: int, *, flush_now: bool = True) -> None:
    """``run``: a path, or a Storage (the tests' kill-at-an-operation wrapper)."""
    torch.set_num_threads(1)
    s = trainlib.make_setup(hidden=8)
    state, loader = s["state"], s["loader"]
    mgr = cg.CheckpointManager(run, every_steps=4, retention=cg.Retention(keep_last=2))
    if flush_now:
        mgr.metrics_log.flush_seconds = 0.0  # every row reaches the file at once
    step = mgr.restore(state) or 0
    while step < total:
        for x, y in loader:
            loss = trainlib.train_step(s, x, y)
            step += 1
            mgr.save(step, state, metrics={"loss": loss, "lr": s["sched"].get_last_lr()[0]})
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            if step >= total:
                break
        state.extra["epoch"] += 1
    mgr.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
