"""A DDP user with a frozen body (fine-tuning the head) and incremental saves, under torchrun.

    torchrun --nproc-per-node=2 incremental_ddp.py RUN OUT TOTAL STOP [--resume] [--reference DIR]

Without --resume: trains to STOP saving every 3 steps (incremental), saves STOP and exits; with
--resume: restores, trains to TOTAL. OUT/<tag>-rank<r>.json gets a digest of the final weights and
the next RNG draw of this rank. ``--reference DIR`` first trains an uninterrupted run to TOTAL in
DIR, from the same seeds, in the same processes (one torchrun start fewer for the test).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ckptguard as cg
from trainlib import Net, NoisyDataset, exit_worker


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("out")
    ap.add_argument("total", type=int)
    ap.add_argument("stop", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--reference")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    if args.reference:
        train(args.reference, args.out, args.total, args.total, resume=False)
    train(args.run, args.out, args.total, args.stop, resume=args.resume)
    dist.destroy_process_group()


def train(run: str, out: str, total: int, stop: int, *, resume: bool) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    net = Net(hidden=256)  # the body holds most of the bytes
    for p in net.body.parameters():
        p.requires_grad_(False)  # frozen: its bytes never change, an incremental run stores them once
    model = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ds = NoisyDataset(96)
    sampler = cg.ResumableSampler(ds, shuffle=True, seed=0, num_replicas=world, rank=rank)
    loader = DataLoader(ds, batch_size=8, sampler=sampler)
    torch.manual_seed(1000 + rank)
    random.seed(1000 + rank)
    np.random.seed(1000 + rank)
    state = cg.TrainState(model=model, optimizer=opt, dataloader=loader)
    mgr = cg.CheckpointManager(run, every_steps=3, incremental=True)
    step = mgr.restore(state) or 0
    end = total if resume else stop
    it = iter(loader)
    while step < end:
        try:
            xb, yb = next(it)
        except StopIteration:
            it = iter(loader)
            xb, yb = next(it)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        step += 1
        mgr.save(step, state, metrics={"loss": float(loss)})
        if step == 1 and rank == 0:  # metrics before the first checkpoint (every 3 steps) of a fresh run:
            mgr.metrics_log.flush()  # rank 0 holds the run (its lock made the directory) from its first save()
            assert os.path.exists(os.path.join(run, "metrics.csv"))
    mgr.save(step, state, force=True)
    mgr.close()
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.contiguous().numpy().tobytes())
    tag = "resumed" if resume else f"to{end}"
    with open(os.path.join(out, f"{tag}-rank{rank}.json"), "w") as f:
        json.dump({"step": step, "weights": h.hexdigest(), "rng": torch.rand(1).item()}, f)


if __name__ == "__main__":
    main()
    exit_worker()  # a finished worker skips the interpreter's finalization (see trainlib)
