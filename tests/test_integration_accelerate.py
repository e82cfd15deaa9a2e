"""The Accelerate integration (ckptguard.integrations.accelerate) against the real Accelerator.

A tiny MLP with dropout trains 32 steps on CPU in tests/frameworks/accelerate_train.py
(``maybe_save_state`` every 3 steps, ``Retention(keep_last=2)``), resuming through
``accelerator.load_state()`` and ``accelerator.skip_first_batches``. Runs SIGKILLed at seeded random
moments (a storage operation inside a save, then mid-epoch) must end bit-identical to an
uninterrupted run. The stock Accelerator (``total_limit=2``) is measured in the same scenarios.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import FULL
from framework_runs import assert_identical, cli, flip_last_byte, hostile_pickle, max_diff, run_script, sampled, steps

pytest.importorskip("accelerate")
pytestmark = [pytest.mark.xdist_group("accelerate")]

SCRIPT = Path(__file__).parent / "frameworks" / "accelerate_train.py"
TOTAL, BATCH, EVERY = 32, 4, 3
SEED = int(os.environ.get("CKPTGUARD_TEST_SEED", "17"))
_rng = random.Random(SEED + 1)
KILL_OPS = [_rng.randint(1, 200) for _ in range(4)]  # SIGKILL at this storage operation of a save (~214 in a run)
KILL_STEPS = [_rng.randint(4, TOTAL) for _ in range(4)]  # then at the start of this step


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    d = tmp_path_factory.mktemp("acc-ref")
    info = train(d / "run", d / "final.safetensors")
    assert info["step"] == TOTAL and info["reads"] == TOTAL * BATCH and info["resumed_from"] is None
    return d / "run", d / "final.safetensors", info


@pytest.mark.parametrize("case", sampled(list(zip(KILL_OPS, KILL_STEPS))))
def test_sigkill_inside_a_save_then_mid_epoch_resumes_bit_identical(tmp_path: Path, reference: Any, case: tuple[int, int]) -> None:
    kill_op, kill_step = case
    run = tmp_path / "run"
    train(run, tmp_path / "x", "--kill-op", str(kill_op), expect=-9)
    committed = steps(run)
    first = committed[-1] if committed else None
    assert len(committed) == min(2, len([s for s in range(EVERY, TOTAL + 1, EVERY) if s <= (first or 0)])), "a save deleted before committing"
    train(run, tmp_path / "y", "--kill-step", str(max(kill_step, (first or 0) + 2)), expect=-9)
    last = steps(run)[-1] if steps(run) else None
    info = train(run, tmp_path / "final.safetensors")
    assert info["resumed_from"] == last and info["step"] == TOTAL
    assert info["reads"] == (TOTAL - (last or 0)) * BATCH  # skip_first_batches skips indices: nothing read twice
    assert info["losses"] == reference[2]["losses"][(last or 0):]
    assert_identical(tmp_path / "final.safetensors", reference[1])
    assert cli("verify", str(run)).returncode == 0


def plant_hostile(run: Path, marker: Path) -> None:
    """Accelerate-layout and stray pickles where a careless resume would load them."""
    payload = hostile_pickle(marker)
    acc = run / "checkpoints" / "checkpoint_99"  # what Accelerate's load_state() would pick
    acc.mkdir(parents=True)
    for name in ("random_states_0.pkl", "custom_checkpoint_0.pkl", "optimizer.bin", "scheduler.bin", "pytorch_model.bin"):
        (acc / name).write_bytes(payload)
    for d in [p for p in run.iterdir() if p.name.startswith("step-")]:
        (d / "random_states_0.pkl").write_bytes(payload)
        (d / "optimizer.bin").write_bytes(payload)


def test_sigterm_save_then_corrupt_newest_falls_back_and_no_pickle_is_loaded(tmp_path: Path, reference: Any) -> None:
    run, marker = tmp_path / "run", tmp_path / "PICKLE-WAS-LOADED"
    train(run, tmp_path / "x", "--sigterm-step", "10", expect=128 + 15)
    assert steps(run) == [9, 10]  # 10: the SIGTERM save (not a multiple of every_steps)
    train(run, tmp_path / "y", "--kill-step", "20", expect=-9)
    assert steps(run) == [10, 15, 18]  # keep_last=2, and the step it resumed from
    flip_last_byte(run / "step-000000018" / "model.safetensors")
    plant_hostile(run, marker)
    bad = cli("verify", str(run), expect=None)
    assert bad.returncode != 0 and "step-000000018" in bad.stdout + bad.stderr
    info = train(run, tmp_path / "final.safetensors")
    assert info["resumed_from"] == 15, "the corrupt step 18 must be skipped"
    assert info["reads"] == (TOTAL - 15) * BATCH
    assert_identical(tmp_path / "final.safetensors", reference[1])
    assert not marker.exists(), "a pickle from the run directory was loaded"


def test_load_state_by_path_and_refusals(tmp_path: Path, reference: Any) -> None:
    from torch import nn

    from ckptguard.errors import CheckpointError
    from ckptguard.integrations.accelerate import CkptguardAccelerator

    run, marker = tmp_path / "run", tmp_path / "PICKLE-WAS-LOADED"
    shutil.copytree(reference[0], run)
    plant_hostile(run, marker)
    acc = CkptguardAccelerator(cpu=True, checkpoint_dir=str(run))
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=10)
    model, opt, sched = acc.prepare(model, opt, sched)
    with pytest.raises(CheckpointError, match="not a ckptguard checkpoint"):
        acc.load_state(str(run / "checkpoints" / "checkpoint_99"))
    with pytest.raises(CheckpointError, match="save_state\\(step=N\\)"):
        acc.save_state("somewhere")
    assert acc.load_state(str(run / "step-000000030")) == 30
    assert acc.load_state() == 32
    final = load_file(str(reference[1]))
    assert all(torch.equal(v, final[k]) for k, v in acc.unwrap_model(model).state_dict().items())
    assert not marker.exists()
    acc.end_training()


def test_cli_on_an_integration_run(tmp_path: Path, reference: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from ckptguard.cli import main

    def in_process(*args: str) -> tuple[int, str]:
        """The commands that import torch run here, where it is loaded already."""
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out + out.err

    run = reference[0]
    listed = json.loads(cli("ls", str(run), "--json").stdout)["checkpoints"]
    assert [r["step"] for r in listed] == [30, 32] and all(r["valid"] for r in listed)
    assert listed[-1]["metrics"]["loss"] == pytest.approx(reference[2]["losses"][-1])
    assert cli("verify", str(run)).returncode == 0
    assert in_process("plot", str(run), "-o", str(tmp_path / "loss.png"))[0] == 0
    assert (tmp_path / "loss.png").stat().st_size > 0
    code, text = in_process("doctor", str(run / "step-000000032"), "--model", f"{SCRIPT}:doctor_factory")
    assert code == 0, text


def test_stock_accelerator_side_by_side(tmp_path: Path, reference: Any) -> None:
    """The stock Accelerator in the same scenarios (the numbers are printed: -s shows them)."""
    seen: dict[str, Any] = {}
    # 1. SIGKILL inside its 4th save_state: total_limit deleted the oldest folder before writing.
    run = tmp_path / "plain"
    train(run, tmp_path / "x", "--mode", "plain", "--kill-op", "4", expect=-9)
    folders = sorted(os.listdir(run / "checkpoints"))
    seen["kill_in_save.folders"] = {f: len(os.listdir(run / "checkpoints" / f)) for f in folders}
    seen["kill_in_save.complete_left"] = sum(1 for f in folders if (run / "checkpoints" / f / "model.safetensors").exists())
    r = train(run, tmp_path / "p1", "--mode", "plain", expect=3)
    seen["kill_in_save.load_state"] = r["failed"][:160]
    assert seen["kill_in_save.complete_left"] == 1  # total_limit=2, one already deleted
    if FULL:
        # 2. Corrupt newest (a flipped byte in the weights' data): loaded silently, no fallback.
        run = tmp_path / "plain2"
        train(run, tmp_path / "x2", "--mode", "plain", "--kill-step", "20", expect=-9)
        newest = sorted(os.listdir(run / "checkpoints"), key=lambda f: int(f.split("_")[1]))[-1]
        flip_last_byte(run / "checkpoints" / newest / "model.safetensors")
        train(run, tmp_path / "p2.safetensors", "--mode", "plain")
        seen["corrupt_newest.loaded"] = newest
        seen["corrupt_newest.final_max_abs_diff"] = max_diff(tmp_path / "p2.safetensors", reference[1])
        # 3. The stock mid-epoch resume, no damage: how far from an uninterrupted stock run?
        ref, run = tmp_path / "plainref", tmp_path / "plain3"
        train(ref, tmp_path / "r3.safetensors", "--mode", "plain")
        train(run, tmp_path / "x3", "--mode", "plain", "--kill-step", "20", expect=-9)
        train(run, tmp_path / "p3.safetensors", "--mode", "plain")
        seen["mid_epoch_resume.final_max_abs_diff"] = max_diff(tmp_path / "p3.safetensors", tmp_path / "r3.safetensors")
    print("\nSTOCK-ACCELERATE " + json.dumps(seen, indent=1))


def train(out: Path, result: Path, *args: str, expect: int | None = 0) -> dict[str, Any]:
    return run_script(SCRIPT, out, result, *args, expect=expect)
