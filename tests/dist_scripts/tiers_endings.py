"""How a distributed tiered restore ends, one ending per phase, for tests/test_tiers_distributed.py.

Four ranks under ``torchrun --standalone``, two "nodes" of two ranks (each node its own memory
directory: ``$NODE_SHM/node{rank // 2}``; its lowest rank keeps it, the other reads it); a small
model, no DDP (the tiers do not need it). Each phase builds a new
CheckpointManager (what a restarted process does) and writes what its restore did to
``OUT/endings-rank{R}.json``: the step, or the error's class and message.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import ckptguard as cg


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def main() -> None:
    run, out = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    node = rank // 2
    memory = Path(os.environ["NODE_SHM"]) / f"node{node}"
    memory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    state = cg.TrainState(model=model)
    results: dict[str, Any] = {}

    def manager() -> cg.CheckpointManager:
        return cg.CheckpointManager(run, tiers=cg.Tiers(memory_dir=str(memory), hot_keep=2, durable_every_seconds=3600))

    def restore(phase: str, step: int | None = None) -> None:
        try:
            results[phase] = {"step": manager().restore(state, step=step), "weight": float(model.weight.sum())}
        except cg.CheckpointError as e:
            results[phase] = {"error": type(e).__name__, "message": str(e)}
        dist.barrier()

    def copies(step: int) -> list[Path]:
        return sorted(memory.glob(f"ckptguard-*/*/step-{step:09d}"))

    restore("fresh")
    mgr = manager()
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.fill_(float(step))
        mgr.save(step, state, force=True)
    results["saved"] = {"node_has": sorted(p.name for p in memory.glob("ckptguard-*/*/step-*"))}
    dist.barrier()
    with torch.no_grad():
        model.weight.zero_()
    restore("from_memory")
    good = state
    state = cg.TrainState(model=torch.nn.Linear(8, 5))  # today's code changed the model (a refactor)
    restore("user_code_mismatch")
    state = good
    with torch.no_grad():
        model.weight.zero_()
    restore("after_mismatch")  # nothing was marked: the same step restores into the right model
    restore("step_not_held", step=1)
    if rank == 0:  # node 0's copy of step 3 damaged: marked there, node 1 sends its sound copy
        flip(copies(3)[0] / "model.safetensors")
    dist.barrier()
    restore("damaged_on_one_node")
    if rank == 0:  # node 0 lost its copy of step 3: node 1 sends it
        for p in copies(3):
            for f in sorted(p.iterdir()):
                f.unlink()
            p.rmdir()
    dist.barrier()
    restore("only_on_the_other_node")
    if rank % 2 == 0:  # every node's copy of step 3 damaged: all fall back to step 2
        for p in copies(3):
            flip(p / "model.safetensors")
    dist.barrier()
    restore("newest_damaged_everywhere")
    if rank % 2 == 0:
        for p in copies(2):
            flip(p / "model.safetensors")
    dist.barrier()
    restore("all_damaged")
    with torch.no_grad():  # the writer goes on: a clean end copies step 4 to the durable tier, frees the memory
        model.weight.fill_(4.0)
    mgr.save(4, state, force=True)
    mgr.close()
    dist.barrier()
    results["after_close"] = {"node_has": sorted(p.name for p in memory.glob("ckptguard-*/*/step-*"))}
    restore("from_durable")
    (out / f"endings-rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
