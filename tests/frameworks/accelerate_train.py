"""A tiny Accelerate training loop (MLP with dropout, CPU) for the kill / resume / corruption tests.

python accelerate_train.py OUT RESULT [--mode cg|plain] [--kill-step K] [--kill-op K] [--sigterm-step K]

- ``--mode cg``: CkptguardAccelerator (``save_state``/``load_state`` through ckptguard);
  ``plain``: the stock Accelerator with ``ProjectConfiguration(automatic_checkpoint_naming=True,
  total_limit=2)``, its step counter registered with ``register_for_checkpointing``.
- ``--kill-step K``: SIGKILL at the start of step K (between saves, mid-epoch).
- ``--kill-op K``: cg: SIGKILL at the K-th storage operation under ``step-*`` (inside a save);
  plain: SIGKILL inside the K-th ``save_state`` (its pre-hook: after Accelerate deleted the
  oldest folder to make room, before the new one is written).
- ``--sigterm-step K``: send this process SIGTERM at the end of step K.

Every run resumes from what OUT holds (a fresh run when it holds nothing). At the end RESULT
(safetensors: the final weights) and RESULT.json (resumed step, samples read, losses) are written.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration, set_seed
from safetensors.torch import save_file
from torch import nn

from ckptguard.storage import LocalStorage
from ckptguard.testing import KillAt

N, BATCH, EPOCHS, EVERY = 64, 4, 2, 3
TOTAL = N // BATCH * EPOCHS
READS = {"n": 0}


class Points(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(99)
        self.x = torch.randn(N, 8, generator=g)
        self.y = torch.randn(N, 1, generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        READS["n"] += 1
        return self.x[i], self.y[i]


class Counter:
    """The plain run's step, checkpointed with register_for_checkpointing."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, sd: dict[str, int]) -> None:
        self.step = sd["step"]


def doctor_factory() -> nn.Module:
    """``ckptguard doctor CKPT --model accelerate_train.py:doctor_factory``: today's model."""
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))


def build(a: argparse.Namespace) -> tuple[Any, Any]:
    config = DataLoaderConfiguration(use_seedable_sampler=True)
    if a.mode == "cg":
        from ckptguard.integrations.accelerate import CkptguardAccelerator
        from ckptguard.policies.retention import Retention

        storage = KillAt(LocalStorage(a.out), a.kill_op, path="*step-*")
        acc = CkptguardAccelerator(cpu=True, dataloader_config=config, checkpoint_dir=storage,
                                   retention=Retention(keep_last=2), every_steps=EVERY)
        return acc, storage
    project = ProjectConfiguration(project_dir=a.out, automatic_checkpoint_naming=True, total_limit=2)
    acc = Accelerator(cpu=True, dataloader_config=config, project_config=project)
    saves = {"n": 0}

    def kill_inside(models: Any, weights: Any, output_dir: str) -> None:
        saves["n"] += 1
        if a.kill_op is not None and saves["n"] == a.kill_op:
            os.kill(os.getpid(), signal.SIGKILL)

    acc.register_save_state_pre_hook(kill_inside)
    return acc, None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("result")
    p.add_argument("--mode", default="cg", choices=["cg", "plain"])
    p.add_argument("--kill-step", type=int)
    p.add_argument("--kill-op", type=int)
    p.add_argument("--sigterm-step", type=int)
    a = p.parse_args()
    torch.set_num_threads(1)
    acc, storage = build(a)
    set_seed(0)
    model = doctor_factory()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=10)
    loader = torch.utils.data.DataLoader(Points(), batch_size=BATCH, shuffle=True)
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    counter = Counter()
    if a.mode == "cg":
        start = acc.load_state() or 0
    else:
        acc.register_for_checkpointing(counter)
        if os.path.isdir(os.path.join(a.out, "checkpoints")) and os.listdir(os.path.join(a.out, "checkpoints")):
            try:
                acc.load_state()
            except Exception as e:  # the stock resume on a torn folder: record how it failed
                with open(a.result + ".json", "w") as f:
                    json.dump({"failed": f"{type(e).__name__}: {e}"[:300]}, f)
                raise SystemExit(3) from e
            folders = os.listdir(os.path.join(a.out, "checkpoints"))
            acc.project_configuration.iteration = max(int(f.split("_")[1]) for f in folders) + 1
        start = counter.step
    per_epoch, step, losses = len(loader), start, []
    guard = acc.preemption_guard() if a.mode == "cg" else None
    if guard is not None:
        guard.__enter__()
    for epoch in range(start // per_epoch, EPOCHS):
        skip = start % per_epoch if epoch == start // per_epoch else 0
        active = acc.skip_first_batches(loader, skip) if skip else loader
        active.set_epoch(epoch)
        for x, y in active:
            if a.kill_step is not None and step + 1 == a.kill_step:
                os.kill(os.getpid(), signal.SIGKILL)
            loss = nn.functional.mse_loss(model(x), y)
            acc.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            losses.append(loss.item())
            if a.sigterm_step is not None and step == a.sigterm_step:
                os.kill(os.getpid(), signal.SIGTERM)
            if a.mode == "cg":
                acc.maybe_save_state(step, metrics={"loss": loss.item()})
            elif step % EVERY == 0:
                counter.step = step
                acc.save_state()
    if guard is not None:
        guard.__exit__(None, None, None)
    if a.mode == "cg":
        acc.save_state(step=step)  # the final state (a no-op when this step is saved already)
        resumed = acc.checkpoint_manager.resumed_from
        acc.end_training()
    else:
        resumed = start or None
    weights = {k: v.detach().clone().contiguous() for k, v in acc.unwrap_model(model).state_dict().items()}
    save_file(weights, a.result)
    info = {"step": step, "resumed_from": resumed, "reads": READS["n"], "losses": losses,
            "ops": storage.count if storage is not None else None}
    with open(a.result + ".json", "w") as f:
        json.dump(info, f)


if __name__ == "__main__":
    main()
