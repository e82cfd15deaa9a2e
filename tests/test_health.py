"""LossGuard: non-finite and spiking losses roll the run back and skip the bad data."""

from __future__ import annotations

import collections
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import ckptguard as cg
import trainlib
from ckptguard.errors import TrainingDivergedError
from ckptguard.verification.health import zscore

CHILD = str(Path(__file__).parent / "policy_child.py")


def test_zscore_and_trip_rules(run_dir: Path) -> None:
    assert zscore(3.0, collections.deque([1.0, 2.0, 3.0, 2.0])) == pytest.approx(1.4142, abs=1e-3)
    mgr = cg.CheckpointManager(run_dir)
    g = cg.LossGuard(mgr, window=5, z_threshold=4.0, min_history=3)
    assert not g.check(1, 1.0) and not g.check(2, 1.1)
    assert not g.check(3, 50.0)  # too little history for a spike
    assert g.check(4, float("inf")) and g.pending and g.pending.why == "non-finite"
    g.pending = None
    for i, v in enumerate([1.0, 1.1, 0.9, 1.0], start=5):
        assert not g.check(i, v, grad_norm=2.0)
    assert g.check(9, 1.0, grad_norm=float("nan")) and g.pending.kind == "grad_norm"
    g.pending = None
    assert g.check(10, torch.tensor(100.0)) and g.pending.why.startswith("spike z=")
    with pytest.raises(ValueError):
        cg.LossGuard(mgr, window=1)
    mgr.close()


def test_sampler_skip_moves_the_resume_position_across_epochs() -> None:
    s = cg.ResumableSampler(10, shuffle=True, seed=3)
    ref = cg.ResumableSampler(10, shuffle=True, seed=3)
    stream = list(ref) + list(ref)
    s.skip(13)
    assert (s.epoch, s.position) == (1, 3)
    assert list(s) == stream[13:20]


def train(run: Path, total: int, *, inject: str | None = None, inject_at: int = 0, every: int = 5,
          max_retries: int = 2) -> dict[str, Any]:
    """The trainlib loop with a LossGuard; records the first sample of the batch of every step."""
    s = trainlib.make_setup()
    state, loader = s["state"], s["loader"]
    mgr = cg.CheckpointManager(run, every_steps=every)
    guard = cg.LossGuard(mgr, window=8, z_threshold=6.0, max_retries=max_retries, recover_steps=4)
    step = mgr.restore(state) or 0
    fed: dict[int, torch.Tensor] = {}
    injected = False
    try:
        while step < total:
            rolled = False
            for xb, yb in loader:
                if inject and step + 1 == inject_at and (not injected or inject == "nan-always"):
                    injected = True
                    if inject.startswith("nan"):
                        xb = xb * float("nan")
                    else:  # a spike: confidently wrong on scaled inputs
                        xb, yb = xb * 100, 1 - yb
                fed[step + 1] = xb[0].clone()
                loss = trainlib.train_step(s, xb, yb)
                step += 1
                if guard.check(step, loss):
                    step = guard.rollback(state)
                    rolled = True
                    break
                mgr.save(step, state, metrics={"loss": loss})
                if step >= total:
                    break
            if not rolled:
                state.extra["epoch"] += 1
        mgr.save(step, state, force=True)
    finally:
        mgr.close()
    return {"fed": fed, "guard": guard, "weights": s["model"].state_dict()}


@pytest.mark.parametrize("kind", ["nan", "spike"])
def test_injected_fault_rolls_back_and_skips_the_window(tmp_path: Path, kind: str) -> None:
    clean = train(tmp_path / "clean", 30)
    hurt = train(tmp_path / "hurt", 30, inject=kind, inject_at=13)
    trips = hurt["guard"].trips
    assert len(trips) == 1 and trips[0].step == 13 and trips[0].restored_step == 10
    assert trips[0].why == "non-finite" if kind == "nan" else trips[0].why.startswith("spike")
    assert trips[0].skipped_samples == 3 * 8  # steps 11..13, batch size 8
    # after the rollback, step 11 is fed what the clean run fed at step 14: the window is skipped
    assert torch.equal(hurt["fed"][11], clean["fed"][14])
    assert all(torch.isfinite(v).all() for v in hurt["weights"].values())
    last = json.loads((tmp_path / "hurt" / "step-000000030" / "MANIFEST.json").read_text())
    assert last["loss_guard"]["trips"][0]["step"] == 13


def test_persistent_divergence_raises_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TrainingDivergedError) as e:
        train(tmp_path / "run", 30, inject="nan-always", inject_at=13, max_retries=2)
    msg = str(e.value)
    assert "step 13" in msg and "nan" in msg and "after 2 rollback(s)" in msg and "learning rate" in msg


def test_no_checkpoint_to_roll_back_to(tmp_path: Path) -> None:
    with pytest.raises(TrainingDivergedError, match="no valid checkpoint before it"):
        train(tmp_path / "run", 10, inject="nan", inject_at=3)


def test_nan_in_a_real_child_process(tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    proc = subprocess.run(
        [sys.executable, CHILD, str(tmp_path / "run"), "--total", "30", "--loss-guard",
         "--inject", "nan", "--inject-at", "17", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ROLLBACK 17 -> 15" in proc.stdout
    assert "rolled back from step 17 to 15" in proc.stderr
    w = load_file(str(out))
    assert all(math.isfinite(float(v.abs().max())) for v in w.values())
