"""An FSDP2 user saving sharded state straight to a run directory or an object store (torchrun, gloo).

    torchrun --nproc-per-node=2 sharded_store.py RUN OUT TOTAL STOP [--resume] [--async] [--incremental]
                                                 [--attempts N] [--expect-failure STEP] [--fail-rank1-at STEP]

The model's body is frozen (fine-tuning the head: with --incremental its shards are stored once).
Without --resume: trains to STOP saving every 3 steps, saves STOP and exits; with --resume:
restores (from the newest checkpoint every rank agrees on), trains to TOTAL. RUN may be a path or
an ``s3://`` URL (the S3 endpoint comes from the environment). ``--expect-failure STEP``: the save
of STEP is expected to fail (a fault injected in front of the store): the outcome is recorded and
training goes on. ``--fail-rank1-at STEP`` (a local RUN): rank 1's disk fails its first write of
that save (an EIO when a file of it is closed), so the save must fail on every rank. OUT/<tag>-rank<r>.json gets a digest of the full weights, the next RNG draw and
the save outcomes; rank 0 writes OUT/<tag>.safetensors (the full weights).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import ckptguard as cg
from ckptguard.storage import LocalStorage
from ckptguard.testing import FaultyStorage
from trainlib import Net, NoisyDataset, exit_worker


def storage_for(run: str, attempts: int) -> Any:
    if "://" not in run:
        os.makedirs(run, exist_ok=True)
        return FaultyStorage(LocalStorage(run), ops={"close"})  # disarmed: it only forwards
    from ckptguard.storage import FsspecStorage
    from ckptguard.storage.retry import RetryPolicy

    return FsspecStorage(run, retry=RetryPolicy(attempts=attempts, base_delay=0.05, max_delay=0.2))


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("out")
    ap.add_argument("total", type=int)
    ap.add_argument("stop", type=int)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--async", dest="async_save", action="store_true")
    ap.add_argument("--incremental", action="store_true")
    ap.add_argument("--attempts", type=int, default=5)
    ap.add_argument("--expect-failure", type=int, default=-1)
    ap.add_argument("--fail-rank1-at", type=int, default=-1)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = Net(hidden=256)  # the body holds most of the bytes
    for p in net.body.parameters():
        p.requires_grad_(False)  # frozen: its shards never change
    fully_shard(net.body[0])
    fully_shard(net.head)
    fully_shard(net)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    ds = NoisyDataset(96)
    sampler = cg.ResumableSampler(ds, shuffle=True, seed=0, num_replicas=world, rank=rank)
    loader = DataLoader(ds, batch_size=8, sampler=sampler)
    torch.manual_seed(1000 + rank)
    random.seed(1000 + rank)
    np.random.seed(1000 + rank)
    state = cg.TrainState(model=net, optimizer=opt, dataloader=loader)
    storage = storage_for(args.run, args.attempts)
    if args.fail_rank1_at > 0:
        args.expect_failure = args.fail_rank1_at
    mgr = cg.CheckpointManager(storage, every_steps=3, async_save=args.async_save,
                               incremental=args.incremental)
    step = mgr.restore(state) or 0
    restored = step
    end = args.total if args.resume else args.stop
    outcomes: dict[str, str] = {}
    it = iter(loader)
    while step < end:
        try:
            xb, yb = next(it)
        except StopIteration:
            it = iter(loader)
            xb, yb = next(it)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(xb), yb)
        loss.backward()
        opt.step()
        step += 1
        if step == args.fail_rank1_at and rank == 1:
            storage.arm(1)
        try:
            mgr.save(step, state, metrics={"loss": loss.item()})
            if step == args.expect_failure:
                mgr.wait()
        except cg.CheckpointError as e:
            outcomes[str(step)] = f"{type(e).__name__}: {e}"
            if step != args.expect_failure:
                raise
        finally:
            if step == args.fail_rank1_at and rank == 1:
                storage.arm(None)
    mgr.save(step, state, force=True)
    mgr.close()
    weights = full_weights(net)
    h = hashlib.sha256()
    for k, v in sorted(weights.items()):
        h.update(k.encode())
        h.update(v.numpy().tobytes())
    tag = "resumed" if args.resume else f"to{end}"
    with open(os.path.join(args.out, f"{tag}-rank{rank}.json"), "w") as f:
        json.dump({"step": step, "restored": restored, "weights": h.hexdigest(), "rng": torch.rand(1).item(),
                   "outcomes": outcomes}, f)
    if rank == 0:
        save_file(weights, os.path.join(args.out, f"{tag}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_worker()  # a finished worker skips the interpreter's finalization (see trainlib)
