"""One writer per run on local disk (issue 12 item 4; promise 8).

- A trainer with DataLoader workers is SIGKILLed mid-run; its orphaned workers are still alive,
  yet the run lock is free at once (the workers never had it) and the resume is exact.
- A manager that only restores takes no lock: an evaluation loop restores checkpoint after
  checkpoint in one process while a training process writes the run.
- Every refusal names the real holder: pid, host, session, since, and whether it is alive; an
  exited holder whose lock is still held by processes it left behind is named as exited, with the
  processes still holding the file, after a bounded wait for them.
- A lock file removed or replaced while held stops the next save before its commit.
- A lock file that is a FIFO, a symlink or a directory is refused with a clear error.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import ckptguard as cg
from ckptguard.run.lock import LOCK_NAME, LockPolicy, RunLock
from ckptguard.storage import LocalStorage
from lock_child import build, train
from trainlib import same_weights

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def _child(run: Path, out: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(TESTS / "lock_child.py"), str(run), str(out), *args], env=_env())


def _wait(what: str, cond: object, proc: subprocess.Popen[bytes] | None = None, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the child exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _progress(out: Path) -> list[int]:
    try:
        return [int(x) for x in (out / "progress").read_text().split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _live_workers(out: Path) -> list[int]:
    pids = [int(p.name.split("-", 1)[1]) for p in out.glob("worker-*")]
    return [p for p in pids if _alive(p) and b"lock_child.py" in Path(f"/proc/{p}/cmdline").read_bytes()]


def _has_open(pid: int, path: Path) -> bool:
    want = os.stat(path)
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino):
            return True
    return False


def _record(run: Path) -> dict[str, object]:
    return json.loads((run / LOCK_NAME).read_text())


@pytest.fixture
def reaped() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(60)


def test_sigkilled_trainer_with_dataloader_workers_resumes_at_once(tmp_path: Path, reaped: list) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    trainer = _child(run, out, "--total", "100000", "--workers", "2", "--every-steps", "3", "--step-seconds", "0.02")
    reaped.append(trainer)
    _wait("two commits and live workers", lambda: len(_progress(out)) >= 2 and len(_live_workers(out)) >= 2, trainer)
    assert _record(run)["pid"] == trainer.pid
    workers = _live_workers(out)
    trainer.send_signal(signal.SIGKILL)
    trainer.wait(60)
    # No sleep: the lock is free although the trainer's workers are still alive.
    lock = RunLock(LocalStorage(str(run)), policy=LockPolicy(orphan_wait=0.0))
    lock.acquire()
    orphans = [p for p in workers if _alive(p)]
    assert orphans, "the orphaned workers exited before the lock was taken: nothing was shown"
    assert not any(_has_open(p, run / LOCK_NAME) for p in orphans)  # they never held the file
    lock.release()

    # The user's resume: restore, keep training, save, exactly as an uninterrupted run.
    s, state = build()
    mgr = cg.CheckpointManager(run, every_steps=3)
    step = mgr.restore(state)
    acknowledged = _progress(out)
    assert step is not None and step >= acknowledged[-1] and step % 3 == 0
    total = step + 10
    train(mgr, s, state, step, total)
    mgr.save(total, state, force=True)
    mgr.close()
    ref_s, ref_state = build()
    ref = cg.CheckpointManager(tmp_path / "ref", every_steps=3)
    train(ref, ref_s, ref_state, 0, total)
    ref.close()
    assert same_weights(ref_s["model"].state_dict(), s["model"].state_dict())
    assert [c.step for c in cg.CheckpointManager(run).checkpoints()][-1] == total


def test_restore_only_managers_take_no_lock_beside_a_training_process(tmp_path: Path, reaped: list) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    trainer = _child(run, out, "--total", "100000", "--workers", "0", "--every-steps", "2", "--step-seconds", "0.02")
    reaped.append(trainer)
    _wait("three commits", lambda: len(_progress(out)) >= 3, trainer)
    restored = []
    for _ in range(4):  # an evaluation script: a manager per checkpoint, one after another
        for c in cg.CheckpointManager(run).checkpoints()[:3]:
            with cg.CheckpointManager(run) as mgr:
                _, state = build()
                assert mgr.restore(state, step=c.step) == c.step
                restored.append(c.step)
        assert _record(run)["pid"] == trainer.pid  # the trainer still holds the run
    assert len(restored) == 12
    n = len(_progress(out))
    _wait("a commit after the evaluation", lambda: len(_progress(out)) > n, trainer)
    assert trainer.poll() is None

    # Writing from the evaluation process is refused, naming the live trainer.
    _, state = build()
    reader = cg.CheckpointManager(run)
    reader.restore(state)
    with pytest.raises(cg.RunLockedError) as info:
        reader.save(10**6, state, force=True)
    msg = str(info.value)
    assert f"pid {trainer.pid} on host {socket.gethostname()}" in msg and str(run) in msg
    assert ": alive." in msg and "since 20" in msg and "Stop that run first" in msg
    assert "this very process" not in msg
    reader.close()
    assert 10**6 not in [c.step for c in cg.CheckpointManager(run).checkpoints()]


def test_second_manager_in_this_process_is_refused_and_named(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _, state = build()
    first, second = cg.CheckpointManager(run), cg.CheckpointManager(run)
    first.save(1, state, force=True)
    assert second.restore(state) == 1  # restoring needs no lock
    with pytest.raises(cg.RunLockedError) as info:
        second.save(2, state, force=True)
    assert f"pid {os.getpid()}" in str(info.value) and "this very process" in str(info.value)
    assert f"session {_record(run)['session'][:12]}" in str(info.value)  # type: ignore[index]
    first.close()
    second.save(2, state, force=True)
    second.close()
    assert [c.step for c in cg.CheckpointManager(run).checkpoints()] == [1, 2]


_HOLDER = """
import os, subprocess, sys, time
from ckptguard.run.lock import LOCK_NAME, RunLock
from ckptguard.storage import LocalStorage
run, ready, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
lock = RunLock(LocalStorage(run))
lock.acquire()
want = os.stat(os.path.join(run, LOCK_NAME))

