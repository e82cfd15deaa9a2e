"""Errors that help: real full disk, permission denied, missing and read-only directories, a run
locked by another live process. Each is a CheckpointError subclass naming the path and the next
step; what was saved before stays intact; the failed save can be caught and training goes on.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptguard as cg
from ckptguard.run.catalog import find_debris
from trainlib import make_setup, same_weights, train_step

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
NOBODY = 65534


def _train(s: dict[str, Any]) -> None:
    xb, yb = next(iter(s["loader"]))
    train_step(s, xb, yb)


def _weights(s: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in s["model"].state_dict().items()}


def _intact(run: Path, step: int, weights: dict[str, torch.Tensor]) -> None:
    """The checkpoint saved before the failure is still whole and restores exactly."""
    assert cg.verify(run / f"step-{step:09d}").ok
    other = make_setup(seed=9, hidden=4)
    with cg.CheckpointManager(run, lock=False) as mgr:
        assert mgr.restore(other["state"]) == step
    assert same_weights(_weights(other), weights)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    if not ROOT:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@contextlib.contextmanager
def as_user(uid: int) -> Iterator[None]:
    """Act as another user for file access (effective uid), then back to root."""
    os.setegid(uid)
    os.seteuid(uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_real_full_disk(tmp_path: Path, async_save: bool) -> None:
    with tmpfs(tmp_path / "small", "2m") as mnt:
        run = mnt / "run"
        s = make_setup(hidden=4)
        _train(s)
        w1 = _weights(s)
        mgr = cg.CheckpointManager(run, async_save=async_save)
        mgr.save(1, s["state"], force=True)
        mgr.wait()
        filler = mnt / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as f:
            while True:
                f.write(b"\0" * 65536)
        _train(s)
        with pytest.raises(cg.CheckpointError) as info:
            mgr.save(2, s["state"], force=True)
            mgr.wait()
        err = info.value.__cause__ if async_save else info.value
        assert isinstance(err, cg.DiskFullError), repr(info.value)
        assert str(run) in str(err) and "Free space" in str(err)
        assert isinstance(err, OSError)  # except OSError keeps working
        _intact(run, 1, w1)
        # Free space: training goes on and the next save succeeds and cleans the debris.
        filler.unlink()
        _train(s)
        mgr.save(3, s["state"], force=True)
        mgr.close()
        assert [c.step for c in cg.CheckpointManager(run, lock=False).checkpoints()] == [1, 3]
        assert find_debris(cg.CheckpointManager(run, lock=False).storage) == []
        assert cg.verify(run).ok


@pytest.mark.skipif(not ROOT, reason="needs root to switch to user 'nobody'")
def test_permission_denied(tmp_path: Path) -> None:
    tmp_path = Path(tempfile.mkdtemp(prefix="ckptguard-perm-"))  # pytest's tmp is 0700 (root only)
    tmp_path.chmod(0o755)
    try:
        _permission_denied(tmp_path)
    finally:
        shutil.rmtree(tmp_path)


def _permission_denied(tmp_path: Path) -> None:
    run = tmp_path / "run"
    s = make_setup(hidden=4)
    _train(s)
    w1 = _weights(s)
    with cg.CheckpointManager(run) as mgr:
        mgr.save(1, s["state"], force=True)
    tmp_path.chmod(0o755)
    with as_user(NOBODY):
        mgr = cg.CheckpointManager(run)  # reading is allowed: restore works
        assert mgr.restore(make_setup(hidden=4, seed=3)["state"]) == 1
        _train(s)
        with pytest.raises(cg.StoragePermissionError) as info:
            mgr.save(2, s["state"], force=True)
        mgr.close()
    assert isinstance(info.value, PermissionError)
    msg = str(info.value)
    assert str(run) in msg and "Check the owner and mode" in msg
    _intact(run, 1, w1)
    with pytest.raises(cg.StoragePermissionError, match="Permission denied"), as_user(NOBODY):
        cg.CheckpointManager(tmp_path / "other-run").save(1, s["state"], force=True)


def test_read_only_directory(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "4m") as mnt:
        run = mnt / "run"
        s = make_setup(hidden=4)
        _train(s)
        w1 = _weights(s)
        with cg.CheckpointManager(run) as mgr:
            mgr.save(1, s["state"], force=True)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        mgr = cg.CheckpointManager(run)
        assert mgr.restore(make_setup(hidden=4, seed=3)["state"]) == 1
        with pytest.raises(cg.StoragePermissionError, match="Read-only filesystem") as info:
            mgr.save(2, s["state"], force=True)
        assert str(run) in str(info.value) and "writable location" in str(info.value)
        mgr.close()
        _intact(run, 1, w1)
        report = cg.verify(run)
        assert report.ok


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-run"
    with pytest.raises(cg.CheckpointNotFoundError, match="does not exist") as info:
        cg.verify(missing)
    assert str(missing) in str(info.value) and isinstance(info.value, FileNotFoundError)
    with cg.CheckpointManager(missing, lock=False) as mgr:  # a fresh run: nothing to restore
        assert mgr.restore(make_setup(hidden=4)["state"]) is None
        with pytest.raises(cg.CheckpointNotFoundError, match="steps available: none"):
            mgr.restore(make_setup(hidden=4)["state"], step=5)
    # A path through a regular file: no directory can be made there.
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(cg.StorageError, match="Not a directory") as info:
        cg.CheckpointManager(blocker / "run").save(1, make_setup(hidden=4)["state"], force=True)
    assert str(blocker) in str(info.value) and "Point the run at a directory" in str(info.value)


def _hold_lock(run: str, ready: str) -> None:
    mgr = cg.CheckpointManager(run)
    mgr.pin(1)  # the first write takes the lock (a manager that only restores takes none)
    Path(ready).write_text(str(os.getpid()))
    time.sleep(600)


def test_second_live_process_is_refused_until_it_dies(tmp_path: Path) -> None:
    run, ready = tmp_path / "run", tmp_path / "ready"
    s = make_setup(hidden=4)
    _train(s)
    w1 = _weights(s)
    with cg.CheckpointManager(run) as mgr:
        mgr.save(1, s["state"], force=True)
    ctx = mp.get_context("forkserver")
    proc = ctx.Process(target=_hold_lock, args=(str(run), str(ready)), daemon=True)
    proc.start()
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.is_alive() and time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(cg.RunLockedError) as info:
            cg.CheckpointManager(run).save(2, s["state"], force=True)
        msg = str(info.value)
        assert f"pid {proc.pid}" in msg and socket.gethostname() in msg and str(run) in msg
        assert "Stop that run first" in msg and ": alive." in msg
        # Reading is safe while it is locked.
        assert cg.verify(run).ok
        with cg.CheckpointManager(run, lock=False) as reader:
            assert reader.restore(make_setup(hidden=4, seed=3)["state"]) == 1
    finally:
        proc.kill()  # SIGKILL: the kernel releases the flock
        proc.join(30)
    with cg.CheckpointManager(run) as mgr:
        mgr.save(2, s["state"], force=True)
    _intact(run, 2, _weights(s))
    assert w1.keys() == _weights(s).keys()


def test_failed_save_is_caught_and_training_goes_on(tmp_path: Path, async_save: bool) -> None:
    """An unsupported value in the state fails the save; fix it and the next save works."""
    run = tmp_path / "run"
    s = make_setup(hidden=4)
    _train(s)
    w1 = _weights(s)
    with cg.CheckpointManager(run, async_save=async_save) as mgr:
        mgr.save(1, s["state"], force=True)
        s["state"].extra["bad"] = lambda: None
        with pytest.raises(cg.UnsupportedStateError, match="extra"):
            mgr.save(2, s["state"], force=True)
        del s["state"].extra["bad"]
        _train(s)
        mgr.save(3, s["state"], force=True)
    _intact(run, 3, _weights(s))
    assert [c.step for c in cg.CheckpointManager(run, lock=False).checkpoints()] == [1, 3]
    assert w1.keys() == _weights(s).keys()
