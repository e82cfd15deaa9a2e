"""Programs that hang, for tests/test_watchdog.py (real processes; gloo on CPU for the ranks).

Modes (argv[1]):
  user RUN            one process; saves steps 1..3, then sleeps forever in user code.
  stuck-store RUN     a bare Watchdog over a store whose writes never return: the report goes to
                      stderr after dump_seconds, and the process still exits.
  slow-save RUN SAVE_SECONDS
                      one process under watchdog(2); the commit of each save sleeps 2.5 s; saves
                      steps 1..2 and exits 0 unless the save deadline (SAVE_SECONDS, 0: default) fires.
  collective RUN [save]
                      under torchrun: rank 1 is late (alive, beating) for the all_reduce (or, with
                      ``save``, the save) that rank 0 is already inside.
  stuck-at-end RUN HOW
                      one process, async saves under watchdog(2, save_seconds=3); the commit of
                      step 3 never returns, so the end of the watch hangs waiting for it: leaving
                      the ``with`` block (HOW=with) or ``mgr.close()`` (HOW=close).
  elastic RUN OUT TOTAL
                      under torchrun: a small data-parallel loop saving every 2 steps; on the
                      first attempt (TORCHELASTIC_RESTART_COUNT=0) rank 1 hangs after step 5;
                      each attempt joins under its own store prefix (see init_attempt).
  elastic-nodes RUN OUT TOTAL
                      the same loop under two torchrun agents (``--nnodes=2``, plain
                      ``init_process_group``: run with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1); once
                      per run (OUT/hang-fired) rank 1 is late but alive (it beats) before step 6,
                      so rank 0 sleeps inside step 6's all_reduce until its watchdog fires.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

import ckptguard as cg
from ckptguard.run.watchdog import Watchdog, WatchdogOptions
from ckptguard.storage.local import LocalStorage
from ckptguard.testing import FaultyStorage

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from trainlib import exit_worker


class SlowCommit(FaultyStorage):
    """Every commit (``rename_dir``) takes ``delay`` seconds: a slow store."""

    def __init__(self, root: str, delay: float) -> None:
        super().__init__(LocalStorage(root))
        self.delay = delay

    def rename_dir(self, src: str, dst: str) -> None:
        time.sleep(self.delay)
        super().rename_dir(src, dst)


class StuckCommit(FaultyStorage):
    """The commit (``rename_dir``) of checkpoint ``step`` never returns."""

    def __init__(self, root: str, step: int) -> None:
        super().__init__(LocalStorage(root))
        self.step = step

    def rename_dir(self, src: str, dst: str) -> None:
        if dst == f"step-{self.step:09d}":
            stuck_in_user_code()
        super().rename_dir(src, dst)


class StuckStore(FaultyStorage):
    """A store whose small-object writes never return (a wedged mount, an unreachable bucket)."""

    def replace_file(self, path: str, data: bytes) -> None:
        stuck_in_user_code()


def state() -> cg.TrainState:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    return cg.TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def step_once(s: cg.TrainState, step: int, world: int = 1) -> None:
    assert isinstance(s.model, torch.nn.Module) and s.optimizer is not None
    g = torch.Generator().manual_seed(step)
    x = torch.randn(8, 4, generator=g)
    loss = s.model(x).pow(2).mean()
    s.optimizer.zero_grad()
    loss.backward()
    if world > 1:
        for p in s.model.parameters():
            assert p.grad is not None
            dist.all_reduce(p.grad)  # the training collective
            p.grad /= world
    s.optimizer.step()


def stuck_in_user_code() -> None:
    while True:
        time.sleep(3600)


def user(run: str) -> None:
    s = state()
    mgr = cg.CheckpointManager(run)
    step_once(s, 0)  # warm up (first autograd call) before the watch: a loaded machine is slow
    with mgr.watchdog(2):
        for step in range(1, 100):
            step_once(s, step)
            mgr.save(step, s, force=True)
            if step == 3:
                print("HANGING", flush=True)
                stuck_in_user_code()


def stuck_store(run: str) -> None:
    Watchdog(StuckStore(LocalStorage(run)), WatchdogOptions(1, dump_seconds=1)).start()
    stuck_in_user_code()


def slow_save(run: str, save_seconds: float) -> None:
    s = state()
    mgr = cg.CheckpointManager(SlowCommit(run, 2.5))
    step_once(s, 0)
    with mgr.watchdog(2, save_seconds=save_seconds or None):  # the 2.5 s save outlasts the step deadline
        for step in range(1, 3):
            step_once(s, step)
            mgr.save(step, s, force=step == 1)  # one slow save, then a step that only beats
    mgr.close()
    print("DONE", flush=True)


def stuck_at_end(run: str, how: str) -> None:
    s = state()
    mgr = cg.CheckpointManager(StuckCommit(run, 3), async_save=True)
    step_once(s, 0)
    mgr.save(0, s, force=True)  # the first save imports what a save needs, before the watch
    wd = mgr.watchdog(2, save_seconds=3)
    with wd if how == "with" else contextlib.nullcontext(wd):
        for step in range(1, 4):
            step_once(s, step)
            mgr.save(step, s, force=True)  # returns at once; step 3's commit never ends
        print("LOOP DONE", flush=True)
    mgr.close()
    print("CLOSED", flush=True)  # never: the watchdog ends the process first


def collective(run: str, in_save: bool) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    s = state()
    mgr = cg.CheckpointManager(run)
    mgr.save(1, s, force=True)  # the first save imports what a save needs, before the watch
    wd = mgr.watchdog(2, save_seconds=3, collective_timeout=60)  # fires long before gloo's 60 s timeout
    t = torch.ones(4)
    dist.all_reduce(t)  # both ranks reach it: a step completes
    wd.beat(1)
    if rank == 1:  # late but alive (it beats): rank 0 waits inside the collective
        for _ in range(60):
            time.sleep(0.5)
            wd.beat(1)
    print(f"RANK {rank} ENTERS", flush=True)
    if in_save:
        mgr.save(2, s, force=True)  # the save's agreement is a collective too
    else:
        dist.all_reduce(t)
    wd.beat(2)
    mgr.close()


def init_attempt(attempt: int) -> None:
    """Join the group through the agent's store under a per-attempt prefix: gloo's address keys of
    the previous attempt (dead ports) would otherwise be read by the restarted workers."""
    timeout = datetime.timedelta(seconds=60)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    dist.init_process_group("gloo", store=dist.PrefixStore(f"hang-attempt-{attempt}/", store), rank=rank,
                            world_size=world, timeout=timeout)


def elastic(run: str, out: str, total: int) -> None:
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    init_attempt(attempt)
    rank, world = dist.get_rank(), dist.get_world_size()
    s = state()
    mgr = cg.CheckpointManager(run, every_steps=2)
    mgr.watchdog(30)  # restoring is watched too (more time: it reads every checkpoint byte)
    start = mgr.restore(s) or 0
    print(f"RANK {rank} ATTEMPT {attempt} FROM {start}", flush=True)
    with mgr.watchdog(3, collective_timeout=60):
        for step in range(start + 1, total + 1):
            step_once(s, step, world)
            mgr.save(step, s)
            if attempt == 0 and rank == 1 and step == 5:
                stuck_in_user_code()
    mgr.close()
    assert isinstance(s.model, torch.nn.Module)
    weights = {k: v.tolist() for k, v in s.model.state_dict().items()}
    Path(out, f"rank{rank}.json").write_text(json.dumps({"attempt": attempt, "start": start, "weights": weights}))
    dist.destroy_process_group()


def elastic_nodes(run: str, out: str, total: int) -> None:
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    s = state()
    mgr = cg.CheckpointManager(run, every_steps=2)
    mgr.watchdog(30)
    start = mgr.restore(s) or 0
    print(f"RANK {rank} ATTEMPT {attempt} FROM {start}", flush=True)
    marker = Path(out, "hang-fired")  # once per run: a restarted agent's count may stay 0
    with mgr.watchdog(3, collective_timeout=60) as wd:
        for step in range(start + 1, total + 1):
            if rank == 1 and step == 6 and not marker.exists():
                marker.touch()
                while True:  # late but alive: this rank's own watchdog stays quiet
                    time.sleep(0.5)
                    wd.beat(step - 1)
            step_once(s, step, world)  # rank 0 waits inside the all_reduce
            mgr.save(step, s)
    mgr.close()
    assert isinstance(s.model, torch.nn.Module)
    weights = {k: v.tolist() for k, v in s.model.state_dict().items()}
    Path(out, f"rank{rank}.json").write_text(json.dumps({"attempt": attempt, "start": start, "weights": weights}))
    dist.destroy_process_group()


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "user":
        user(args[0])
    elif mode == "stuck-store":
        stuck_store(args[0])
    elif mode == "slow-save":
        slow_save(args[0], float(args[1]))
    elif mode == "stuck-at-end":
        stuck_at_end(args[0], args[1])
    elif mode == "collective":
        collective(args[0], args[1:] == ["save"])
    elif mode == "elastic-nodes":
        elastic_nodes(args[0], args[1], int(args[2]))
    else:
        elastic(args[0], args[1], int(args[2]))
    if mode.startswith("elastic"):
        exit_worker()  # a finished worker skips the interpreter's finalization (see trainlib)
