"""From a new user's pass over the README: what a user sees when a manifest field provider or a
post-commit hook goes wrong, the CLI's wording, and the README's loop. Each test is the user's
call and the message they read."""

from __future__ import annotations

import datetime
import json
import logging
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ckptguard as cg
from ckptguard.errors import ManifestFieldError, PostCommitError
from ckptguard.manager.extensions import MANIFEST_KEYS, PROVIDER_SLOTS


def _state(v: float = 0.0) -> cg.TrainState:
    m = nn.Linear(2, 2)
    with torch.no_grad():
        m.weight.fill_(v)
    return cg.TrainState(model=m, extra={"v": v})


def _steps(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("step-")) if run.exists() else []


# ---- 1. a provider may not replace what the manifest itself uses ---------------------------------


@pytest.mark.parametrize("key", sorted(MANIFEST_KEYS - PROVIDER_SLOTS))
def test_a_provider_returning_a_built_in_key_is_refused_before_anything_is_written(run_dir: Path, key: str) -> None:
    def my_fields(step: int, state: cg.TrainState) -> dict[str, Any]:
        return {key: 123}

    with cg.CheckpointManager(run_dir) as mgr:
        mgr.add_manifest_fields(my_fields)
        with pytest.raises(ManifestFieldError) as ei:
            mgr.save(1, _state(), force=True)
        assert mgr.checkpoints() == []
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, cg.CheckpointError)
    msg = str(ei.value)
    assert "test_a_provider_returning_a_built_in_key_is_refused_before_anything_is_written.<locals>.my_fields" in msg
    assert f"returned the key {key!r}, which the manifest itself uses" in msg
    assert "step 1 was not saved (nothing was written" in msg and f"e.g. 'my_{key}'" in msg
    assert _steps(run_dir) == []  # no checkpoint, no staging debris
    assert cg.CheckpointManager(run_dir).restore(_state()) is None


def test_the_refusal_applies_to_async_saves_and_keeps_earlier_checkpoints(run_dir: Path) -> None:
    calls = {"n": 0}

    def position(step: int, state: cg.TrainState) -> dict[str, Any]:
        calls["n"] += 1
        return {"data_position": step} if step < 2 else {"step": "two"}

    with cg.CheckpointManager(run_dir, async_save=True) as mgr:
        mgr.add_manifest_fields(position)
        mgr.save(1, _state(1.0), force=True)
        with pytest.raises(ManifestFieldError, match=r"position \(registered with add_manifest_fields\) returned the key 'step'.*step 2 was not saved"):
            mgr.save(2, _state(2.0), force=True)
        mgr.wait()
        assert [c.step for c in mgr.checkpoints()] == [1]
    s = _state()
    assert cg.CheckpointManager(run_dir).restore(s) == 1 and float(s.model.weight[0, 0]) == 1.0
    assert json.loads((run_dir / "step-000000001" / "MANIFEST.json").read_text())["data_position"] == 1


def test_a_provider_value_that_is_not_json_is_refused_naming_the_key(run_dir: Path) -> None:
    def stamp(step: int, state: cg.TrainState) -> dict[str, Any]:
        return {"saved_at": datetime.datetime(2026, 1, 1)}

    with cg.CheckpointManager(run_dir) as mgr:
        mgr.add_manifest_fields(stamp)
        with pytest.raises(ManifestFieldError) as ei:
            mgr.save(3, _state(), force=True)
    msg = str(ei.value)
    assert "stamp (registered with add_manifest_fields) returned a value for 'saved_at' that is not JSON" in msg
    assert "Object of type datetime is not JSON serializable" in msg and "step 3 was not saved" in msg
    assert isinstance(ei.value.__cause__, TypeError)
    assert _steps(run_dir) == []


def test_the_probe_slot_takes_only_an_object(run_dir: Path) -> None:
    with cg.CheckpointManager(run_dir) as mgr:
        mgr.add_manifest_fields(lambda step, state: {"probe": "fast"})
        with pytest.raises(ManifestFieldError, match=r"returned 'probe': str; 'probe' must be a JSON object \(dict\) or None"):
            mgr.save(1, _state(), force=True)
    assert _steps(run_dir) == []


def test_registering_something_not_callable_says_so(run_dir: Path) -> None:
    with cg.CheckpointManager(run_dir) as mgr:
        with pytest.raises(TypeError, match=r"add_manifest_fields\(\) takes a callable \(step, state\) -> dict, got dict"):
            mgr.add_manifest_fields({"epoch": 1})  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"add_post_commit_hook\(\) takes a callable \(manifest\) -> None, got str"):
            mgr.add_post_commit_hook("notify")  # type: ignore[arg-type]


# ---- 2. provider and hook failures name who failed and what happened to the checkpoint ----------


