"""A tiny HF Trainer run (1-layer GPT-2, vocab 64, CPU) for the kill / resume / corruption tests.

python hf_train.py OUT RESULT [--mode cg|plain|jit] [--resume] [--kill-step K] [--kill-op K]
                              [--sigterm-step K]

- ``--mode cg``: CkptguardTrainer (ckptguard commits); ``plain``: the stock Trainer;
  ``jit``: the stock Trainer with ``enable_jit_checkpoint=True`` (its SIGTERM checkpoint).
- ``--kill-step K``: SIGKILL at the start of optimizer step K (mid-epoch, between saves).
- ``--kill-op K``: SIGKILL at the K-th storage operation that writes into a checkpoint
  (cg: ckptguard's storage operations under ``step-*``; plain/jit: inside the Trainer's own save,
  after the model and the optimizer were written, before the RNG and trainer_state.json).
- ``--sigterm-step K``: send this process SIGTERM at the end of step K.

At the end, RESULT (safetensors: the final weights) and RESULT.json (global step, the resumed
step, how many samples this process read from the dataset, the number of storage operations of
checkpoint writes) are written. Dropout is on: an RNG not restored exactly shows in the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from ckptguard.storage import LocalStorage
from ckptguard.testing import KillAt

N_SAMPLES, SEQ, VOCAB = 64, 8, 64
READS = {"n": 0}


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    """Map-style dataset of fixed random token rows; counts the rows read in this process."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1234)
        self.rows = torch.randint(0, VOCAB, (N_SAMPLES, SEQ), generator=g)

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        READS["n"] += 1
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


class Chaos(TrainerCallback):
    def __init__(self, kill_step: int | None, sigterm_step: int | None, slow_after_sigterm: bool) -> None:
        self.kill_step, self.sigterm_step, self.slow = kill_step, sigterm_step, slow_after_sigterm
        self.sent = False

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.kill_step is not None and state.global_step + 1 == self.kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if self.sent and self.slow:
            time.sleep(0.25)  # the JIT checkpoint waits 3 s after SIGTERM before it saves

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        if self.sigterm_step is not None and state.global_step == self.sigterm_step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def plain_trainer_class(kill_op: int | None, jit: bool) -> type[Trainer]:
    class KilledInSave(Trainer):
        """The stock Trainer, SIGKILLed inside its own save (model + optimizer written, not the rest):
        the ``kill_op``-th save, or (``jit``) its SIGTERM checkpoint (the one with the sentinel)."""

        saves = 0

        def _save_rng_state(self, output_dir: str) -> None:
            KilledInSave.saves += 1
            in_jit = os.path.exists(os.path.join(output_dir, "checkpoint-is-incomplete.txt"))
            if (jit and in_jit) or (not jit and kill_op is not None and KilledInSave.saves >= kill_op):
                os.kill(os.getpid(), signal.SIGKILL)
            super()._save_rng_state(output_dir)

    return KilledInSave


def doctor_factory() -> GPT2LMHeadModel:
    """``ckptguard doctor CKPT --model hf_train.py:doctor_factory``: today's model, configured as the
    Trainer configures it (``use_cache=False``: TrainingArguments.use_cache), so that its output on
    the probe batch has the same parts as at save time."""
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=SEQ, use_cache=False))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("result")
    p.add_argument("--mode", default="cg", choices=["cg", "plain", "jit"])
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-step", type=int)
    p.add_argument("--kill-op", type=int)
    p.add_argument("--sigterm-step", type=int)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--async-save", action="store_true", help="cg: CheckpointManager(async_save=True)")
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=SEQ))
    args = TrainingArguments(
        output_dir=a.out, per_device_train_batch_size=4, num_train_epochs=a.epochs, save_strategy="steps",
        save_steps=3, save_total_limit=2, logging_steps=1, report_to=[], use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, learning_rate=1e-2, warmup_steps=2, seed=0, enable_jit_checkpoint=a.mode == "jit",
    )
    chaos = Chaos(a.kill_step, a.sigterm_step, slow_after_sigterm=a.mode == "jit")
    storage = None
    if a.mode == "cg":
        from ckptguard.integrations.hf import CkptguardTrainer

        storage = KillAt(LocalStorage(a.out), a.kill_op, path="*step-*")
        trainer: Trainer = CkptguardTrainer(model=model, args=args, train_dataset=Tokens(), callbacks=[chaos], checkpoint_dir=storage,
                                            checkpoint_options={"async_save": a.async_save})
    else:
        trainer = plain_trainer_class(a.kill_op, a.mode == "jit" and not a.resume)(model=model, args=args, train_dataset=Tokens(), callbacks=[chaos])
    resumed: Any = None
    try:
        trainer.train(resume_from_checkpoint=True if a.resume else None)
    except Exception as e:  # the plain Trainer on a torn checkpoint: record how it failed
        print(f"RESUME-FAILED {type(e).__name__}: {e}", flush=True)
        with open(a.result + ".json", "w") as f:
            json.dump({"failed": f"{type(e).__name__}: {e}"[:500]}, f)
        sys.exit(3)
    if a.mode == "cg":
        resumed = trainer.checkpoint_manager.resumed_from  # type: ignore[attr-defined]
        trainer.checkpoint_manager.close()  # type: ignore[attr-defined]
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, a.result)
    info = {"global_step": trainer.state.global_step, "resumed_from": resumed, "reads": READS["n"],
            "ops": storage.count if storage is not None else None,
            "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e]}
    with open(a.result + ".json", "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    main()
