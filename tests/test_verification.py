"""Behavioural verification: probe frozen at the first save, output hash in the manifest, every
checkpoint loaded back from storage into a CPU copy and checked; failures never restored."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import ckptguard as cg
from ckptguard.storage import open_storage
from ckptguard.verification.probe import PROBE_FILE, load_probe, run_probe, summarize
from trainlib import run_training, same_weights

PROBE = torch.randn(16, 8, generator=torch.Generator().manual_seed(7))


def manifest(run: Path, step: int) -> dict[str, Any]:
    return json.loads((run / f"step-{step:09d}" / "MANIFEST.json").read_text())


def status(run: Path, step: int) -> dict[str, Any]:
    return json.loads((run / f"step-{step:09d}" / "STATUS.json").read_text())


def test_saves_are_verified_and_probe_recorded(run_dir: Path, async_save: bool) -> None:
    run_training(run_dir, 15, every_steps=5, async_save=async_save, manager_kwargs={"probe": PROBE})
    frozen = load_probe(open_storage(run_dir))
    assert frozen is not None and torch.equal(frozen[1]["input"], PROBE)
    for step in (5, 10, 15):
        rec = manifest(run_dir, step)["probe"]
        assert rec["outputs"] == [{"name": "out", "dtype": "F32", "shape": [16, 2]}]
        assert len(rec["hash"]) == 32 and rec["std"] > 0 and rec["max_abs"] >= abs(rec["mean"])
        assert status(run_dir, step)["status"] == "verified"
    assert manifest(run_dir, 10)["probe"]["drift"]["from_step"] == 5
    assert [c.status for c in cg.CheckpointManager(run_dir, lock=False).checkpoints()] == ["verified"] * 3


def test_recorded_hash_is_the_models_output_hash(run_dir: Path) -> None:
    from trainlib import make_setup

    run_training(run_dir, 5, every_steps=5, manager_kwargs={"probe": PROBE})
    s = make_setup()
    mgr = cg.CheckpointManager(run_dir, lock=False)
    mgr.restore(s["state"])
    mgr.close()
    assert summarize(run_probe(s["model"], ("tensor", {"input": PROBE})))["hash"] == manifest(run_dir, 5)["probe"]["hash"]


def test_exact_resume_is_bit_identical_with_probe(tmp_path: Path, async_save: bool) -> None:
    kw = {"probe": PROBE, "drift_epsilon": 10.0}
    straight = run_training(tmp_path / "a", 25, every_steps=5, async_save=async_save, manager_kwargs=kw)
    run_training(tmp_path / "b", 25, stop_at=13, every_steps=5, async_save=async_save, manager_kwargs=kw)
    resumed = run_training(tmp_path / "b", 25, every_steps=5, async_save=async_save, manager_kwargs=kw)
    assert same_weights(straight, resumed)  # the probe forward (dropout model) took no RNG draw


def test_probe_leaves_training_rng_alone(run_dir: Path) -> None:
    from trainlib import make_setup

    s = make_setup()
    mgr = cg.CheckpointManager(run_dir, probe=lambda: torch.randn(4, 8))
    before = torch.get_rng_state()
    mgr.save(1, s["state"], force=True)
    mgr.close()
    assert torch.equal(before, torch.get_rng_state())


class LeakyBuffer(nn.Module):
    """A planted bug: state the forward uses but the checkpoint does not hold."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 2)
        self.register_buffer("temperature", torch.ones(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) / self.temperature


def test_mismatch_marks_failed_calls_back_and_restore_skips_it(run_dir: Path, async_save: bool, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = LeakyBuffer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = cg.TrainState(model=model, optimizer=opt)
    failures: list[dict[str, Any]] = []
    mgr = cg.CheckpointManager(run_dir, probe=PROBE, async_save=async_save, on_verification_failure=failures.append)
    with caplog.at_level(logging.ERROR, logger="ckptguard.verification.behaviour"):
        for step in (1, 2, 3):
            loss = F.cross_entropy(model(PROBE), torch.zeros(16, dtype=torch.long))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step == 2:
                model.temperature.fill_(2.0)  # changes behaviour; the checkpoint cannot carry it
            mgr.save(step, state, force=True)
        mgr.close()
    assert sum("FAILED verification" in r.message for r in caplog.records) == 2
    assert [r.status for r in mgr.verifier.results] == ["verified", "failed", "failed"]
    assert [f["step"] for f in failures] == [2, 3] and "different output on the probe" in failures[0]["detail"]
    assert status(run_dir, 2)["status"] == "failed"
    fresh = LeakyBuffer()
    mgr2 = cg.CheckpointManager(run_dir, lock=False)
    assert mgr2.restore(cg.TrainState(model=fresh)) == 1  # never a failed one
    mgr2.close()


def test_corruption_after_commit_is_found_by_reverification(run_dir: Path) -> None:
    from trainlib import make_setup

    s = make_setup()
    mgr = cg.CheckpointManager(run_dir, probe=PROBE)
    mgr.save(5, s["state"], force=True)
    result = mgr.verifier.verify(manifest(run_dir, 5))
    assert result.status == "verified"
    path = run_dir / "step-000000005" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    result = mgr.verifier.verify(manifest(run_dir, 5))
    mgr.close()
    assert result.status == "corrupt" and status(run_dir, 5)["status"] == "corrupt"


def test_drift_above_epsilon_is_reported(run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ckptguard.verification.behaviour"):
        run_training(run_dir, 10, every_steps=5, manager_kwargs={"probe": PROBE, "drift_epsilon": 1e-6})
    drift = manifest(run_dir, 10)["probe"]["drift"]
    assert drift["exceeded"] and drift["rel_change"] > 1e-6 and drift["epsilon"] == 1e-6
    assert any("drifted" in r.message for r in caplog.records)
    with pytest.raises(ValueError):
        cg.CheckpointManager(run_dir / "x", probe=PROBE, drift_epsilon=-1.0)


class KwNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"sum": self.a(x) + self.b(y), "aux": (self.a(x),)}


def test_dict_and_tuple_probes_and_frozen_file_wins(run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = KwNet()
    state = cg.TrainState(model=model)
    with cg.CheckpointManager(run_dir, probe=lambda: {"x": torch.randn(5, 4), "y": torch.randn(5, 2)}) as mgr:
        mgr.save(1, state, force=True)
    rec = manifest(run_dir, 1)["probe"]
    assert [o["name"] for o in rec["outputs"]] == ["out.aux.0", "out.sum"]
    assert status(run_dir, 1)["status"] == "verified"
    frozen = (run_dir / PROBE_FILE).read_bytes()
    with caplog.at_level(logging.WARNING), cg.CheckpointManager(run_dir, probe={"x": torch.zeros(5, 4), "y": torch.zeros(5, 2)}) as mgr:
        mgr.save(2, state, force=True)
    assert (run_dir / PROBE_FILE).read_bytes() == frozen and any("ignored" in r.message for r in caplog.records)
    assert manifest(run_dir, 2)["probe"]["hash"] == rec["hash"]  # same weights, same frozen batch
    with cg.CheckpointManager(run_dir / "t", probe=(torch.randn(5, 4), torch.randn(5, 2))) as mgr:
        mgr.save(1, state, force=True)
    assert status(run_dir / "t", 1)["status"] == "verified"
    with pytest.raises(cg.UnsupportedStateError), cg.CheckpointManager(run_dir / "bad", probe="not a tensor") as mgr:
        mgr.save(1, state, force=True)


def test_probe_that_does_not_fit_the_model_is_a_clear_error(run_dir: Path) -> None:
    state = cg.TrainState(model=nn.Linear(8, 2))
    mgr = cg.CheckpointManager(run_dir, probe=torch.zeros(3, 5))
    with pytest.raises(cg.UnsupportedStateError, match="does not run through the model"):
        mgr.save(1, state, force=True)
    mgr.close()
    assert not (run_dir / "step-000000001").exists() and not (run_dir / PROBE_FILE).exists()


def test_compare_probe_exact_on_one_device_tolerant_across_devices() -> None:
    from ckptguard.verification.probe import compare_probe

    out = [("out", torch.linspace(-1, 1, 32).reshape(4, 8))]
    ref = summarize(out, device="cpu")
    nudged = summarize([("out", out[0][1] * (1 + 1e-6))], device="cpu")
    assert compare_probe(ref, ref)[0]
    assert not compare_probe(ref, nudged)[0]  # same device type: bit-identical or failed
    assert compare_probe({**ref, "device": "cuda:0"}, nudged)[0]  # GPU vs CPU: within tolerance
    far = summarize([("out", out[0][1] * 1.1)], device="cpu")
    ok, why = compare_probe({**ref, "device": "cuda:0"}, far)
    assert not ok and "differ" in why
    assert not compare_probe({**ref, "mean": "junk", "device": "cuda:0"}, far)[0]  # untrusted manifest


def test_background_verification_leaves_the_training_rng_alone(run_dir: Path) -> None:
    """The async verifier runs beside training: it must not fork or seed the (global) RNG."""
    import threading

    from trainlib import make_setup

    s = make_setup()
    mgr = cg.CheckpointManager(run_dir, probe=PROBE)
    mgr.save(5, s["state"], force=True)
    m = manifest(run_dir, 5)
    torch.manual_seed(1)
    expected = [torch.rand(1).item() for _ in range(20000)]
    stop, runs = threading.Event(), []

    def verify_in_background() -> None:
        while not stop.is_set():
            runs.append(mgr.verifier.verify(m).status)

    t = threading.Thread(target=verify_in_background)
    t.start()
    while not runs:
        pass
    torch.manual_seed(1)
    got = [torch.rand(1).item() for _ in range(20000)]
    stop.set()
    t.join()
    mgr.close()
    assert set(runs) == {"verified"} and len(runs) > 1
    assert got == expected
