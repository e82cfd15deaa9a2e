"""Async saves in a 2-rank DDP run (gloo, CPU) for tests/test_distributed_async.py (under torchrun).

``async``: a sync run and an async run of the same training (every 5 steps), a resume from the
async run's newest checkpoint, then a save whose rank-1 part fails in the background; the same
sync/async/resume comparison with FSDP2 (sharded state through DCP).
``slow``: the training group has a short timeout while one rank's part of a save is slowed past
it (DDP, then FSDP2); training collectives must go on while the save is in flight, and the
checkpoint must hold the state of the step it was taken at. Results go to ``out`` as JSON.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import os
import time
from typing import Any

import torch.distributed as dist
from train import build, report, train

import ckptguard as cg
from ckptguard.storage.local import LocalStorage, LocalWriter
from ckptguard.testing import FaultyStorage
from trainlib import exit_worker

TOTAL = 14


class SlowDisk(LocalStorage):
    """A local run directory where creating a path matching ``pattern`` (a file or a directory)
    first sleeps ``delay`` seconds: one rank's slow disk. A LocalStorage, so DCP writes to it."""

    delay = 0.0
    pattern = "*"

    def _slow(self, path: str) -> None:
        if self.delay and fnmatch.fnmatchcase(path, self.pattern):
            time.sleep(self.delay)

    def create(self, path: str) -> LocalWriter:
        self._slow(path)
        return super().create(path)

    def makedirs(self, path: str) -> None:
        self._slow(path)
        super().makedirs(path)


def dump(out: str, name: str, doc: Any) -> None:
    with open(os.path.join(out, f"{name}-rank{dist.get_rank()}.json"), "w") as f:
        json.dump(doc, f)


def failing_save(s: dict[str, Any], mgr: cg.CheckpointManager, storage: FaultyStorage, out: str) -> None:
    """Rank 1's rank file fails in the background: save() returns; the next wait() (step
    TOTAL + 1) or the next save (step TOTAL + 2, surfacing at TOTAL + 3) raises on every rank."""
    outcomes = {}
    for step, surface in ((TOTAL + 1, "wait"), (TOTAL + 2, "save")):
        if dist.get_rank() == 1:
            storage.arm(1)
        outcomes["returned"] = mgr.save(step, s["state"], force=True)
        try:
            mgr.wait() if surface == "wait" else mgr.save(step + 1, s["state"], force=True)
            outcomes[surface] = "saved"
        except cg.CheckpointError as e:
            outcomes[surface] = f"{type(e).__name__}: {e}"
        finally:
            storage.arm(None)
    mgr.save(TOTAL + 4, s["state"], force=True)
    mgr.wait()
    dump(out, "failed", outcomes)


def scenario_async(run: str, out: str) -> None:
    s = build("ddp")
    with cg.CheckpointManager(os.path.join(run, "sync"), every_steps=5) as mgr:
        report(s, out, "sync", train(s, mgr, 0, TOTAL, None))
    s = build("ddp")
    with cg.CheckpointManager(os.path.join(run, "async"), every_steps=5, async_save=True) as mgr:
        assert mgr.async_save
        report(s, out, "async", train(s, mgr, 0, TOTAL, None))
    s = build("ddp", seed=7)  # a fresh run: everything comes from the async checkpoint
    os.makedirs(os.path.join(run, "async"), exist_ok=True)
    storage = FaultyStorage(LocalStorage(os.path.join(run, "async")), ops={"create"})
    mgr = cg.CheckpointManager(storage, every_steps=5, async_save=True)
    step = mgr.restore(s["state"]) or 0
    dump(out, "restored", {"step": step})
    report(s, out, "resumed", train(s, mgr, step, TOTAL, None))
    failing_save(s, mgr, storage, out)
    mgr.close()


def scenario_fsdp(run: str, out: str) -> None:
    """FSDP2: a sync and an async run of the same training; a fresh model resumes from the async
    run's newest checkpoint (step 10) and trains to TOTAL."""
    for tag, async_save in (("fsdp-sync", False), ("fsdp-async", True)):
        s = build("fsdp")
        with cg.CheckpointManager(os.path.join(run, tag), every_steps=5, async_save=async_save) as mgr:
            report(s, out, tag, train(s, mgr, 0, TOTAL, None))
    s = build("fsdp", seed=7)
    with cg.CheckpointManager(os.path.join(run, "fsdp-async"), every_steps=1000) as mgr:
        step = mgr.restore(s["state"]) or 0
        dump(out, "fsdp-restored", {"step": step})
        report(s, out, "fsdp-resumed", train(s, mgr, step, TOTAL, None))


def scenario_slow(run: str, out: str, kind: str, delay: float, steps: int) -> None:
    """Save at step 3 with one rank's part slowed by ``delay`` s (DDP: rank 1's rank file, so rank 0
    waits in the gather; FSDP2: rank 0 creating the staging directory, so every rank waits for it
    before DCP writes), then train ``steps`` steps (training collectives) while it is in flight.
    The checkpoint must hold the weights of step 3, not the ones training wrote since."""
    s = build(kind)
    os.makedirs(run, exist_ok=True)
    storage = SlowDisk(run)
    slow_rank, storage.pattern = (1, "*rank-*.json") if kind == "ddp" else (0, ".tmp-step-*")
    if dist.get_rank() == slow_rank:
        storage.delay = delay
    mgr = cg.CheckpointManager(storage, every_steps=1000, async_save=True)
    step = train(s, mgr, 0, 3, None)
    t0 = time.monotonic()
    mgr.save(step, s["state"], force=True)
    blocked = time.monotonic() - t0
    pending_after_save = mgr.pending
    report(s, out, f"{kind}-at-save", step)
    steps_while_pending = 0
    for _ in range(steps):  # training collectives on the training group (short timeout)
        step = train(s, mgr, step, step + 1, None, sleep=0.2)
        steps_while_pending += int(mgr.pending)
    mgr.wait()
    storage.delay = 0.0
    mgr.save(step, s["state"], force=True)
    mgr.close()
    dump(out, f"{kind}-slow", {"blocked": blocked, "pending_after_save": pending_after_save,
                               "steps_while_pending": steps_while_pending, "final": step})
    s = build(kind, seed=7)
    with cg.CheckpointManager(run, lock=False) as mgr:
        report(s, out, f"{kind}-restored", mgr.restore(s["state"], step=3) or 0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=["async", "slow"])
    ap.add_argument("run")
    ap.add_argument("out")
    ap.add_argument("--timeout", type=float, default=60.0, help="the training group's timeout (seconds)")
    ap.add_argument("--delay", type=float, default=0.0, help="rank 1's slow checkpoint write (seconds)")
    ap.add_argument("--steps", type=int, default=10, help="steps trained after the slow save")
    args = ap.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout))
    if args.scenario == "async":
        scenario_async(args.run, args.out)
        scenario_fsdp(args.run, args.out)
    else:
        for kind in ("ddp", "fsdp"):
            scenario_slow(os.path.join(args.run, kind), args.out, kind, args.delay, args.steps)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_worker()  # a finished worker skips the interpreter's finalization (see trainlib)
