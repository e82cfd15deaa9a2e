"""CheckpointManager basics: triggers, listing, restore of a given step, metrics.csv, lifecycle."""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ckptguard as cg


def _state(v: float = 0.0) -> cg.TrainState:
    m = nn.Linear(2, 2)
    with torch.no_grad():
        m.weight.fill_(v)
    return cg.TrainState(model=m, extra={"v": v})


def test_every_steps_and_force(run_dir: Path, async_save: bool) -> None:
    with cg.CheckpointManager(run_dir, every_steps=3, async_save=async_save) as mgr:
        saved = [s for s in range(1, 11) if mgr.save(s, _state(s))]
        assert saved == [3, 6, 9]
        assert mgr.save(10, _state(10), force=True)
        mgr.wait()
        assert [c.step for c in mgr.checkpoints()] == [3, 6, 9, 10]
        latest = mgr.latest()
        assert latest is not None and latest.step == 10 and latest.valid and latest.size_bytes > 0
        assert latest.created is not None and latest.reason == "forced"
        assert latest.path.endswith("step-000000010")


def test_every_seconds(run_dir: Path) -> None:
    """A save is due once ``every_seconds`` have passed since the last one (or since the start).

    On a loaded machine any call may come late, so "not due" is asserted only where the time
    measured around the call proves the interval had not passed yet.
    """
    interval = 1.0
    t0 = time.monotonic()
    with cg.CheckpointManager(run_dir, every_seconds=interval) as mgr:
        first = mgr.save(1, _state())
        if time.monotonic() - t0 < interval:
            assert not first
        time.sleep(interval + 0.05)
        t2 = time.monotonic()
        assert mgr.save(2, _state())
        third = mgr.save(3, _state())
        if time.monotonic() - t2 < interval:
            assert not third
        assert [c.step for c in mgr.checkpoints()] == [s for s, saved in ((1, first), (2, True), (3, third)) if saved]


def test_no_trigger_means_only_forced_saves(run_dir: Path) -> None:
    with cg.CheckpointManager(run_dir) as mgr:
        assert not any(mgr.save(s, _state()) for s in range(1, 50))
        assert mgr.checkpoints() == []


def test_bad_options_raise_on_construction(run_dir: Path) -> None:
    with pytest.raises(ValueError, match="every_steps"):
        cg.CheckpointManager(run_dir, every_steps=0)
    with pytest.raises(ValueError, match="keep_last"):
        cg.Retention(keep_last=0)
    with pytest.raises(ValueError, match="metric"):
        cg.Retention(keep_best=1)


def test_restore_exact_step_and_missing_step(run_dir: Path, async_save: bool) -> None:
    with cg.CheckpointManager(run_dir, async_save=async_save) as mgr:
        for s in (1, 2, 3):
            mgr.save(s, _state(float(s)), force=True)
    with cg.CheckpointManager(run_dir) as mgr:
        st = _state()
        assert mgr.restore(st, step=2) == 2
        assert st.extra == {"v": 2.0} and float(st.model.weight[0, 0].detach()) == 2.0
        with pytest.raises(cg.CheckpointNotFoundError, match="No checkpoint for step 7.*1, 2, 3"):
            mgr.restore(st, step=7)
        assert mgr.restore(st) == 3


def test_fresh_run_restores_none(run_dir: Path) -> None:
    with cg.CheckpointManager(run_dir) as mgr:
        assert mgr.restore(_state()) is None
        assert mgr.latest() is None


def test_keep_last_ring_buffer(run_dir: Path, async_save: bool) -> None:
    with cg.CheckpointManager(run_dir, every_steps=1, retention=cg.Retention(keep_last=2), async_save=async_save) as mgr:
        for s in range(1, 6):
            mgr.save(s, _state(s))
        mgr.wait()
        assert [c.step for c in mgr.checkpoints()] == [4, 5]


