"""Ordinary-use cases an outside reviewer found after issue 12 (real tiny training, no mocks).

Gradient accumulation is the loop shape here: ``loss / ACCUM`` is back-propagated every batch,
the optimizer steps (and ``zero_grad``s) every ``ACCUM`` batches, and the user's step counter
counts batches, as in most hand-written loops.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ckptguard as cg
from ckptguard.errors import InvalidStepError

ACCUM, TOTAL = 4, 20


def _train(
    run_dir: Path, *, every: int, stop_at: int | None = None, rollback_at: int | None = None
) -> dict[str, torch.Tensor] | None:
    """Train TOTAL batches with accumulation; ``stop_at``: return as if killed after that batch;
    ``rollback_at``: at that batch call ``mgr.restore(state)`` in-process (what LossGuard does)
    and carry on."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    ds = TensorDataset(torch.randn(64, 4, generator=g), torch.randn(64, 1, generator=g))
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(ds, batch_size=4, sampler=cg.ResumableSampler(ds, shuffle=True, seed=0))
    state = cg.TrainState(model=model, optimizer=opt, dataloader=loader)
    mgr = cg.CheckpointManager(run_dir, every_steps=every)
    step = mgr.restore(state) or 0
    rolled = False
    while step < TOTAL:
        for x, y in loader:
            ((model(x) - y) ** 2).mean().div(ACCUM).backward()
            step += 1
            if step % ACCUM == 0:
                opt.step()
                opt.zero_grad()
            mgr.save(step, state)
            if step == stop_at:
                mgr.close()
                return None
            if step == rollback_at and not rolled:
                rolled = True
                step = mgr.restore(state) or 0
                break  # a fresh iterator continues from the restored position
            if step == TOTAL:
                break
    mgr.close()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rollback_in_process_mid_accumulation_equals_fresh_resume(tmp_path: Path) -> None:
    """Saves land on optimizer-step boundaries (every 8 batches, ACCUM 4). A restore in the same
    process 2 batches into an accumulation (a LossGuard rollback) must leave the model as a fresh
    process would have it: the abandoned batches' gradients must not leak into the next step."""
    reference = _train(tmp_path / "ref", every=8)
    assert reference is not None
    _train(tmp_path / "killed", every=8, stop_at=10)
    resumed = _train(tmp_path / "killed", every=8)
    assert resumed is not None and _same(reference, resumed)  # a fresh process is exact
    rolled = _train(tmp_path / "rolled", every=8, rollback_at=10)
    assert rolled is not None
    assert _same(reference, rolled), "stale .grad from the abandoned batches survived restore()"


@pytest.mark.xfail(
    strict=True,
    reason="Gradients are not part of a checkpoint: a save that lands mid-accumulation (every_steps "
    "not a multiple of the accumulation, or a preemption save) loses the accumulated .grad, so the "
    "resumed run differs. Capturing .grad always would double checkpoint size in the common loop "
    "(stale grads after step); needs a product decision (an opt-in, or saving only at boundaries).",
)
def test_save_mid_accumulation_resumes_exactly(tmp_path: Path) -> None:
    """every_steps=6 with ACCUM 4: the checkpoint at batch 6 holds half an accumulation."""
    reference = _train(tmp_path / "ref", every=6)
    _train(tmp_path / "run", every=6, stop_at=7)
    resumed = _train(tmp_path / "run", every=6)
    assert reference is not None and resumed is not None
    assert _same(reference, resumed)


