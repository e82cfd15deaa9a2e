"""DDP resume at world size >= 3: why it is not bit-exact with torch's defaults, and the setting that is.

Run by tests/test_ddp_world4.py (and by hand: ``python ddp_world4.py WORLD OUT``). It spawns
WORLD gloo ranks on CPU; every rank, in the same process, once with torch's default DDP and once
with ``DDP(find_unused_parameters=True)``:

- trains an uninterrupted run for TOTAL steps (a checkpoint every EVERY steps),
- trains a second run in another directory, stops after step STOP (as if killed), then builds
  everything anew (model, DDP, optimizer, scheduler, loader: what a restarted worker does),
  restores from the newest checkpoint (step EVERY) and trains to TOTAL.

Each rank writes ``OUT/rank{R}.json``: per setting (``default``, ``find_unused``), the digest of
its weights after every step of both runs and right after the restore.

The cause it shows: a freshly constructed DDP reduces its first backward with its initial bucket
layout (one bucket, parameters in definition order) and rebuilds its buckets afterwards, in the
order the gradients became ready. A resumed run's first step after the restore is such a first
iteration, the uninterrupted run's same step is not; gloo's ring allreduce sums an element in an
order that depends on its offset in the bucket, which matters in float with 3 or more ranks
(with 2, a + b == b + a). ``find_unused_parameters=True`` keeps the initial layout for good (the
reducer never rebuilds then), so every step reduces the same way in both runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import ckptguard as cg
from trainlib import Net, NoisyDataset

TOTAL, EVERY, STOP = 8, 4, 6


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def train(run: str, rank: int, world: int, find_unused: bool, stop: int) -> list[str]:
    """One attempt of a run, as a (re)started worker runs it: build, restore, train to ``stop``."""
    torch.manual_seed(0)
    ddp = torch.nn.parallel.DistributedDataParallel(Net(), find_unused_parameters=find_unused)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
    ds = NoisyDataset(96)
    sampler = cg.ResumableSampler(ds, shuffle=True, seed=0, num_replicas=world, rank=rank)
    loader = DataLoader(ds, batch_size=8, sampler=sampler)
    torch.manual_seed(1000 + rank)  # per-rank streams: dropout differs per rank
    random.seed(1000 + rank)
    np.random.seed(1000 + rank)
    state = cg.TrainState(model=ddp, optimizer=opt, scheduler=sched, dataloader=loader)
    digests: list[str] = []
    with cg.CheckpointManager(run, every_steps=EVERY) as mgr:
        step = mgr.restore(state) or 0
        if step:
            digests.append(f"restored {step}:{digest(ddp.module)}")
        while step < stop:
            for xb, yb in loader:
                loss = torch.nn.functional.cross_entropy(ddp(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                digests.append(f"{step}:{digest(ddp.module)}")
                mgr.save(step, state)
                if step >= stop:
                    break
    return digests


def worker(rank: int, world: int, init: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    doc: dict[str, Any] = {}
    for name, find_unused in (("default", False), ("find_unused", True)):
        a, b = os.path.join(out, name, "a"), os.path.join(out, name, "b")
        uninterrupted = train(a, rank, world, find_unused, TOTAL)
        first = train(b, rank, world, find_unused, STOP)  # "killed" after STOP
        resumed = train(b, rank, world, find_unused, TOTAL)  # a new worker: restores step EVERY
        doc[name] = {"uninterrupted": uninterrupted, "first_attempt": first, "resumed": resumed}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(doc, f)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("world", type=int)
    ap.add_argument("out")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    init = "file://" + os.path.join(tempfile.mkdtemp(), "rendezvous")
    mp.spawn(worker, (args.world, init, args.out), nprocs=args.world)


if __name__ == "__main__":
    main()