def test_pruned_checkpoints_vanish_at_once_and_their_data_is_freed_in_the_background(
    run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Retention uncommits and hides a pruned checkpoint before save() returns; the reaper frees
    its bytes beside training, and close() waits for it."""
    caplog.set_level(logging.DEBUG, logger="ckptguard.manager.saving")
    with cg.CheckpointManager(run_dir, retention=cg.Retention(keep_last=1)) as mgr:
        for s in range(1, 5):
            mgr.save(s, _state(s), force=True)
            assert [c.step for c in mgr.checkpoints()] == [s]  # no wait needed
            assert not any(n.startswith("step-") and n != f"step-{s:09d}" for n in _names(run_dir))
            assert not any((run_dir / n / "MANIFEST.json").exists() for n in _names(run_dir) if n.startswith(".trash-"))
        # what the reaper is removing is not debris to clean again: only the first save cleans
        assert [r.message for r in caplog.records].count(f"Cleaning up debris in {mgr.storage.url}") == 1
    assert [n for n in _names(run_dir) if n.startswith((".trash-", "step-"))] == ["step-000000004"]


def test_failed_background_removal_is_debris_for_the_next_save(run_dir: Path) -> None:
    from ckptguard.storage.local import LocalStorage
    from ckptguard.testing import FaultyStorage

    # the first removal of a trash folder fails (EIO)
    storage = FaultyStorage(LocalStorage(run_dir), fail_at=1, ops={"remove_tree"}, path=".trash-*")
    with cg.CheckpointManager(storage, retention=cg.Retention(keep_last=1)) as mgr:
        mgr.save(1, _state(1), force=True)
        mgr.save(2, _state(2), force=True)  # prunes 1; its removal fails on the reaper thread
        mgr.wait()
        failed = storage.failed
        assert failed is not None and failed.path in _names(run_dir)  # left behind, logged, not raised
        mgr.save(3, _state(3), force=True)  # cleans it, prunes 2
        assert [c.step for c in mgr.checkpoints()] == [3]
    assert [n for n in _names(run_dir) if n.startswith((".trash-", "step-"))] == ["step-000000003"]


def _names(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir())


def test_metrics_csv_is_appended_and_survives_new_columns(run_dir: Path) -> None:
    with cg.CheckpointManager(run_dir, every_steps=2) as mgr:
        for s in range(1, 5):
            mgr.save(s, _state(), metrics={"loss": 1.0 / s})
        mgr.save(5, _state(), metrics={"loss": 0.1, "val_acc": 0.9}, force=True)
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["val_acc"] == "0.9" and rows[0]["val_acc"] == ""
    assert float(rows[2]["loss"]) == pytest.approx(1 / 3)


def test_torn_metrics_line_is_skipped_and_next_append_starts_fresh(run_dir: Path) -> None:
    from ckptguard.run.metrics_log import read_metrics
    from ckptguard.storage import LocalStorage

    with cg.CheckpointManager(run_dir) as mgr:
        mgr.save(1, _state(), metrics={"loss": 1.0}, force=True)
    with (run_dir / "metrics.csv").open("a") as f:
        f.write("2,17000")  # a crash mid-line
    with cg.CheckpointManager(run_dir) as mgr:
        mgr.save(3, _state(), metrics={"loss": 0.5}, force=True)
    _, rows = read_metrics(LocalStorage(run_dir))
    assert [r["step"] for r in rows] == [1, 3]


def test_closed_manager_refuses_work(run_dir: Path) -> None:
    mgr = cg.CheckpointManager(run_dir)
    mgr.close()
    mgr.close()
    with pytest.raises(cg.CheckpointError, match="closed"):
        mgr.save(1, _state(), force=True)


def test_a_step_is_saved_once_per_writer_and_a_new_writer_replaces_it(run_dir: Path) -> None:
    with cg.CheckpointManager(run_dir) as mgr:
        assert mgr.save(4, _state(1.0), force=True) is True
        assert mgr.save(4, _state(2.0), force=True) is False  # this manager saved step 4 already
        st = _state()
        mgr.restore(st)
    assert st.extra == {"v": 1.0}
    with cg.CheckpointManager(run_dir) as mgr:  # another writer that did not restore: refused
        with pytest.raises(cg.CheckpointError, match="belongs to another run"):
            mgr.save(4, _state(2.0), force=True)
        mgr.restore(st)
    assert st.extra == {"v": 1.0}
    assert [p.name for p in run_dir.iterdir() if p.name.startswith("step-")] == ["step-000000004"]
    assert not [p for p in run_dir.iterdir() if p.name.startswith((".tmp-", ".trash-"))]


def test_public_api_names() -> None:
    for name in ("TrainState", "ResumableSampler", "CheckpointManager", "Retention", "verify", "CheckpointError"):
        assert hasattr(cg, name)
    for m in ("save", "restore", "wait", "close", "checkpoints", "latest", "preemption_guard", "__enter__", "__exit__"):
        assert callable(getattr(cg.CheckpointManager, m))
    assert issubclass(cg.CheckpointNotFoundError, FileNotFoundError)
    assert all(issubclass(getattr(cg, n), cg.CheckpointError) for n in cg.__all__ if n.endswith("Error"))


def test_closed_managers_leave_no_thread_behind(run_dir: Path) -> None:
    """An evaluation loop opens a manager per checkpoint: closing each ends its threads."""
    import threading

    before = {t.ident for t in threading.enumerate()}
    for i in range(1, 6):
        with cg.CheckpointManager(run_dir, retention=cg.Retention(keep_last=1)) as mgr:
            state = _state(i)
            assert mgr.restore(state) == (i - 1 if i > 1 else None)
            mgr.save(i, state, force=True)  # i > 1 prunes the previous one on the reaper
    assert [c.step for c in cg.CheckpointManager(run_dir).checkpoints()] == [4, 5]  # 4: resumed from
    left = [t.name for t in threading.enumerate() if t.ident not in before and t.name.startswith("ckptguard")]
    assert left == []


def test_keep_best_metric_missing_from_saves_is_said_once(run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The README's loop with metric='val_loss' logged only on some steps: the user is told."""
    retention = cg.Retention(keep_last=1, keep_best=1, metric="val_loss")
    with caplog.at_level(logging.WARNING, logger="ckptguard"), cg.CheckpointManager(run_dir, every_steps=2, retention=retention) as mgr:
        for step in range(1, 9):
            metrics = {"loss": 1.0 / step}
            if step == 4:
                metrics["val_loss"] = 0.5
            mgr.save(step, _state(step), metrics=metrics)
    said = [r.getMessage() for r in caplog.records if "ranked only by the metrics passed" in r.getMessage()]
    assert len(said) == 1 and "got no 'val_loss' (metrics given: loss)" in said[0] and "save of step 2" in said[0]
    assert [c.step for c in cg.CheckpointManager(run_dir).checkpoints()] == [4, 8]  # 4: best val_loss


def test_manifest_field_providers_and_post_commit_hooks_extend_every_save(run_dir: Path, async_save: bool) -> None:
    """The public extension points: a provider's fields land in the manifest (replacing a
    built-in one it names), hooks see each committed manifest in order, before retention."""
    seen: list[tuple[str, int, list[int]]] = []

    def provider(step: int, state: cg.TrainState) -> dict[str, Any]:
        return {"extra_data": {"step_seen": step}, "probe": {"custom": True}}

    with cg.CheckpointManager(run_dir, async_save=async_save, retention=cg.Retention(keep_last=1)) as mgr:
        mgr.add_manifest_fields(provider)
        mgr.add_post_commit_hook(lambda m: seen.append(("first", m["step"], [c.step for c in mgr.checkpoints()])))
        mgr.add_post_commit_hook(lambda m: seen.append(("second", m["step"], [])))
        for s in (1, 2):
            mgr.save(s, _state(s), force=True)
        mgr.wait()
    manifest = json.loads((run_dir / "step-000000002" / "MANIFEST.json").read_text())
    assert manifest["extra_data"] == {"step_seen": 2} and manifest["probe"] == {"custom": True}
    assert manifest["verification"] == {"status": "unverified"}  # built-in fields stay
    # hooks run in registration order, after the commit and before retention pruned step 1
    assert seen == [("first", 1, [1]), ("second", 1, []), ("first", 2, [1, 2]), ("second", 2, [])]
