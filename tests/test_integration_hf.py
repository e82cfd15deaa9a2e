"""The Hugging Face Trainer integration (ckptguard.integrations.hf) against the real Trainer.

A tiny GPT-2 (1 layer, vocab 64, dropout on) trains 32 steps on CPU in tests/frameworks/hf_train.py,
saving every 3 steps. The run is SIGKILLed at seeded random moments (between saves, mid-epoch, and
at a random storage operation inside a save), resumed with ``trainer.train(resume_from_checkpoint=True)``
and must end bit-identical to an uninterrupted run, having read from the dataset only the samples
it had not trained on yet. The stock Trainer, in the same kill and corruption scenarios, is
measured beside it (test_stock_trainer_side_by_side prints the numbers).
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

pytest.importorskip("transformers")
pytestmark = [pytest.mark.xdist_group("hf")]

SCRIPT = Path(__file__).parent / "frameworks" / "hf_train.py"
TOTAL, BATCH, EVERY = 32, 4, 3
PROBE = 4  # rows every process reads once at start: the probe batch (CkptguardTrainer(probe="auto"))
SEED = int(os.environ.get("CKPTGUARD_TEST_SEED", "17"))
_rng = random.Random(SEED)
KILL_STEPS = [_rng.randint(4, TOTAL) for _ in range(4)]  # SIGKILL at the start of this step
KILL_OPS = [_rng.randint(1, 200) for _ in range(4)]  # SIGKILL at this storage operation of a save (~214 in a run)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, Any]]:
    """The uninterrupted run: (run dir, final weights, info)."""
    d = tmp_path_factory.mktemp("hf-ref")
    info = train(d / "run", d / "final.safetensors")
    assert info["global_step"] == TOTAL and info["reads"] == TOTAL * BATCH + PROBE
    return d / "run", d / "final.safetensors", info


@pytest.mark.parametrize("case", sampled(list(zip(KILL_OPS, KILL_STEPS))))
def test_sigkill_inside_a_save_then_mid_epoch_resumes_bit_identical(tmp_path: Path, reference: Any, case: tuple[int, int]) -> None:
    """Killed at a random storage operation of a save; resumed, killed again mid-epoch; resumed to the end."""
    kill_op, kill_step = case
    run = tmp_path / "run"
    train(run, tmp_path / "x", "--kill-op", str(kill_op), expect=-9)
    committed = steps(run)
    first = committed[-1] if committed else None
    info = train(run, tmp_path / "y", "--resume", "--kill-step", str(max(kill_step, (first or 0) + 2)), expect=-9)
    last = steps(run)[-1] if steps(run) else None
    info = train(run, tmp_path / "final.safetensors", "--resume")
    assert info["resumed_from"] == last and info["global_step"] == TOTAL
    # No replay: the resumed process reads only the samples of the steps it had not trained on.
    assert info["reads"] == (TOTAL - (last or 0)) * BATCH + PROBE
    assert info["losses"][(last or 0):] == reference[2]["losses"][(last or 0):]
    assert_identical(tmp_path / "final.safetensors", reference[1])
    assert cli("verify", str(run)).returncode == 0


@pytest.mark.skipif(not FULL, reason="sampled out: CKPTGUARD_TEST_FULL=1 runs it")
def test_async_saves_killed_mid_epoch_resume_bit_identical(tmp_path: Path, reference: Any) -> None:
    """checkpoint_options={"async_save": True}: a save still in flight at the kill is lost, nothing else."""
    run = tmp_path / "run"
    train(run, tmp_path / "x", "--async-save", "--kill-step", str(KILL_STEPS[1]), expect=-9)
    last = steps(run)[-1] if steps(run) else None
    info = train(run, tmp_path / "final.safetensors", "--async-save", "--resume")
    assert info["resumed_from"] == last
    assert_identical(tmp_path / "final.safetensors", reference[1])


def plant_hostile(run: Path, marker: Path) -> None:
    """HF-layout and stray pickles where a careless resume would load them."""
    payload = hostile_pickle(marker)
    hf = run / "checkpoint-99"  # what get_last_checkpoint would pick
    hf.mkdir()
    for name in ("rng_state.pth", "optimizer.pt", "scheduler.pt", "pytorch_model.bin", "training_args.bin"):
        (hf / name).write_bytes(payload)
    (hf / "trainer_state.json").write_text(json.dumps({"global_step": 99}))
    for d in [p for p in run.iterdir() if p.name.startswith("step-")]:
        (d / "optimizer.pt").write_bytes(payload)
        (d / "rng_state.pth").write_bytes(payload)


def test_sigterm_save_then_corrupt_newest_falls_back_and_no_pickle_is_loaded(tmp_path: Path, reference: Any) -> None:
    """SIGTERM saves at the step and exits; the resumed run is SIGKILLed mid-epoch, its newest
    checkpoint damaged and pickles planted: the next resume falls back one checkpoint, loads no pickle."""
    run, marker = tmp_path / "run", tmp_path / "PICKLE-WAS-LOADED"
    train(run, tmp_path / "x", "--sigterm-step", "10", expect=128 + 15)
    assert steps(run) == [9, 10]  # 10 is not a multiple of save_steps: the SIGTERM save
    info = train(run, tmp_path / "y", "--resume", "--kill-step", "20", expect=-9)
    assert steps(run) == [10, 15, 18]  # keep_last=2 (save_total_limit), and the step it resumed from
    flip_last_byte(run / "step-000000018" / "model.safetensors")
    plant_hostile(run, marker)
    bad = cli("verify", str(run), expect=None)
    assert bad.returncode != 0 and "step-000000018" in bad.stdout + bad.stderr
    info = train(run, tmp_path / "final.safetensors", "--resume")
    assert info["resumed_from"] == 15, "the corrupt step 18 must be skipped"
    assert info["reads"] == (TOTAL - 15) * BATCH + PROBE
    assert_identical(tmp_path / "final.safetensors", reference[1])
    assert not marker.exists(), "a pickle from the run directory was loaded"


def test_explicit_path_resumes_that_step_and_refuses_a_foreign_folder(tmp_path: Path, reference: Any) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from ckptguard.errors import CheckpointError
    from ckptguard.integrations.hf import CkptguardTrainer

    run, marker = tmp_path / "run", tmp_path / "PICKLE-WAS-LOADED"
    shutil.copytree(reference[0], run)
    plant_hostile(run, marker)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=8))
    args = TrainingArguments(output_dir=str(run), report_to=[], use_cpu=True, max_steps=TOTAL, disable_tqdm=True, save_total_limit=2)
    trainer = CkptguardTrainer(model=model, args=args, train_dataset=[{"input_ids": torch.zeros(8, dtype=torch.long)}] * 4)
    with pytest.raises(CheckpointError, match="not a ckptguard checkpoint"):
        trainer.train(resume_from_checkpoint=str(run / "checkpoint-99"))
    assert not marker.exists()
    # A step given by path is restored exactly; max_steps reached there: nothing more to train.
    trainer.train(resume_from_checkpoint=str(run / "step-000000032"))
    trainer.checkpoint_manager.close()
    final = load_file(str(reference[1]))
    assert all(torch.equal(v, final[k]) for k, v in model.state_dict().items())
    assert not marker.exists()


def test_cli_and_hf_export_on_an_integration_run(tmp_path: Path, reference: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from ckptguard.cli import main

    def in_process(*args: str) -> tuple[int, str]:
        """The commands that import torch and transformers run here, where both are loaded already."""
        code = main(list(args))
        out = capsys.readouterr()
        return code, out.out + out.err

    run = reference[0]
    rows = json.loads(cli("ls", str(run), "--json").stdout)
    listed = rows["checkpoints"] if isinstance(rows, dict) else rows
    assert [r["step"] for r in listed] == [30, 32]  # save_total_limit=2; step 32: the end of training
    assert cli("verify", str(run)).returncode == 0
    assert in_process("plot", str(run), "-o", str(tmp_path / "loss.png"))[0] == 0
    assert (tmp_path / "loss.png").stat().st_size > 0
    code, text = in_process("doctor", str(run / "step-000000032"), "--model", f"{SCRIPT}:doctor_factory")
    assert code == 0, text
    out = tmp_path / "hf"
    code, text = in_process("export", str(run), "--format", "hf", "-o", str(out))
    assert code == 0, text
    from transformers import AutoModel, AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(out))
    final = load_file(str(reference[1]))
    assert all(torch.equal(v, final[k]) for k, v in lm.state_dict().items())
    base = AutoModel.from_pretrained(str(out))
    assert torch.equal(base.wte.weight, final["transformer.wte.weight"])
    code, text = in_process("export", str(run), "--format", "hf", "-o", str(out))
    assert code != 0 and "not empty" in text


@pytest.mark.skipif(not FULL, reason="sampled out: CKPTGUARD_TEST_FULL=1 runs it")
def test_stock_trainer_side_by_side(tmp_path: Path, reference: Any) -> None:
    """What the stock Trainer does in the same scenarios (the numbers are printed: -s shows them)."""
    from transformers.trainer_utils import get_last_checkpoint

    seen: dict[str, Any] = {}
    # 1. SIGKILL inside its own save (model and optimizer written, rng/trainer_state not yet).
    run = tmp_path / "plain"
    train(run, tmp_path / "x", "--mode", "plain", "--kill-op", "4", expect=-9)
    picked = get_last_checkpoint(str(run))
    seen["kill_in_save.picked"] = os.path.basename(picked)
    seen["kill_in_save.files"] = sorted(os.listdir(picked))
    r = train(run, tmp_path / "p1", "--mode", "plain", "--resume", expect=3)
    seen["kill_in_save.resume"] = r["failed"][:120]
    assert seen["kill_in_save.picked"] == "checkpoint-12" and "trainer_state.json" not in seen["kill_in_save.files"]
    if not FULL:
        print("\nSTOCK-TRAINER " + json.dumps(seen, indent=1))
        return
    # 2. Corrupt newest (a flipped byte in the weights' data): resumed from silently, no fallback.
    run = tmp_path / "plain2"
    train(run, tmp_path / "x2", "--mode", "plain", "--kill-step", "20", expect=-9)
    flip_last_byte(run / "checkpoint-18" / "model.safetensors")
    r = train(run, tmp_path / "p2.safetensors", "--mode", "plain", "--resume")
    seen["corrupt_newest.resumed_from"] = "checkpoint-18 (corrupt)"
    seen["corrupt_newest.final_max_abs_diff"] = max_diff(tmp_path / "p2.safetensors", reference[1])
    assert seen["corrupt_newest.final_max_abs_diff"] > 0
    # 3. The JIT (SIGTERM) checkpoint killed inside its save: the sentinel is ignored.
    run = tmp_path / "jit"
    train(run, tmp_path / "x3", "--mode", "jit", "--sigterm-step", "5", expect=-9)
    picked = get_last_checkpoint(str(run))
    seen["jit.picked"] = os.path.basename(picked)
    seen["jit.sentinel_present"] = os.path.exists(os.path.join(picked, "checkpoint-is-incomplete.txt"))
    r = train(run, tmp_path / "p3.safetensors", "--mode", "jit", "--resume", expect=None)
    seen["jit.resume"] = r.get("failed", "resumed")[:120]
    if "failed" not in r:
        seen["jit.final_max_abs_diff"] = max_diff(tmp_path / "p3.safetensors", reference[1])
    assert seen["jit.sentinel_present"]
    print("\nSTOCK-TRAINER " + json.dumps(seen, indent=1))


def test_save_total_limit_and_best_metric_become_a_retention(tmp_path: Path) -> None:
    from transformers import TrainingArguments

    from ckptguard.integrations.hf import default_retention

    plain = default_retention(TrainingArguments(output_dir=str(tmp_path), save_total_limit=3, report_to=[]))
    assert (plain.keep_last, plain.keep_best, plain.metric) == (3, 0, None)
    best = default_retention(TrainingArguments(output_dir=str(tmp_path), save_total_limit=2, metric_for_best_model="accuracy",
                                               greater_is_better=True, report_to=[]))
    assert (best.keep_last, best.keep_best, best.metric, best.mode) == (2, 1, "eval_accuracy", "max")
    every = default_retention(TrainingArguments(output_dir=str(tmp_path), report_to=[]))
    assert every.keep_last is None and every.keep_best == 0  # no limit: keep everything, as the Trainer does


def test_best_checkpoint_by_eval_metric_is_kept(tmp_path: Path) -> None:
    """save_total_limit=1 with metric_for_best_model: the newest and the best evaluated checkpoint stay."""
    from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

    from ckptguard.integrations.hf import CkptguardTrainer

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=8))
    rows = [{"input_ids": r, "labels": r} for r in torch.randint(0, 64, (16, 8), generator=torch.Generator().manual_seed(1))]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4, max_steps=12, save_steps=3,
                             eval_strategy="steps", eval_steps=3, save_total_limit=1, metric_for_best_model="loss",
                             learning_rate=0.5, report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = CkptguardTrainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:4])
    trainer.train()
    trainer.checkpoint_manager.close()
    evals = {e["step"]: e["eval_loss"] for e in trainer.state.log_history if "eval_loss" in e}
    best = min(evals, key=lambda s: evals[s])
    kept = [c.step for c in trainer.checkpoint_manager.checkpoints()]
    assert kept == sorted({best, 12}), (evals, kept)
    metrics = {c.step: c.metrics for c in trainer.checkpoint_manager.checkpoints()}
    assert metrics[best]["eval_loss"] == pytest.approx(evals[best])


def train(out: Path, result: Path, *args: str, expect: int | None = 0) -> dict[str, Any]:
    return run_script(SCRIPT, out, result, *args, expect=expect)
