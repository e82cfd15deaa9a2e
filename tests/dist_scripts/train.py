"""A small 2-rank training program for tests/test_distributed.py (run under torchrun, gloo, CPU).

``--model ddp`` wraps the shared test model in DistributedDataParallel; ``--model fsdp`` shards
it with FSDP2 ``fully_shard``. Each rank seeds its RNG differently (dropout differs per rank), so
an exact resume needs every rank's own RNG back. Results go to ``out`` as JSON per rank and, on
rank 0, as safetensors of the full weights.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import ckptguard as cg
from ckptguard.capture.rng import rng_fingerprint
from ckptguard.storage.local import LocalStorage
from ckptguard.testing import FaultyStorage
from trainlib import Net, NoisyDataset, exit_worker, train_step


def build(kind: str, seed: int = 0) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)
    model: Any = Net()
    if kind == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        for layer in (model.body[0], model.head):
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**8) if kind == "ddp" else None
    ds = NoisyDataset(96)
    sampler = cg.ResumableSampler(ds, shuffle=True, seed=0, num_replicas=world, rank=rank)
    loader = DataLoader(ds, batch_size=8, sampler=sampler)
    torch.manual_seed(1000 + rank)  # per-rank RNG streams (dropout, noise)
    random.seed(1000 + rank)
    np.random.seed(1000 + rank)
    state = cg.TrainState(model=model, optimizer=opt, scheduler=sched, scaler=scaler, dataloader=loader,
                          config={"kind": kind}, extra={"seen": 0})
    return {"model": model, "opt": opt, "sched": sched, "scaler": scaler, "loader": loader,
            "sampler": sampler, "state": state}


def full_weights(s: dict[str, Any]) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(s["model"], options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def batches(loader: DataLoader) -> Any:
    while True:
        yield from loader


def train(s: dict[str, Any], mgr: cg.CheckpointManager, step: int, total: int, stop_at: int | None,
          sleep: float = 0.0) -> int:
    """Train until ``total`` (or ``stop_at``); the loader iterator lives on between calls."""
    state = s["state"]
    it = s.setdefault("it", batches(s["loader"]))
    while step < total:
        xb, yb = next(it)
        loss = train_step(s, xb, yb)
        step += 1
        state.extra["seen"] += len(xb)
        if sleep:
            print(f"STEP {dist.get_rank()} {step}", flush=True)
            time.sleep(sleep)
        mgr.save(step, state, metrics={"loss": loss})
        if step == stop_at:
            break
    return step


def report(s: dict[str, Any], out: str, tag: str, step: int) -> None:
    rank = dist.get_rank()
    weights = full_weights(s)
    doc = {"step": step, "rng": rng_fingerprint(), "sampler": s["sampler"].state_dict(),
           "seen": s["state"].extra["seen"]}
    with open(os.path.join(out, f"{tag}-rank{rank}.json"), "w") as f:
        json.dump(doc, f)
    if rank == 0:
        save_file(weights, os.path.join(out, f"{tag}.safetensors"))


def run_storage(path: str) -> FaultyStorage:
    """The run's storage, through the fault-injecting wrapper (disarmed: it only forwards)."""
    os.makedirs(path, exist_ok=True)
    return FaultyStorage(LocalStorage(path), ops={"create"})


def save_with_a_failing_rank(
    s: dict[str, Any], mgr: cg.CheckpointManager, storage: FaultyStorage, out: str, total: int
) -> None:
    """Rank 1's disk "fails" when it creates its rank file: nothing may be committed, every rank
    must raise, and the next save must work."""
    if dist.get_rank() == 1:
        storage.arm(1)  # the first file rank 1 creates in a save is its rank file
    try:
        mgr.save(total + 1, s["state"], force=True)
        outcome = "saved"
    except cg.CheckpointError as e:
        outcome = f"{type(e).__name__}: {e}"
    finally:
        storage.arm(None)
    mgr.save(total + 2, s["state"], force=True)
    with open(os.path.join(out, f"failed-save-rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"outcome": outcome}, f)


def restore_after_damage(run: str, out: str, newest: int) -> None:
    """Flip a byte of rank 1's own file in the newest checkpoint: only rank 1 can see the damage,
    yet both ranks must fall back to the same older checkpoint."""
    if dist.get_rank() == 0:
        path = os.path.join(run, "stopped", f"step-{newest:09d}", "rank-00001.json")
        data = bytearray(open(path, "rb").read())
        data[len(data) // 2] ^= 0x20
        open(path, "wb").write(bytes(data))
    dist.barrier()
    s = build("ddp")
    mgr = cg.CheckpointManager(os.path.join(run, "stopped"))
    step = mgr.restore(s["state"])
    mgr.close()
    with open(os.path.join(out, f"fallback-rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"step": step}, f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=["ddp-first", "ddp-resume", "fsdp", "preempt"])
    ap.add_argument("run")
    ap.add_argument("out")
    ap.add_argument("total", type=int)
    ap.add_argument("stop_at", type=int)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    kind = "fsdp" if args.scenario == "fsdp" else "ddp"
    if args.scenario == "ddp-first":
        # Uninterrupted run, then a run that stops at stop_at (same process, everything re-seeded).
        s = build(kind)
        mgr = cg.CheckpointManager(os.path.join(args.run, "full"), every_steps=5)
        report(s, args.out, "full", train(s, mgr, 0, args.total, None))
        mgr.close()
        s = build(kind)
        mgr = cg.CheckpointManager(os.path.join(args.run, "stopped"), every_steps=5)
        step = train(s, mgr, 0, args.total, args.stop_at)
        mgr.save(step, s["state"], force=True)
        mgr.close()
        report(s, args.out, "stopped", step)
    elif args.scenario == "ddp-resume":
        s = build(kind)
        storage = run_storage(os.path.join(args.run, "stopped"))
        mgr = cg.CheckpointManager(storage, every_steps=5)
        step = mgr.restore(s["state"]) or 0
        report(s, args.out, "restored", step)
        report(s, args.out, "resumed", train(s, mgr, step, args.total, None))
        save_with_a_failing_rank(s, mgr, storage, args.out, args.total)
        mgr.close()
        restore_after_damage(args.run, args.out, args.total + 2)
    elif args.scenario == "fsdp":
        # Save at stop_at, continue 3 steps; then a fresh (differently seeded) sharded model
        # restores the checkpoint on 2 ranks and trains the same 3 steps: same weights.
        s = build(kind)
        mgr = cg.CheckpointManager(args.run, every_steps=args.stop_at)
        step = train(s, mgr, 0, args.total, args.stop_at)
        report(s, args.out, "saved", step)
        report(s, args.out, "continued", train(s, mgr, step, step + 3, None))
        mgr.close()
        s = build(kind, seed=7)
        mgr = cg.CheckpointManager(args.run, every_steps=1000)
        restored = mgr.restore(s["state"], step=args.stop_at) or 0
        report(s, args.out, "restored", restored)
        report(s, args.out, "resumed", train(s, mgr, restored, restored + 3, None))
        mgr.close()
    else:
        s = build(kind)
        mgr = cg.CheckpointManager(args.run, every_steps=1000)
        print(f"PID {dist.get_rank()} {os.getpid()}", flush=True)
        with mgr.preemption_guard():
            train(s, mgr, 0, args.total, None, sleep=0.05)
        mgr.close()
        print(f"FINISHED {dist.get_rank()}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_worker()  # a finished worker skips the interpreter's finalization (see trainlib)
