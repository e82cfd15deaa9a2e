"""After the commit, on 2 ranks (gloo, CPU, under torchrun) for tests/test_distributed_post_commit.py.

Rank 0 alone runs the post-commit hooks and retention; a failure there must reach every rank as a
PostCommitError saying the checkpoint is committed (sync: from that save; async: from the next
save, which still saves its own step, or from wait()). The manager's close() destroys its two
checkpoint process groups (their sockets are closed), also when the default group is already gone.
Results go to ``out`` as JSON per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ckptguard as cg
from ckptguard.errors import PostCommitError
from trainlib import exit_worker


def state() -> cg.TrainState:
    torch.manual_seed(0)
    return cg.TrainState(model=nn.Linear(4, 2), extra={"rank": dist.get_rank()})


def failing_hook(fail_at: set[int]) -> Any:
    def upload(manifest: dict[str, Any]) -> None:
        if manifest["step"] in fail_at:
            raise RuntimeError("the tracking server is down")

    return upload


def outcome(fn: Any) -> dict[str, Any]:
    try:
        fn()
        return {"raised": None}
    except PostCommitError as e:
        return {"raised": type(e).__name__, "message": str(e), "step": e.step}


def scenario_sync(run: str) -> dict[str, Any]:
    with cg.CheckpointManager(run) as mgr:
        mgr.add_post_commit_hook(failing_hook({1}))
        first = outcome(lambda: mgr.save(1, state(), force=True))
        second = outcome(lambda: mgr.save(2, state(), force=True))
        steps = [c.step for c in mgr.checkpoints()]
    return {"first": first, "second": second, "steps": steps}


def scenario_async(run: str) -> dict[str, Any]:
    with cg.CheckpointManager(run, async_save=True) as mgr:
        mgr.add_post_commit_hook(failing_hook({1, 3}))
        returned = mgr.save(1, state(), force=True)
        at_next_save = outcome(lambda: mgr.save(2, state(), force=True))
        after = outcome(mgr.wait)
        steps = [c.step for c in mgr.checkpoints()]
        mgr.save(3, state(), force=True)
        at_wait = outcome(mgr.wait)
    return {"returned": returned, "at_next_save": at_next_save, "after": after, "steps": steps, "at_wait": at_wait}


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def scenario_groups(run: str) -> dict[str, Any]:
    """Managers created and closed one after another (a sweep, a notebook) leave no sockets open."""
    counts = []
    for i in range(4):
        with cg.CheckpointManager(os.path.join(run, str(i)), async_save=True) as mgr:
            mgr.save(1, state(), force=True)
        counts.append(open_fds())
    mgr = cg.CheckpointManager(os.path.join(run, "last"))
    mgr.save(1, state(), force=True)
    dist.destroy_process_group()  # the training script tears torch.distributed down first
    closed = outcome(mgr.close)
    return {"fds": counts, "closed_after_destroy": closed}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("out")
    args = p.parse_args()
    dist.init_process_group("gloo")
    doc = {
        "sync": scenario_sync(os.path.join(args.run, "sync")),
        "async": scenario_async(os.path.join(args.run, "async")),
        "groups": scenario_groups(os.path.join(args.run, "groups")),
    }
    with open(os.path.join(args.out, f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump(doc, f)


if __name__ == "__main__":
    main()
    exit_worker()  # a finished worker skips the interpreter's finalization (see trainlib)
