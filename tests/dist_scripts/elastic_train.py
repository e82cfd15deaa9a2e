"""A user-shaped DDP training program for tests/test_elastic.py, run under a real ``torchrun``.

What a user writes: gloo DDP (``--fsdp``: FSDP2 ``fully_shard``), a small model with dropout,
``cg.ResumableSampler`` + DataLoader, AdamW + LR scheduler, ``mgr.restore(state)`` at start,
``mgr.save`` every few steps (``--async``: ``async_save=True``), inside ``mgr.preemption_guard()``.
The faults come from the test, once per run (the first attempt, marked by ``OUT/fault-fired``):

- ``--tiers``: ``tiers=Tiers(...)`` with the node's own memory (``$NODE_SHM``) and local directory
  (``$NODE_LOCAL``); the durable tier is the run directory.
- ``--kill-rank R --kill-step K``: rank R SIGKILLs itself right after training step K;
- ``--kill-in-save K``: rank R SIGKILLs itself inside the save of step K, in whichever thread
  creates the file ``--kill-file`` of that save (the training thread, or the background save
  thread of an async save), through :class:`KillingDisk`; it writes ``OUT/killed.json`` (rank,
  thread, path, the training step reached) just before.

Every rank logs the sample ids of each step (``samples-rank{R}.txt``, appended, one line per step:
``step attempt world id id ...``) and its restores (``attempts-rank{R}.txt``); at the end it writes
``final-rank{R}.json``: a digest of its final weights (FSDP2: of its own shards), a draw from each
of its RNGs, the restart count and the world size.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import random
import signal
import sys
import threading
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import ckptguard as cg
from ckptguard.storage.local import LocalStorage, LocalWriter
from trainlib import Net, NoisyDataset, exit_worker


class KillingDisk(LocalStorage):
    """The run directory on the local disk, where creating the file ``pattern`` (a glob over
    run-relative paths, armed by the training thread) kills the process by SIGKILL: no clean-up,
    no ``finally``. A LocalStorage (not a wrapper), so sharded (DCP) saves accept it."""

    pattern: str | None = None
    record = ""
    progress = 0  # the training step reached, for the record

    def create(self, path: str) -> LocalWriter:
        if self.pattern is not None and fnmatch.fnmatchcase(path, self.pattern):
            doc = {"rank": dist.get_rank(), "thread": threading.current_thread().name, "path": path,
                   "training_step": self.progress}
            with open(self.record, "w") as f:
                json.dump(doc, f)
            os.kill(os.getpid(), signal.SIGKILL)
        return super().create(path)


class IndexedDataset(NoisyDataset):
    def __getitem__(self, i: int) -> Any:
        x, y = super().__getitem__(i)
        return x, y, i


def digest(model: torch.nn.Module) -> str:
    """Of this rank's weights: the whole model (DDP), its own shards (FSDP2)."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        local = v.to_local() if hasattr(v, "to_local") else v
        h.update(k.encode())
        h.update(local.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def build_model(fsdp: bool, find_unused: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    model: torch.nn.Module = Net()
    if not fsdp:  # find_unused: the bucket layout a bit-exact resume on 3+ ranks needs (README)
        return torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused)
    from torch.distributed.fsdp import fully_shard

    for layer in (model.body[0], model.head):
        fully_shard(layer)
    fully_shard(model)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("out")
    ap.add_argument("--total", type=int, default=16)
    ap.add_argument("--every", type=int, default=4)
    ap.add_argument("--kill-rank", type=int, default=-1)
    ap.add_argument("--kill-step", type=int, default=-1)
    ap.add_argument("--kill-in-save", type=int, default=-1)
    ap.add_argument("--kill-file", default="*", help="the file (a glob) whose creation kills the rank")
    ap.add_argument("--step-sleep", type=float, default=0.0)
    ap.add_argument("--async", dest="async_save", action="store_true", help="CheckpointManager(async_save=True)")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP")
    ap.add_argument("--find-unused", action="store_true", help="DDP(find_unused_parameters=True): 3+ ranks resume bit-exact")
    ap.add_argument("--tiers", action="store_true",
                    help="tiers=Tiers(memory_dir=$NODE_SHM, local=$NODE_LOCAL): each node's own memory and disk")
    args = ap.parse_args()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(args.out, exist_ok=True)

    model = build_model(args.fsdp, args.find_unused)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
    ds = IndexedDataset(96)
    sampler = cg.ResumableSampler(ds, shuffle=True, seed=0, num_replicas=world, rank=rank)
    loader = DataLoader(ds, batch_size=8, sampler=sampler)
    torch.manual_seed(1000 + rank)  # per-rank streams: dropout differs per rank
    random.seed(1000 + rank)
    np.random.seed(1000 + rank)
    state = cg.TrainState(model=model, optimizer=opt, scheduler=sched, dataloader=loader, extra={"seen": 0})

    os.makedirs(args.run, exist_ok=True)
    storage = KillingDisk(args.run)
    storage.record = os.path.join(args.out, "killed.json")
    tiers = None
    if args.tiers:  # several "nodes" on one machine: each its own memory_dir and local directory
        tiers = cg.Tiers(memory_dir=os.environ["NODE_SHM"], local=os.environ.get("NODE_LOCAL") or None,
                         local_every_seconds=5.0, durable_every_seconds=float(os.environ.get("DURABLE_EVERY", "3600")),
                         grace_seconds=float(os.environ.get("GRACE", "60")))
    mgr = cg.CheckpointManager(storage, every_steps=args.every, async_save=args.async_save, tiers=tiers)
    step = mgr.restore(state) or 0
    with open(os.path.join(args.out, f"attempts-rank{rank}.txt"), "a") as f:
        f.write(f"{attempt} {world} {step}\n")
    # the fault fires once per run: on the first attempt, and not again on a worker of another
    # "node" whose agent was restarted by the membership change (its restart count stays 0)
    marker = os.path.join(args.out, "fault-fired")
    first = attempt == 0 and rank == args.kill_rank and not os.path.exists(marker)
    with mgr.preemption_guard():
        while step < args.total:
            for xb, yb, ids in loader:
                noise = 1.0 + 0.01 * random.random() + 0.01 * float(np.random.rand())
                loss = torch.nn.functional.cross_entropy(model(xb * noise), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                storage.progress = step
                state.extra["seen"] += len(xb)
                with open(os.path.join(args.out, f"samples-rank{rank}.txt"), "a") as f:
                    f.write(" ".join(str(v) for v in (step, attempt, world, *ids.tolist())) + "\n")
                time.sleep(args.step_sleep)  # lets a test kill a whole "node" mid-run
                if first and step in (args.kill_step, args.kill_in_save):
                    open(marker, "w").close()
                if first and step == args.kill_step:
                    os.kill(os.getpid(), signal.SIGKILL)
                if first and step == args.kill_in_save:  # this save's staging place only
                    storage.pattern = f"*{step:09d}*/{args.kill_file}"
                mgr.save(step, state, metrics={"loss": loss.item()})
                if step >= args.total:
                    break
    mgr.save(step, state, force=True)  # the last step, whatever the schedule (a no-op if saved)
    mgr.close()
    doc = {
        "step": step, "weights": digest(getattr(model, "module", model)), "attempt": attempt, "world": world,
        "rng": [torch.rand(3).tolist(), random.random(), float(np.random.rand())],
        "sampler": sampler.state_dict(), "seen": state.extra["seen"],
    }
    with open(os.path.join(args.out, f"final-rank{rank}.json"), "w") as f:
        json.dump(doc, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_worker()  # a finished worker skips the interpreter's finalization (see trainlib)
