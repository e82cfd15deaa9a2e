"""A real child process saving 24 MiB checkpoints is killed with SIGKILL at random moments.

After every kill the parent (the run lock is free again: flock dies with its holder) restores:
the step must be the last acknowledged one or the one in flight, with exactly the weights that
step saved; then the parent saves the next step, which cleans any debris, and ``verify`` of the
run is ok. The child then resumes from there, and is killed again. Sync and async saves
alternate. 4 kills by default, 40 with CKPTGUARD_TEST_FULL=1.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

import ckptguard as cg
from ckptguard.run.catalog import find_debris
from ckptguard.storage import LocalStorage
from conftest import FULL
from crash_child import Big, base, child, expected, set_step

KILLS = 40 if FULL else 4


def _acknowledged(side: Path) -> list[int]:
    return [int(x) for x in side.read_text().split()] if side.exists() else []


@pytest.mark.slow
def test_sigkill_at_random_moments_during_large_saves(tmp_path: Path) -> None:
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "ckptguard", "crash_child"])
    run, side = tmp_path / "run", tmp_path / "acknowledged.txt"
    rng = random.Random(20261123)
    b = base()
    debris_seen = mid_save_kills = 0
    kills = 0
    for kill in range(KILLS + 8):  # at least KILLS kills, and on until one lands inside a save
        if kills >= KILLS and mid_save_kills:
            break
        kills += 1
        async_save = kill % 2 == 1
        before = len(_acknowledged(side))
        proc = ctx.Process(target=child, args=(str(run), str(side), async_save), daemon=True)
        proc.start()
        deadline = time.monotonic() + 120
        while len(_acknowledged(side)) < before + 1:  # at least one save of this incarnation
            assert proc.is_alive(), f"child died on its own (exit {proc.exitcode})"
            assert time.monotonic() < deadline, "child made no progress"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.5))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(30)
        assert proc.exitcode == -signal.SIGKILL
        acked = _acknowledged(side)
        storage = LocalStorage(run)
        debris = find_debris(storage)
        debris_seen += bool(debris)
        mid_save_kills += any(d.startswith(".tmp-") for d in debris)

        model = Big()
        with cg.CheckpointManager(run, retention=cg.Retention(keep_last=2)) as mgr:  # lock is free
            step = mgr.restore(cg.TrainState(model=model))
            assert step is not None and acked[-1] <= step <= acked[-1] + 1, (step, acked[-3:])
            want = expected(b, step)
            for name, p in model.named_parameters():
                assert torch.equal(p.detach(), want[name]), f"kill {kill}: step {step} is torn ({name})"
            assert all(c.valid for c in mgr.checkpoints())  # debris is never listed
            set_step(model, b, step + 1)
            mgr.save(step + 1, cg.TrainState(model=model), force=True)
        with side.open("a") as f:
            f.write(f"{step + 1}\n")
        assert find_debris(storage) == []
        report = cg.verify(run)
        assert report.ok, [str(p) for p in report.problems]
    # Large saves: most kills land inside a save, leaving a staging directory behind.
    assert mid_save_kills >= 1, (debris_seen, mid_save_kills)
    print(f"\nsigkill: {kills} kills, {mid_save_kills} inside a save (debris left and cleaned)")


def test_a_run_files_temporary_copy_left_by_a_kill_is_debris(tmp_path: Path) -> None:
    """A kill between writing ckptguard.json.tmp-<id> and its rename leaves that file: the next
    save (and prune) remove it; a file of the user's that merely looks alike is not touched."""
    import ckptguard as cg
    from ckptguard.run.catalog import find_debris
    from ckptguard.storage import LocalStorage

    run = tmp_path / "run"
    state = cg.TrainState(model=torch.nn.Linear(2, 2))
    with cg.CheckpointManager(run) as mgr:
        mgr.save(1, state, force=True)
    (run / "ckptguard.json.tmp-f65c2264").write_bytes(b'{"torn')
    (run / "notes.tmp-old").write_text("mine")
    assert find_debris(LocalStorage(run)) == ["ckptguard.json.tmp-f65c2264"]
    with cg.CheckpointManager(run) as mgr:
        assert mgr.restore(state) == 1
        mgr.save(2, state, force=True)
    assert not (run / "ckptguard.json.tmp-f65c2264").exists() and (run / "notes.tmp-old").read_text() == "mine"