def _train_with_extra(run_dir: Path, *, stop_at: int | None = None) -> tuple[torch.Tensor, dict, list]:
    """The loop keeps its own references into ``extra``: an EMA tensor, a dict of counters and a
    list of per-epoch values, updated in place (what users write)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = torch.zeros(4)
    counters = {"seen": 0, "per_class": torch.zeros(2, dtype=torch.long)}
    history: list[float] = []
    state = cg.TrainState(model=model, optimizer=opt, extra={"ema": ema, "counters": counters, "history": history})
    mgr = cg.CheckpointManager(run_dir, every_steps=5)
    step = mgr.restore(state) or 0
    while step < 12:
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        ema.mul_(0.9).add_(model.weight.detach()[0], alpha=0.1)
        counters["seen"] += 8
        counters["per_class"][step % 2] += 1
        history.append(round(float(ema.sum()), 6))
        step += 1
        mgr.save(step, state)
        if step == stop_at:
            mgr.close()
            return ema, counters, history
    mgr.close()
    assert state.extra["ema"] is ema and state.extra["counters"] is counters and state.extra["history"] is history
    return ema, counters, history


def test_extra_objects_the_loop_holds_survive_resume(tmp_path: Path) -> None:
    """After restore, the objects the loop holds must be the ones saved and restored (before:
    restore replaced them in ``extra``, so the loop updated orphans: the resumed EMA restarted
    from zeros and every later checkpoint saved the step-5 value)."""
    ema, counters, history = _train_with_extra(tmp_path / "ref")
    _train_with_extra(tmp_path / "run", stop_at=7)
    ema2, counters2, history2 = _train_with_extra(tmp_path / "run")
    assert torch.equal(ema, ema2)
    assert counters2["seen"] == counters["seen"] == 96
    assert torch.equal(counters2["per_class"], torch.tensor([6, 6]))
    assert history2 == history and len(history2) == 12


def test_extra_restore_replaces_what_cannot_be_kept(tmp_path: Path) -> None:
    """Keys the checkpoint lacks go, a tensor of another shape or dtype is replaced, a list of
    another length is refilled in place; every value equals the checkpoint's."""
    model = nn.Linear(2, 1)
    saved_extra = {"a": torch.arange(3.0), "b": torch.ones(2), "l": [1, 2, 3], "n": {"x": 1}}
    with cg.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, cg.TrainState(model=model, extra=saved_extra), force=True)
    a_live = torch.zeros(3)
    b_live = torch.zeros(2, dtype=torch.float64)
    l_live = [9]
    live = {"a": a_live, "b": b_live, "l": l_live, "n": {"x": 5, "y": 6}, "gone": 1}
    with cg.CheckpointManager(tmp_path / "run") as mgr:
        assert mgr.restore(cg.TrainState(model=nn.Linear(2, 1), extra=live)) == 1
    assert sorted(live) == ["a", "b", "l", "n"]
    assert live["a"] is a_live and torch.equal(a_live, torch.arange(3.0))
    assert live["b"] is not b_live and live["b"].dtype == torch.float32 and torch.equal(live["b"], torch.ones(2))
    assert live["l"] is l_live and l_live == [1, 2, 3]
    assert live["n"] == {"x": 1}


def test_auto_restart_after_explicit_rollback_stays_on_the_new_branch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    state = cg.TrainState(model=model, extra={"branch": "A"})
    with cg.CheckpointManager(tmp_path / "run", every_steps=10) as mgr:
        for s in range(1, 51):
            mgr.save(s, state, metrics={"loss": 1.0})
    # The user saw the loss diverge after 30, rolls back, changes something and trains on.
    with cg.CheckpointManager(tmp_path / "run", every_steps=10) as mgr:
        assert mgr.restore(state, step=30) == 30
        state.extra["branch"] = "B"
        for s in range(31, 46):
            mgr.save(s, state, metrics={"loss": 2.0})
    # Killed at 45; the spot fleet restarts the script, which calls restore() as the README shows.
    again = cg.TrainState(model=nn.Linear(2, 1), extra={"branch": "?"})
    with cg.CheckpointManager(tmp_path / "run", every_steps=10) as mgr:
        step = mgr.restore(again)
    assert (step, again.extra["branch"]) == (40, "B")
    status = json.loads((tmp_path / "run" / "step-000000050" / "STATUS.json").read_text())
    assert status["status"] == "superseded" and "rolled back to step 30" in status["detail"]
    assert not (tmp_path / "run" / "step-000000040" / "STATUS.json").exists()  # re-saved on branch B
    with cg.CheckpointManager(tmp_path / "run") as mgr:  # going back on purpose still works
        assert mgr.restore(again, step=50) == 50 and again.extra["branch"] == "A"


def _config(weight_1: float) -> dict:
    """A config users write: class weights keyed by class id beside a named default, pair
    weights keyed by tuples, a dataclass-free nested dict."""
    return {
        "lr": 0.1,
        "class_weights": {0: 1.0, 1: weight_1, "default": 1.0},
        "pair_weights": {(0, 1): 0.5, (1, 0): 0.25},
    }