def is_lock(fd):
    try:
        st = os.fstat(int(fd))
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (want.st_dev, want.st_ino)

fd = next(int(f) for f in os.listdir("/proc/self/fd") if is_lock(f))
helper = subprocess.Popen(["sleep", str(hold)], pass_fds=[fd])  # a helper handed the descriptor
open(ready, "w").write(str(helper.pid))
time.sleep(600)
"""


def _holder_with_helper(tmp_path: Path, hold: float, reaped: list) -> tuple[subprocess.Popen[bytes], int]:
    run, ready = tmp_path / "run", tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run), str(ready), str(hold)], env=_env())
    reaped.append(proc)
    _wait("the holder", lambda: ready.exists() and ready.read_text().strip(), proc)
    helper = int(ready.read_text())
    proc.kill()
    proc.wait(60)
    return proc, helper


def test_exited_holder_whose_helper_keeps_the_lock_is_named_as_exited(tmp_path: Path, reaped: list) -> None:
    proc, helper = _holder_with_helper(tmp_path, 600, reaped)
    storage = LocalStorage(str(tmp_path / "run"))
    try:
        t0 = time.monotonic()
        with pytest.raises(cg.RunLockedError) as info:
            RunLock(storage, policy=LockPolicy(orphan_wait=0.5)).acquire()
        assert time.monotonic() - t0 >= 0.5  # it waited for the helper first
        msg = str(info.value)
        assert f"pid {proc.pid} on host {socket.gethostname()}" in msg
        assert "that process has exited" in msg and "alive" not in msg
        assert f"Still holding the lock file: {helper} (sleep)" in msg
    finally:
        os.kill(helper, signal.SIGKILL)
    _wait("the helper to exit", lambda: not _alive(helper))
    with RunLock(storage, policy=LockPolicy(orphan_wait=0.0)) as lock:
        assert lock.held and _record(tmp_path / "run")["pid"] == os.getpid()


def test_acquisition_waits_for_processes_an_exited_holder_left(tmp_path: Path, reaped: list) -> None:
    _, helper = _holder_with_helper(tmp_path, 600, reaped)
    timer = threading.Timer(1.0, os.kill, (helper, signal.SIGKILL))
    timer.start()
    try:
        with RunLock(LocalStorage(str(tmp_path / "run")), policy=LockPolicy(orphan_wait=120)) as lock:
            assert lock.held and not _alive(helper)  # taken once the helper was gone
    finally:
        timer.cancel()
        if _alive(helper):
            os.kill(helper, signal.SIGKILL)


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_lock_file_removed_while_held_stops_the_next_save_before_commit(tmp_path: Path, how: str) -> None:
    run = tmp_path / "run"
    _, state = build()
    a = cg.CheckpointManager(run)
    a.save(1, state, force=True)
    os.remove(run / LOCK_NAME)
    b = None
    if how == "replaced":
        b = cg.CheckpointManager(run)
        b.save(2, state, force=True)  # a new file, a new flock: b holds the run now
        b_session = _record(run)["session"]
    with pytest.raises(cg.RunLockLostError) as info:
        a.save(3, state, force=True)
    msg = str(info.value)
    assert f"{run / LOCK_NAME} was {how} while this writer held it" in msg
    assert "nothing was committed" in msg
    if b is not None:
        assert f"lost the run to session {b_session[:12]}" in msg  # type: ignore[index]
    with pytest.raises(cg.RunLockLostError):  # every later save stops too
        a.save(4, state, force=True)
    a.close()
    if b is not None:
        b.close()
    assert [c.step for c in cg.CheckpointManager(run).checkpoints()] == ([1, 2] if b else [1])


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_odd_lock_file_is_refused_with_a_clear_error(tmp_path: Path, kind: str) -> None:
    run = tmp_path / "run"
    _, state = build()
    with cg.CheckpointManager(run) as mgr:
        mgr.save(1, state, force=True)
    lock = run / LOCK_NAME
    lock.unlink()
    {"fifo": lambda: os.mkfifo(lock), "symlink": lambda: lock.symlink_to("/dev/zero"), "directory": lock.mkdir}[kind]()
    mgr = cg.CheckpointManager(run)
    assert mgr.restore(state) == 1  # reading is unaffected
    with pytest.raises(cg.StorageError) as info:
        mgr.save(2, state, force=True)
    assert f"{lock} is not a regular file" in str(info.value) and "Remove it" in str(info.value)
    mgr.close()
    assert [c.step for c in cg.CheckpointManager(run).checkpoints()] == [1]


def test_lock_policy_rejects_nonsense() -> None:
    for kw in ({"stale_after": 0}, {"stale_after": float("nan")}, {"heartbeat_seconds": 400.0},
               {"heartbeat_seconds": 0}, {"orphan_wait": -1}, {"settle_seconds": True}):
        with pytest.raises(ValueError, match="LockPolicy"):
            LockPolicy(**kw)  # type: ignore[arg-type]
    assert LockPolicy().interval == 100.0 and LockPolicy(stale_after=6, heartbeat_seconds=0.5).interval == 0.5
    with pytest.raises(ValueError, match="not both"):
        RunLock(LocalStorage("/tmp"), stale_after=5, policy=LockPolicy())
