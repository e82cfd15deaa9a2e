"""The demo's training program: a real small network on scikit-learn's handwritten digits.

``python -m ckptguard.cli.demo_train RUN --steps N`` trains an MLP with dropout, AdamW, a warm-up + cosine
schedule and a shuffled ResumableSampler, checkpointing every ``--every`` steps; it resumes from
RUN when checkpoints exist. It reports progress as JSON lines on stdout so that the parent
(``ckptguard demo``) can kill it with SIGKILL at chosen moments. ``--hold-in-save S`` makes the
save of step S stop after its data files are written and before its manifest is, and wait there:
the parent's SIGKILL then lands inside a real save.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch
import xxhash
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ckptguard.capture.sampler import ResumableSampler
from ckptguard.capture.state import TrainState
from ckptguard.manager.manager import CheckpointManager
from ckptguard.policies.retention import Retention
from ckptguard.storage.local import LocalStorage, LocalWriter

__all__ = ["build", "model_digest", "main"]


def _emit(**event: Any) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    g = torch.Generator().manual_seed(1234)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    return x[:1500], y[:1500], x[1500:], y[1500:]


def build(total_steps: int, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    xtr, ytr, xva, yva = load_digits_tensors()
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(128, 128), nn.ReLU(), nn.Dropout(0.2),
        nn.Linear(128, 10),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-2)
    warmup = max(1, total_steps // 20)
    sched = torch.optim.lr_scheduler.SequentialLR(
        opt,
        [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.05, total_iters=warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total_steps - warmup)),
        ],
        milestones=[warmup],
    )
    ds = TensorDataset(xtr, ytr)
    loader = DataLoader(ds, batch_size=32, sampler=ResumableSampler(ds, shuffle=True, seed=seed))
    return {"model": model, "opt": opt, "sched": sched, "loader": loader, "val": (xva, yva)}


def model_digest(model: nn.Module) -> str:
    h = xxhash.xxh3_128()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
        loss = nn.functional.cross_entropy(out, y).item()
        acc = (out.argmax(1) == y).float().mean().item()
    model.train(was)
    return acc, loss


class _HoldingStorage(LocalStorage):
    """Local storage whose save of one step stops before the manifest and waits to be killed."""

    def __init__(self, root: str, hold_step: int) -> None:
        super().__init__(root)
        self._tag = f"step-{hold_step:09d}"

    def create(self, path: str) -> LocalWriter:
        if path.startswith(".tmp-" + self._tag) and path.endswith("/MANIFEST.json"):
            _emit(event="holding", step=int(self._tag[5:]), path=path)
            while True:  # the parent sends SIGKILL now
                time.sleep(0.05)
        return super().create(path)


def train(run: str, total_steps: int, every: int, hold_in_save: int | None) -> dict[str, Any]:
    torch.set_num_threads(1)
    parts = build(total_steps)
    model, opt, sched, loader = parts["model"], parts["opt"], parts["sched"], parts["loader"]
    xva, yva = parts["val"]
    state = TrainState(
        model=model, optimizer=opt, scheduler=sched, dataloader=loader,
        config={"lr": 3e-3, "batch_size": 32, "total_steps": total_steps, "dropout": 0.2},
        extra={"epoch": 0},
    )
    storage = _HoldingStorage(run, hold_in_save) if hold_in_save else run
    mgr = CheckpointManager(
        storage, every_steps=every,
        retention=Retention(keep_last=3, keep_best=1, metric="val_loss", mode="min"),
    )
    step = mgr.restore(state) or 0
    _emit(event="start", step=step)
    while step < total_steps:
        for xb, yb in loader:
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            opt.step()
            sched.step()
            step += 1
            metrics: dict[str, float] = {"loss": loss.item(), "lr": sched.get_last_lr()[0]}
            if step % every == 0 or step == total_steps:
                metrics["val_acc"], metrics["val_loss"] = accuracy(model, xva, yva)
            _emit(event="step", step=step)
            mgr.save(step, state, metrics=metrics, force=step == total_steps)
            if step >= total_steps:
                break
        state.extra["epoch"] = loader.sampler.epoch if hasattr(loader.sampler, "epoch") else 0
    mgr.close()
    acc, _ = accuracy(model, xva, yva)
    result = {"event": "done", "step": step, "digest": model_digest(model), "val_acc": acc,
              "checkpoints": [c.step for c in mgr.checkpoints()]}
    _emit(**result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ckptguard.cli.demo_train")
    p.add_argument("run")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--hold-in-save", type=int, default=None)
    a = p.parse_args(argv)
    train(a.run, a.steps, a.every, a.hold_in_save)
    return 0


if __name__ == "__main__":
    sys.exit(main())