def test_config_with_mixed_and_tuple_keys_saves_and_reports_drift(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before: the first save raised a bare TypeError from json ('<' not supported between
    'str' and 'int' / keys must be str...) out of the training loop."""
    model = nn.Linear(2, 1)
    with cg.CheckpointManager(tmp_path / "run") as mgr:
        assert mgr.save(1, cg.TrainState(model=model, config=_config(2.0)), force=True)
    yaml_text = (tmp_path / "run" / "step-000000001" / "config.yaml").read_text()
    assert "(0, 1): 0.5" in yaml_text and "default: 1.0" in yaml_text and "'1': 2.0" in yaml_text
    with cg.CheckpointManager(tmp_path / "run") as mgr, caplog.at_level("WARNING", logger="ckptguard"):
        assert mgr.restore(cg.TrainState(model=nn.Linear(2, 1), config=_config(2.0))) == 1
        assert not [r for r in caplog.records if "config" in r.getMessage().lower()]
        assert mgr.restore(cg.TrainState(model=nn.Linear(2, 1), config=_config(3.0))) == 1
    drift = [r.getMessage() for r in caplog.records if "class_weights.1" in r.getMessage()]
    assert len(drift) == 1 and "2.0" in drift[0] and "3.0" in drift[0]


@pytest.mark.parametrize(
    ("given", "saved"),
    [(5, 5), (5.0, 5), (torch.tensor(5), 5), (__import__("numpy").int64(5), 5)],
    ids=["int", "whole-float", "tensor", "numpy"],
)
def test_save_accepts_the_step_numbers_loops_compute(tmp_path: Path, given: object, saved: int) -> None:
    """``step = epoch * len(loader) / accum`` is a float; before, 5.0 raised a bare ValueError
    ("Unknown format code 'd'") out of save()."""
    with cg.CheckpointManager(tmp_path / "run", every_steps=5) as mgr:
        assert mgr.save(given, cg.TrainState(model=nn.Linear(1, 1)), metrics={"loss": 1.0}) is True  # type: ignore[arg-type]
    assert (tmp_path / "run" / "step-000000005" / "MANIFEST.json").is_file()
    with cg.CheckpointManager(tmp_path / "run") as mgr:
        assert mgr.restore(cg.TrainState(model=nn.Linear(1, 1))) == saved


@pytest.mark.parametrize("bad", [-1, 2.5, True, "5", None], ids=["negative", "fraction", "bool", "str", "none"])
def test_save_refuses_a_step_that_cannot_name_a_checkpoint(tmp_path: Path, bad: object) -> None:
    """Before: step=-1 committed 'step--00000001', save returned True, and restore() then
    returned None (a fresh run) with that checkpoint on disk; step=True silently saved nothing."""
    run = tmp_path / "run"
    with cg.CheckpointManager(run) as mgr:
        with pytest.raises(InvalidStepError, match=r"must be a whole number >= 0.*int\(step\)\. Nothing was saved") as ei:
            mgr.save(bad, cg.TrainState(model=nn.Linear(1, 1)), metrics={"loss": 1.0}, force=True)  # type: ignore[arg-type]
        assert str(run) in str(ei.value) and isinstance(ei.value, ValueError)
    assert not run.exists() or not [p.name for p in run.iterdir() if p.name.startswith("step-")]
    assert not (run / "metrics.csv").exists()


def _count_labels(run_dir: Path, *, stop_at: int | None = None) -> dict[int, int]:
    """Per-label counts in a defaultdict inside extra, updated with ``+=`` on new keys."""
    import collections

    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    counts: collections.defaultdict[int, int] = collections.defaultdict(int)
    state = cg.TrainState(model=model, extra={"label_counts": counts})
    with cg.CheckpointManager(run_dir, every_steps=3) as mgr:
        step = mgr.restore(state) or 0
        while step < 10:
            step += 1
            counts[step % 4] += 1  # label 3 first appears at step 3
            mgr.save(step, state)
            if step == stop_at:
                return dict(counts)
    assert state.extra["label_counts"] is counts
    return dict(counts)


def test_defaultdict_in_extra_stays_a_defaultdict(tmp_path: Path) -> None:
    """Before: restore put a plain dict in its place, so the loop's defaultdict counted into an
    orphan and every later checkpoint saved the restored counts (and code reading
    ``state.extra["label_counts"][new_label]`` got a KeyError)."""
    reference = _count_labels(tmp_path / "ref")
    assert reference == {1: 3, 2: 3, 3: 2, 0: 2}
    _count_labels(tmp_path / "run", stop_at=4)  # saved at 3: labels 1, 2, 3 seen, 0 not yet
    assert _count_labels(tmp_path / "run") == reference


@pytest.mark.xfail(
    strict=True,
    reason="numpy scalars in extra are stored as JSON numbers and come back as python float/int: "
    "np.float32 arithmetic (NumPy 2 keeps float32 for float32 * python float) becomes float64 "
    "after a resume, so a running average in extra is not bit-exact. Needs a codec tag for numpy "
    "scalars (a format change: older readers would refuse it).",
)
def test_numpy_float32_in_extra_keeps_its_type(tmp_path: Path) -> None:
    import numpy as np

    with cg.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, cg.TrainState(model=nn.Linear(1, 1), extra={"ema_loss": np.float32(0.9)}), force=True)
    extra: dict = {}
    with cg.CheckpointManager(tmp_path / "run") as mgr:
        mgr.restore(cg.TrainState(model=nn.Linear(1, 1), extra=extra))
    assert type(extra["ema_loss"]) is np.float32 and extra["ema_loss"] == np.float32(0.9)


@pytest.mark.xfail(
    strict=True,
    reason="After restore(step=15) with 20 and 40 on disk, the abandoned 40 is marked superseded "
    "(a plain restore() skips it) but retention still counts it as the 'newest valid', so "
    "`ckptguard prune` (which does not know the live session's 'just saved') deletes 35, the "
    "newest checkpoint of the branch the run is on, while it keeps 40. Whether retention may "
    "delete a superseded continuation is a product decision left open.",
)
def test_prune_after_rollback_keeps_the_live_branch_newest(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    state = cg.TrainState(model=nn.Linear(2, 2))
    retention = cg.Retention(keep_last=1)
    with cg.CheckpointManager(run, every_steps=5, retention=retention) as mgr:
        for s in range(1, 41):
            mgr.save(s, state)
            if s == 15:
                mgr.pin(15)  # a good one the user wants to come back to
    with cg.CheckpointManager(run, every_steps=5, retention=retention) as mgr:
        assert mgr.restore(state, step=15) == 15
        for s in range(16, 38):
            mgr.save(s, state)
        assert [c.step for c in mgr.checkpoints()] == [15, 35, 40]
    cli = [sys.executable, "-m", "ckptguard", "prune", str(run), "--dry-run", "--json"]
    out = subprocess.run(cli, capture_output=True, text=True, timeout=300, env=dict(os.environ), check=False)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    rows = doc.get("decisions") or doc.get("checkpoints") or []
    assert {r["step"] for r in rows} == {15, 35, 40}
    assert next(r for r in rows if r["step"] == 35)["keep"] is True


def _log_samples(run_dir: Path, *, stop_at: int | None = None) -> None:
    """A loop that logs its own 'step' (samples seen, as some trackers name it) and an elapsed
    'wall_time' beside the loss."""
    state = cg.TrainState(model=nn.Linear(1, 1))
    with cg.CheckpointManager(run_dir, every_steps=3) as mgr:
        step = mgr.restore(state) or 0
        while step < 10:
            step += 1
            mgr.save(step, state, metrics={"loss": 1.0 / step, "step": 32 * step, "wall_time": 0.5 * step})
            if step == stop_at:
                return  # killed after logging past the checkpoint at 6


def test_metric_named_step_does_not_rewrite_the_history(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Before: the user's 'step' replaced the row's step (32, 64, ...), so metrics.csv no longer
    said which step a row belongs to and the crash recovery (rows past the restored step are
    superseded) dropped the wrong rows."""
    import csv

    run = tmp_path / "run"
    with caplog.at_level("WARNING", logger="ckptguard"):
        _log_samples(run, stop_at=7)
    assert sum("'metric_step'" in r.getMessage() for r in caplog.records) == 1
    _log_samples(run)
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 11))
    assert [int(r["metric_step"]) for r in rows] == [32 * s for s in range(1, 11)]
    assert [float(r["metric_wall_time"]) for r in rows] == [0.5 * s for s in range(1, 11)]
    assert all(float(r["wall_time"]) > 1e9 for r in rows)  # the run's own clock


@pytest.mark.xfail(
    strict=True,
    reason="restore() makes extra equal the checkpoint's, so a key today's code added to "
    "extra (with its default) is deleted when resuming an older checkpoint and the loop's "
    "`extra['tokens_seen'] += n` raises KeyError. Keeping today's defaults conflicts with an "
    "in-process rollback (a key added after the checkpoint should go): a product decision "
    "(keep + warn at top level, or a strict/warn choice as for model keys).",
)
def test_key_added_to_extra_by_new_code_survives_resume_of_an_old_checkpoint(tmp_path: Path) -> None:
    with cg.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, cg.TrainState(model=nn.Linear(1, 1), extra={"epoch": 3}), force=True)
    extra = {"epoch": 0, "tokens_seen": 0}  # today's code counts tokens too
    with cg.CheckpointManager(tmp_path / "run") as mgr:
        assert mgr.restore(cg.TrainState(model=nn.Linear(1, 1), extra=extra)) == 1
    extra["tokens_seen"] += 128
    assert extra == {"epoch": 3, "tokens_seen": 128}