def test_a_provider_that_raises_fails_the_save_with_its_name_and_the_step(run_dir: Path, async_save: bool) -> None:
    def lr_ratio(step: int, state: cg.TrainState) -> dict[str, Any]:
        return {"lr_ratio": 1 / (step - 2)}

    with cg.CheckpointManager(run_dir, async_save=async_save) as mgr:
        mgr.add_manifest_fields(lr_ratio)
        mgr.save(1, _state(1.0), force=True)
        with pytest.raises(ManifestFieldError) as ei:
            mgr.save(2, _state(2.0), force=True)
        assert mgr.save(3, _state(3.0), force=True)  # the provider works again: so do saves
        mgr.wait()
        assert [c.step for c in mgr.checkpoints()] == [1, 3]
    assert str(ei.value) == (
        "The manifest field provider test_a_provider_that_raises_fails_the_save_with_its_name_and_the_step.<locals>.lr_ratio "
        "(registered with add_manifest_fields) raised ZeroDivisionError: division by zero at step 2; step 2 was not "
        "saved (nothing was written; the checkpoints already committed are intact). Fix the provider and save again."
    )
    assert isinstance(ei.value.__cause__, ZeroDivisionError)


class Notifier:
    """A post-commit hook that fails at the steps it is told to."""

    def __init__(self, fail_at: set[int]) -> None:
        self.fail_at = fail_at
        self.seen: list[int] = []

    def __call__(self, manifest: dict[str, Any]) -> None:
        self.seen.append(manifest["step"])
        if manifest["step"] in self.fail_at:
            raise RuntimeError("the tracking server is down")


def test_a_failing_hook_in_a_sync_save_raises_saying_the_checkpoint_is_committed(run_dir: Path) -> None:
    notify = Notifier({2})
    after: list[int] = []
    with cg.CheckpointManager(run_dir, retention=cg.Retention(keep_last=1)) as mgr:
        mgr.add_post_commit_hook(notify)
        mgr.add_post_commit_hook(lambda m: after.append(m["step"]))
        mgr.save(1, _state(1.0), force=True)
        with pytest.raises(PostCommitError) as ei:
            mgr.save(2, _state(2.0), force=True)
        assert [c.step for c in mgr.checkpoints()] == [2]  # committed, and retention still ran
        assert mgr.save(3, _state(3.0), force=True)
    e = ei.value
    assert e.step == 2 and isinstance(e.__cause__, RuntimeError) and isinstance(e, cg.CheckpointError)
    assert str(e) == (
        f"Step 2 was committed to {run_dir / 'step-000000002'} (the checkpoint is intact and restorable), but the "
        "post-commit hook Notifier object failed after the commit: RuntimeError: the tracking server is down. Fix the hook "
        "(registered with add_post_commit_hook); later saves run it again."
    )
    assert after == [1, 2, 3]  # the hooks after the failing one ran too
    s = _state()
    assert cg.CheckpointManager(run_dir).restore(s, step=3) == 3


def test_a_failing_hook_in_an_async_save_surfaces_at_the_next_save_which_still_saves_its_step(run_dir: Path) -> None:
    notify = Notifier({1, 3})
    with cg.CheckpointManager(run_dir, async_save=True) as mgr:
        mgr.add_post_commit_hook(notify)
        assert mgr.save(1, _state(1.0), force=True)  # the hook fails in the background
        with pytest.raises(PostCommitError, match=r"^Step 1 was committed to .*step-000000001 \(the checkpoint is intact"):
            mgr.save(2, _state(2.0), force=True)
        mgr.wait()  # step 2 was saved by the call that raised; nothing more to report
        assert [c.step for c in mgr.checkpoints()] == [1, 2]
        mgr.save(3, _state(3.0), force=True)
        with pytest.raises(PostCommitError, match=r"^Step 3 was committed"):
            mgr.wait()
        mgr.save(4, _state(4.0), force=True)
        mgr.wait()
        assert [c.step for c in mgr.checkpoints()] == [1, 2, 3, 4] and notify.seen == [1, 2, 3, 4]
    s = _state()
    assert cg.CheckpointManager(run_dir).restore(s) == 4 and float(s.model.weight[0, 0]) == 4.0


def test_a_failing_hook_of_the_last_async_save_surfaces_at_close(run_dir: Path) -> None:
    mgr = cg.CheckpointManager(run_dir, async_save=True)
    mgr.add_post_commit_hook(Notifier({5}))
    mgr.save(5, _state(5.0), force=True)
    with pytest.raises(PostCommitError, match=r"^Step 5 was committed .* post-commit hook Notifier object failed"):
        mgr.close()
    assert [c.step for c in cg.CheckpointManager(run_dir).checkpoints()] == [5]


