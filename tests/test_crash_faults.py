"""Fault injection sweep: fail the k-th write/fsync/rename/delete/replace of a save, for every k.

After each injected fault: the error is a CheckpointError (AsyncSaveError for async saves),
``restore`` returns a whole checkpoint (the previous one unless the fault came after the commit
rename), debris is never listed as a checkpoint, and the live training saves again, which
cleans the debris. Retention deletes (keep_last=1) are part of every save swept here.
"""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptguard as cg
from ckptguard.errors import AsyncSaveError, CheckpointError
from ckptguard.persist.writer import clean_debris, delete_checkpoint
from ckptguard.run.catalog import find_debris, scan
from ckptguard.storage import LocalStorage
from ckptguard.testing import FaultyStorage, count_ops
from trainlib import make_setup, same_weights, train_step

FAULTS_INJECTED: list[int] = []  # n of each sweep run in this process (each also printed; see -s)


def _weights(s: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in s["model"].state_dict().items()}


def _train(s: dict[str, Any], steps: int) -> None:
    it = iter(s["loader"])
    for _ in range(steps):
        xb, yb = next(it)
        train_step(s, xb, yb)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A base run holding step 1, and live objects trained one step further (step 2 weights)."""
    base = tmp_path_factory.mktemp("base") / "run"
    s = make_setup()
    _train(s, 1)
    w1 = _weights(s)
    with cg.CheckpointManager(base) as mgr:
        mgr.save(1, s["state"], force=True)
    _train(s, 1)
    return {"base": base, "setup": s, "w1": w1, "w2": _weights(s)}


def _fresh(trained: dict[str, Any], dest: Path, async_save: bool, **fault: Any) -> tuple[FaultyStorage, cg.CheckpointManager]:
    shutil.copytree(trained["base"], dest)
    fs = FaultyStorage(LocalStorage(dest), **fault)
    base_id = json.loads((dest / "step-000000001" / "MANIFEST.json").read_text())["run_id"]
    # continue the base run's history (its lineage) without restoring: retention may prune step 1
    mgr = cg.CheckpointManager(fs, async_save=async_save, retention=cg.Retention(keep_last=1), run_id=base_id)
    return fs, mgr


def _save(mgr: cg.CheckpointManager, step: int, state: cg.TrainState) -> None:
    mgr.save(step, state, force=True)
    mgr.wait()


def _check_recovery(fs: FaultyStorage, mgr: cg.CheckpointManager, trained: dict[str, Any], k: int, committed: bool) -> None:
    """After a fault: restore gives the last whole checkpoint exactly, and training goes on."""
    other = make_setup(seed=7)
    got = mgr.restore(other["state"])
    assert got == (2 if committed else 1), (k, fs.failed, got)
    assert same_weights(_weights(other), trained["w2"] if committed else trained["w1"])
    # Training goes on: the next save works and cleans every leftover.
    _save(mgr, 3, trained["setup"]["state"])
    mgr.close()
    assert find_debris(fs) == [], (k, fs.failed)
    # keep_last=1, and retention never deletes the checkpoint the run resumed from
    assert [c.step for c in scan(fs) if c.valid] == [got, 3]


def _sweep(trained: dict[str, Any], tmp: Path, async_save: bool, *, sticky: bool, error: int) -> int:
    s = trained["setup"]
    fs, mgr = _fresh(trained, tmp / "count", async_save)
    n = count_ops(fs, lambda: _save(mgr, 2, s["state"]))
    mgr.close()
    ops = [e.op for e in fs.log]
    assert {"write", "fsync", "rename", "delete", "replace"} <= set(ops), ops
    commit_at = next(e.index for e in fs.log if e.op == "rename" and e.path == "step-000000002")
    for k in range(1, n + 1):
        fs, mgr = _fresh(trained, tmp / f"k{k}", async_save, fail_at=k, sticky=sticky, error=error)
        raised: BaseException | None = None
        try:
            _save(mgr, 2, s["state"])
        except CheckpointError as e:
            raised = e
        assert fs.failed is not None and fs.failed.index == k
        committed = k > commit_at
        if raised is not None and async_save:
            assert isinstance(raised, AsyncSaveError), repr(raised)
            assert isinstance(raised.__cause__, CheckpointError)
        if not committed:
            assert raised is not None, f"fault #{k} ({fs.failed}) before the commit went unreported"
        # Debris is never listed as a checkpoint; every listed one is whole.
        fs.arm(None)
        listed = [c for c in scan(fs)]
        assert all(c.valid for c in listed), [(c.name, c.problems) for c in listed]
        steps = [c.step for c in listed]
        assert (2 in steps) == committed, (k, fs.failed, steps)
        _check_recovery(fs, mgr, trained, k, committed)
        assert cg.verify(fs.inner.url).ok  # type: ignore[attr-defined]
        shutil.rmtree(tmp / f"k{k}")
    FAULTS_INJECTED.append(n)
    print(f"\nfault sweep ({'async' if async_save else 'sync'}, sticky={sticky}): {n} faults injected")
    return n


@pytest.mark.parametrize("sticky", [False, True], ids=["once", "sticky"])
def test_fault_at_every_op_of_a_save(trained: dict[str, Any], tmp_path: Path, async_save: bool, sticky: bool) -> None:
    n = _sweep(trained, tmp_path, async_save, sticky=sticky, error=errno.ENOSPC if sticky else errno.EIO)
    assert n >= 20


def test_fault_at_every_op_of_a_delete(trained: dict[str, Any], tmp_path: Path) -> None:
    """delete_checkpoint: uncommit first; a fault leaves the checkpoint whole or debris."""
    base = tmp_path / "base"
    shutil.copytree(trained["base"], base)
    s = trained["setup"]
    with cg.CheckpointManager(base) as mgr:
        mgr.save(2, s["state"], force=True)
    fs = FaultyStorage(LocalStorage(tmp_path / "count"))
    shutil.copytree(base, tmp_path / "count")
    n = count_ops(fs, lambda: delete_checkpoint(fs, "step-000000001"))
    assert n >= 2
    for k in range(1, n + 1):
        run = tmp_path / f"k{k}"
        shutil.copytree(base, run)
        fs = FaultyStorage(LocalStorage(run), fail_at=k)
        with pytest.raises(CheckpointError):
            delete_checkpoint(fs, "step-000000001")
        fs.arm(None)
        listed = scan(fs)
        assert all(c.valid for c in listed) and 2 in [c.step for c in listed]
        if 1 in [c.step for c in listed]:  # still whole: restoring it exactly works
            other = make_setup(seed=7)
            with cg.CheckpointManager(fs) as mgr:
                assert mgr.restore(other["state"], step=1) == 1
            assert same_weights(_weights(other), trained["w1"])
        clean_debris(fs)
        assert find_debris(fs) == []
        assert cg.verify(run).ok
    FAULTS_INJECTED.append(n)
    print(f"\nfault sweep (delete_checkpoint): {n} faults injected")


def test_enospc_is_a_disk_full_error_and_training_continues(trained: dict[str, Any], tmp_path: Path, async_save: bool) -> None:
    s = trained["setup"]
    fs, mgr = _fresh(trained, tmp_path / "run", async_save, fail_at=3, error=errno.ENOSPC, sticky=True)
    with pytest.raises(CheckpointError) as info:
        _save(mgr, 2, s["state"])
    err = info.value.__cause__ if async_save else info.value
    assert isinstance(err, cg.DiskFullError) and isinstance(err, OSError)
    assert str(tmp_path / "run") in str(err) and "Free space" in str(err)
    fs.arm(None)
    _save(mgr, 3, s["state"])
    mgr.close()
    assert [c.step for c in scan(fs) if c.valid] == [3] and find_debris(fs) == []


def test_faulty_storage_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown operation"):
        FaultyStorage(LocalStorage(tmp_path), ops=["teleport"])
    with pytest.raises(ValueError, match="counts from 1"):
        FaultyStorage(LocalStorage(tmp_path), fail_at=0)
    fs = FaultyStorage(LocalStorage(tmp_path), fail_at=1, ops=["rename"])
    fs.makedirs("a")  # not counted
    with pytest.raises(cg.StorageError, match="injected fault #1"):
        fs.rename_dir("a", "b")
    assert (tmp_path / "a").is_dir() and not (tmp_path / "b").exists()


def test_fault_at_every_op_of_an_object_store_save(trained: dict[str, Any]) -> None:
    """fsspec backends (no atomic rename): the manifest, uploaded last, is the commit marker.

    Sync only: the async path runs the same writer (swept above on the local backend)."""
    async_save = False
    import uuid

    from ckptguard.storage import FsspecStorage

    s = trained["setup"]

    def fresh(**fault: Any) -> tuple[FaultyStorage, cg.CheckpointManager]:
        fs = FaultyStorage(FsspecStorage(f"memory://crash-{uuid.uuid4().hex}/run"), **fault)
        armed = fs.fail_at
        fs.arm(None)
        with cg.CheckpointManager(fs) as first:  # step 1 holds the step-1 weights
            other = make_setup()
            _train(other, 1)
            first.save(1, other["state"], force=True)
        mgr = cg.CheckpointManager(fs, async_save=async_save, retention=cg.Retention(keep_last=1), run_id=first.run_id)
        fs.arm(armed)
        return fs, mgr

    fs, mgr = fresh()
    n = count_ops(fs, lambda: _save(mgr, 2, s["state"]))
    mgr.close()
    commit_at = next(e.index for e in fs.log if e.op == "fsync" and e.path == "step-000000002/MANIFEST.json")
    for k in range(1, n + 1):
        fs, mgr = fresh()
        fs.arm(k)
        try:
            _save(mgr, 2, s["state"])
            raised = False
        except CheckpointError as e:
            raised = True
            assert not async_save or isinstance(e, AsyncSaveError)
        committed = k > commit_at
        assert raised or committed, (k, fs.failed)
        fs.arm(None)
        steps = [c.step for c in scan(fs)]
        assert (2 in steps if committed else steps == [1]), (k, fs.failed, steps)
        assert all(c.valid for c in scan(fs))
        _check_recovery(fs, mgr, trained, k, committed)
    FAULTS_INJECTED.append(n)
    print(f"\nfault sweep (fsspec memory://): {n} faults injected")


def test_async_failure_surfaces_on_the_next_save(trained: dict[str, Any], tmp_path: Path) -> None:
    s = trained["setup"]
    fs, mgr = _fresh(trained, tmp_path / "run", True, fail_at=2, error=errno.EIO)
    assert mgr.save(2, s["state"], force=True)  # returns at once; the write fails behind
    time.sleep(0.05)
    with pytest.raises(AsyncSaveError, match="committed are intact") as info:
        for _ in range(200):  # until the background write has failed
            mgr.save(3, s["state"], force=False)
            time.sleep(0.05)
    assert isinstance(info.value.__cause__, cg.StorageError)
    assert "injected fault #2" in str(info.value)
    fs.arm(None)
    mgr.save(4, s["state"], force=True)
    mgr.close()
    assert find_debris(fs) == [] and [c.step for c in scan(fs)] == [4]  # keep_last=1


def test_fault_at_every_op_of_a_resave_of_the_same_step(trained: dict[str, Any], tmp_path: Path) -> None:
    """Re-saving an existing step swaps directories with two renames: the old one comes back on
    a failure between them, so a whole step 1 (old or new weights) always exists."""
    s = trained["setup"]
    fs, mgr = _fresh(trained, tmp_path / "count", False)
    n = count_ops(fs, lambda: _save(mgr, 1, s["state"]))
    mgr.close()
    commit_at = next(e.index for e in fs.log if e.op == "rename" and e.path == "step-000000001")
    for k in range(1, n + 1):
        fs, mgr = _fresh(trained, tmp_path / f"k{k}", False, fail_at=k)
        with contextlib.suppress(CheckpointError):
            _save(mgr, 1, s["state"])
        assert fs.failed is not None and fs.failed.index == k
        fs.arm(None)
        other = make_setup(seed=7)
        assert mgr.restore(other["state"]) == 1, (k, fs.failed)
        assert same_weights(_weights(other), trained["w2"] if k > commit_at else trained["w1"]), (k, fs.failed)
        _save(mgr, 3, s["state"])
        mgr.close()
        assert find_debris(fs) == [] and cg.verify(tmp_path / f"k{k}").ok, (k, fs.failed)
    FAULTS_INJECTED.append(n)
    print(f"\nfault sweep (re-save of a step): {n} faults injected")


def test_kill_between_the_two_renames_of_a_resave(trained: dict[str, Any], tmp_path: Path) -> None:
    """The on-disk state a SIGKILL leaves between 'step-1 -> .trash' and '.tmp -> step-1'."""
    run = tmp_path / "run"
    shutil.copytree(trained["base"], run)
    (run / "step-000000001").rename(run / ".trash-step-000000001-0badc0de")
    (run / ".tmp-step-000000001-12345678").mkdir()
    (run / ".tmp-step-000000001-12345678" / "model.safetensors").write_bytes(b"partial")
    (run / ".trash-step-000000002-feedf00d").mkdir()  # a delete that had uncommitted already
    storage = LocalStorage(run)
    assert scan(storage) == [] and len(find_debris(storage)) == 3
    removed = clean_debris(storage)
    assert sorted(removed) == [".tmp-step-000000001-12345678", ".trash-step-000000002-feedf00d"]
    other = make_setup(seed=7)
    with cg.CheckpointManager(run) as mgr:
        assert mgr.restore(other["state"]) == 1
    assert same_weights(_weights(other), trained["w1"]) and find_debris(storage) == []


def test_faults_reach_the_positional_and_direct_writes_of_local_tensor_files(tmp_path: Path) -> None:
    """The local disk writes tensor files with pwritev / O_DIRECT, not write(): FaultyStorage
    counts those writes too, so a failing disk under them fails the save and commits nothing."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1024, 1024)  # 4 MiB of weights: large enough for the parallel writer
    state = cg.TrainState(model=model)
    run = tmp_path / "run"
    with cg.CheckpointManager(run) as first:
        first.save(1, state, force=True)
    probe = FaultyStorage(LocalStorage(tmp_path / "count"), ops={"write"}, path="*model.safetensors")
    with cg.CheckpointManager(probe, lock=False) as counting:
        writes = count_ops(probe, lambda: counting.save(1, state, force=True))
    assert writes >= 1, "no write of model.safetensors was counted"
    assert {f.call for f in probe.log} & {"pwritev", "pwrite_direct"}, [f.call for f in probe.log]
    with torch.no_grad():
        model.weight.add_(1.0)
    fs = FaultyStorage(LocalStorage(run), fail_at=1, ops={"write"}, path="*model.safetensors")
    mgr = cg.CheckpointManager(fs)
    with pytest.raises(CheckpointError, match="model.safetensors|I/O error"):
        mgr.save(2, state, force=True)
    assert fs.failed is not None and fs.failed.call in ("pwritev", "pwrite_direct")
    mgr.close()
    assert [c.step for c in scan(LocalStorage(run))] == [1]
    assert cg.verify(str(run)).ok
