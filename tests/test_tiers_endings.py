"""Tiered runs in one process: the endings a user meets around the tiers (found by a new user's
first try): a local directory shared with another run, inside the run, unwritable; copies of a run
deleted from the durable tier; a manager without tiers= on a tiered run; the commands that read the
durable tier; and what a hot save may touch in the durable tier (nothing, until a copy is due).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import ckptguard as cg
from ckptguard.cli import main
from ckptguard.run.catalog import scan
from ckptguard.storage import LocalStorage
from ckptguard.testing import FaultyStorage
from ckptguard.tiers import Tiers

NEVER = 1e9


def state() -> cg.TrainState:
    torch.manual_seed(0)
    return cg.TrainState(model=torch.nn.Linear(4, 4), optimizer=None, extra={"n": 0})


def local_only(local: Path, **kw: object) -> Tiers:
    return Tiers(hot=False, local=str(local), durable_every_seconds=NEVER, **kw)  # type: ignore[arg-type]


def crash_after_saving(run: Path, local: Path, steps: range) -> None:
    """A run that saved ``steps`` to its local tier, then died of an exception (nothing copied down)."""
    s = state()
    with pytest.raises(RuntimeError), cg.CheckpointManager(run, tiers=local_only(local)) as mgr:
        for step in steps:
            mgr.save(step, s, force=True)
        raise RuntimeError("the user's code fails")


def test_a_local_directory_is_one_runs(tmp_path: Path) -> None:
    local = tmp_path / "local"
    cg.CheckpointManager(tmp_path / "x", tiers=local_only(local)).close()
    with pytest.raises(ValueError, match="local tier of another run .*each run its own local directory"):
        cg.CheckpointManager(tmp_path / "y", tiers=local_only(local))
    with pytest.raises(ValueError, match="run directory .*a directory of its own"):
        cg.CheckpointManager(tmp_path / "z", tiers=local_only(tmp_path / "z"))
    with pytest.raises(ValueError, match="run directory"):
        cg.CheckpointManager(tmp_path / "w", tiers=local_only(tmp_path / "w" / "local"))
    (tmp_path / "file").write_text("a file")
    with pytest.raises(ValueError, match="cannot be written .*writable node-local directory"):
        cg.CheckpointManager(tmp_path / "v", tiers=local_only(tmp_path / "file" / "local"))


def test_copies_of_a_run_deleted_from_the_durable_tier_are_not_restored_and_go_at_the_first_save(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run, local = tmp_path / "run", tmp_path / "local"
    crash_after_saving(run, local, range(1, 4))
    assert [c.step for c in scan(LocalStorage(local))] == [2, 3]  # local_keep=2
    shutil.rmtree(run)  # the user starts over
    s = state()
    with caplog.at_level(logging.WARNING), cg.CheckpointManager(run, tiers=local_only(local)) as mgr:
        assert mgr.restore(s) is None  # a fresh start, not the deleted run's step 3
        assert "belong to no lineage" in caplog.text
        mgr.save(1, s, force=True)
        assert [c.step for c in scan(LocalStorage(local))] == [1]  # the stale copies went
    assert "Removing" in caplog.text


def test_a_manager_without_tiers_says_the_tiers_hold_newer_checkpoints(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run, local = tmp_path / "run", tmp_path / "local"
    crash_after_saving(run, local, range(1, 4))
    with caplog.at_level(logging.WARNING), cg.CheckpointManager(run) as mgr:
        assert mgr.restore(state()) is None
    assert "is a tiered run: its local tier on this host holds step 3" in caplog.text
    assert "tiers=Tiers" in caplog.text
    with cg.CheckpointManager(run, tiers=local_only(local)) as mgr:  # with tiers: restored
        assert mgr.restore(state()) == 3


def test_commands_that_read_the_durable_tier_name_the_faster_tiers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, local = tmp_path / "run", tmp_path / "local"
    crash_after_saving(run, local, range(1, 4))
    # nothing in the durable tier yet: verify checks the tiers ls lists (this host's), each in a table
    assert main(["verify", str(run)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps at the terminal's width
    assert "(local tier)" in out and "step-000000003" in out and "all 2 checkpoint(s) sound" in out
    assert main(["verify", "--json", str(run)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True and doc["checkpoints"] == []  # the durable tier: none yet, no problem
    assert [c["name"] for c in doc["tiers"]["local"]["checkpoints"]] == ["step-000000002", "step-000000003"]
    weights = next(p for p in (local / "step-000000003").iterdir() if p.suffix == ".safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert main(["verify", str(run)]) == 1  # a damaged copy in a faster tier is a problem
    assert "step-000000003" in " ".join(capsys.readouterr().out.split())
    weights.write_bytes(bytes(data[:-1] + bytes([data[-1] ^ 0xFF])))
    assert main(["verify", str(run)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(run)]) == 2
    assert "newest step 3" in " ".join(capsys.readouterr().err.split())
    assert main(["ls", str(run)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "local" in out and "newest step 3" in out
    assert main(["verify", str(local)]) == 0  # a tier is a run directory of its own


def test_a_hot_save_touches_the_durable_tier_only_when_a_copy_is_due(tmp_path: Path) -> None:
    durable = FaultyStorage(LocalStorage(tmp_path / "run"))
    s = state()
    mgr = cg.CheckpointManager(durable, tiers=Tiers(local=str(tmp_path / "local"), local_every_seconds=NEVER,
                                                    durable_every_seconds=NEVER))
    try:
        mgr.save(1, s, force=True, metrics={"loss": 1.0})  # the first save records the run there (its lineage)
        mgr.wait()
        before = durable.count
        for step in range(2, 6):
            mgr.save(step, s, force=True, metrics={"loss": 1.0 / step})
        mgr.wait()
        assert durable.count == before  # no lock check, metrics.csv, run record or listing per hot save
    finally:
        mgr.close()
    assert durable.count > before  # close() copied the newest down, with the run's bookkeeping
    assert [c.step for c in scan(LocalStorage(tmp_path / "run"))] == [5]
    assert (tmp_path / "run" / "metrics.csv").read_text().count("\n") >= 5
