"""``ckptguard prune`` and ``pin``/``unpin`` on real runs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

import ckptguard as cg
import trainlib
from ckptguard.cli import common, main


def change_config_at(step_at: int):  # type: ignore[no-untyped-def]
    def hook(step: int, s: dict[str, Any]) -> None:
        if step == step_at:
            s["state"].config = {"lr": 5e-3, "hidden": 32}  # e.g. an LR change mid-run
    return hook


@pytest.fixture
def run(tmp_path: Path) -> Path:
    """A real run: 20 steps, a save every 2, a config change at step 11, everything kept."""
    run = tmp_path / "run"
    policy = cg.Retention(keep_best=1, metric="loss", keep_config_changes=True)
    trainlib.run_training(run, 20, every_steps=2, manager_kwargs={"retention": policy}, on_step=change_config_at(11))
    (run / ".tmp-step-000000022-deadbeef").mkdir()  # debris of an interrupted save
    return run


def on_disk(run: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in run.glob("step-*") if (p / "MANIFEST.json").exists())


def prune_json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code = main(["prune", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_dry_run_explains_every_decision_and_changes_nothing(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pin", str(run), "4", "--note", "paper figure"]) == 0
    capsys.readouterr()
    code, out = prune_json(capsys, str(run), "--dry-run", "--keep-last", "2")
    assert code == 0 and out["dry_run"] and out["policy_source"] == "recorded policy + flags"
    d = {x["step"]: x for x in out["decisions"]}
    assert d[20]["keep"] and "newest valid" in d[20]["reasons"] and "last 2" in d[20]["reasons"]
    assert d[10]["keep"] and d[10]["reasons"] == ["before config change"]
    assert d[4]["keep"] and "pinned: paper figure" in d[4]["reasons"]
    best = [x for x in out["decisions"] if any(r.startswith("best loss=") for r in x["reasons"])]
    assert len(best) == 1 and best[0]["keep"]
    gone = [x["step"] for x in out["decisions"] if not x["keep"]]
    assert gone and all(x["reasons"] == ["outside the policy"] for x in out["decisions"] if not x["keep"])
    assert out["debris"] == [".tmp-step-000000022-deadbeef"]
    assert on_disk(run) == list(range(2, 21, 2))  # nothing deleted
    assert (run / ".tmp-step-000000022-deadbeef").exists()


def test_prune_applies_the_plan_and_removes_debris(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, plan = prune_json(capsys, str(run), "--dry-run", "--keep-last", "2")
    code, out = prune_json(capsys, str(run), "--keep-last", "2")
    assert code == 0 and not out["dry_run"]
    assert on_disk(run) == [x["step"] for x in plan["decisions"] if x["keep"]]
    assert not (run / ".tmp-step-000000022-deadbeef").exists()
    s = trainlib.make_setup()
    with cg.CheckpointManager(run) as mgr:
        assert mgr.restore(s["state"]) == 20  # what is left restores


def test_prune_refuses_while_a_live_run_holds_the_lock(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mgr = cg.CheckpointManager(run)
    mgr.pin(20)  # a write: the manager takes the run lock (a restore-only manager takes none)
    try:
        assert main(["prune", str(run), "--keep-last", "1"]) == 2
        err = capsys.readouterr().err
        assert "is locked by another writer" in err and f"pid {os.getpid()}" in err and "alive" in err
        assert on_disk(run) == list(range(2, 21, 2))
        assert main(["prune", str(run), "--dry-run", "--keep-last", "1"]) == 0  # reading is fine
    finally:
        mgr.close()


def test_budget_and_errors(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = prune_json(capsys, str(run), "--dry-run", "--keep-last", "5", "--max-bytes", "1")
    assert code == 0 and out["budget_overrun_bytes"] > 0
    kept = [x for x in out["decisions"] if x["keep"]]
    assert kept and all(x["protected"] for x in kept)
    assert main(["prune", str(run), "--phased"]) == 2
    assert "total_steps" in capsys.readouterr().err
    assert main(["prune", str(run.parent / "nope")]) == 2
    assert main(["pin", str(run), "3"]) == 2  # no checkpoint at step 3
    assert "not a committed checkpoint" in capsys.readouterr().err


def test_table_output(run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(common, "_console", Console(width=160))
    assert main(["prune", str(run), "--dry-run", "--keep-last", "3", "--max-bytes", "120000"]) == 0
    text = capsys.readouterr().out
    for expected in ("step", "decision", "reasons", "would delete", "before config change", "last 3",
                     "newest valid", "over byte budget", "debris to remove: .tmp-step-000000022-deadbeef"):
        assert expected in text, expected