def test_a_failing_hook_surfaces_at_a_save_call_that_is_not_due(run_dir: Path) -> None:
    with cg.CheckpointManager(run_dir, every_steps=10, async_save=True) as mgr:
        mgr.add_post_commit_hook(Notifier({10}))
        for step in range(1, 11):
            mgr.save(step, _state())
        while mgr.pending:  # the background save of step 10 (and its hook) ends
            time.sleep(0.01)
        with pytest.raises(PostCommitError) as ei:
            mgr.save(11, _state())  # not due: nothing to save, the failure is reported
        assert ei.value.step == 10
        assert not mgr.save(12, _state())  # reported once


def test_every_hook_failure_of_one_commit_is_reported(run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    def broken_hook(manifest: dict[str, Any]) -> None:
        raise OSError("quota")

    with caplog.at_level(logging.ERROR), cg.CheckpointManager(run_dir) as mgr:
        mgr.add_post_commit_hook(broken_hook)
        mgr.add_post_commit_hook(Notifier({1}))
        with pytest.raises(PostCommitError, match=r"post-commit hook .*broken_hook failed after the commit: OSError: quota"):
            mgr.save(1, _state(), force=True)
    # the second failure of the same commit is logged, not lost
    assert any("post-commit hook Notifier object failed" in r.getMessage() for r in caplog.records)


# ---- the README's loop: its final forced save of a step the loop already saved -------------------


@pytest.mark.parametrize("async_save", [False, True])
def test_the_final_forced_save_of_a_step_already_saved_keeps_it_as_saved(run_dir: Path, async_save: bool) -> None:
    """Steps 1..20 with every_steps=5, then the README's ``mgr.save(step, state, force=True)``: step
    20 was saved by the loop (with its metrics, the best of keep_best); it is not written again."""
    with cg.CheckpointManager(run_dir, every_steps=5, async_save=async_save,
                              retention=cg.Retention(keep_last=1, keep_best=1, metric="val_loss")) as mgr:
        state = _state()
        for step in range(1, 21):
            mgr.save(step, state, metrics={"val_loss": 1.0 / step})
        before = (run_dir / "step-000000020" / "MANIFEST.json").read_bytes() if not async_save else None
        assert mgr.save(20, state, force=True) is False  # already saved (committed or in flight)
        mgr.wait()
        if before is not None:
            assert (run_dir / "step-000000020" / "MANIFEST.json").read_bytes() == before
        newest = mgr.checkpoints()[-1]
        assert (newest.step, newest.metrics) == (20, {"val_loss": 0.05})
    assert _steps(run_dir) == ["step-000000020"]


def test_a_forced_save_of_the_restored_step_writes_nothing_and_a_failed_save_is_retried(run_dir: Path) -> None:
    with cg.CheckpointManager(run_dir, every_steps=5) as mgr:
        mgr.save(5, _state(), metrics={"loss": 0.5})
    manifest = (run_dir / "step-000000005" / "MANIFEST.json").read_bytes()
    with cg.CheckpointManager(run_dir, every_steps=5) as mgr:
        state = _state(1.0)
        assert mgr.restore(state) == 5
        assert mgr.save(5, state, force=True) is False  # a finished run restarted: nothing to add
        assert (run_dir / "step-000000005" / "MANIFEST.json").read_bytes() == manifest
    from ckptguard.storage import LocalStorage
    from ckptguard.testing import FaultyStorage

    fs = FaultyStorage(LocalStorage(run_dir), fail_at=1, ops={"close"})
    with cg.CheckpointManager(fs, every_steps=5) as mgr:
        with pytest.raises(cg.CheckpointError):
            mgr.save(7, _state(), force=True)  # the disk fails its first write
        assert mgr.save(7, _state(), force=True) is True  # the step that failed is saved on retry
    assert _steps(run_dir) == ["step-000000005", "step-000000007"]


def test_a_bucket_that_does_not_exist_is_not_taken_for_a_fresh_run(s3_endpoint: str, s3_url: str) -> None:
    with cg.CheckpointManager("s3://no-such-bucket-ckptguard/run") as mgr:
        with pytest.raises(cg.CheckpointNotFoundError, match=r"the bucket 'no-such-bucket-ckptguard' does not exist\. Create it"):
            mgr.restore(_state())  # before any training: not a fresh start
        with pytest.raises(cg.CheckpointNotFoundError, match=r"bucket or a parent does not exist.*Create the bucket"):
            mgr.save(1, _state(), force=True)  # and a loop that skips restore hears it at its first save
    with cg.CheckpointManager(s3_url) as mgr:  # an existing bucket, an empty prefix: a fresh run
        assert mgr.restore(_state()) is None
