"""A tiny but real training setup shared by the tests: exact-resume checks need one definition.

``make_setup`` builds model, optimizer, scheduler, scaler and loader deterministically;
``run_training`` trains to ``total`` steps with a CheckpointManager, optionally stopping early at
``stop_at`` (as if killed right after that step), and returns the final state dict.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import ckptguard as cg


class NoisyDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Deterministic data; samples are computed, so workers and the main process agree."""

    def __init__(self, n: int = 96, dim: int = 8) -> None:
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, dim, generator=g)
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class AugmentedDataset(NoisyDataset):
    """NoisyDataset with the augmentation users write: numpy, torch and python ``random`` draws.

    In DataLoader workers these draws come from each worker's own generators, which is what
    makes mid-epoch resume with workers hard.
    """

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().__getitem__(i)
        shift = int(np.random.randint(0, x.numel()))  # a random "crop" offset (numpy)
        x = torch.roll(x, shift) * (1.0 + 0.1 * random.random())  # python random
        return x + 0.05 * torch.randn(x.shape), y  # torch noise


def seed_numpy_per_worker(worker_id: int) -> None:
    """The worker_init_fn users copy from the PyTorch FAQ."""
    np.random.seed(torch.initial_seed() % 2**32)
    random.seed(torch.initial_seed() % 2**32)


class Net(nn.Module):
    def __init__(self, dim: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(0.3))
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def make_setup(
    *, seed: int = 0, workers: int = 0, batch_size: int = 8, scaler: bool = True, n: int = 96,
    hidden: int = 32, pass_sampler_only: bool = False, augment: bool = False,
    persistent_workers: bool = False, worker_init_fn: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    model = Net(hidden=hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.SequentialLR(
        opt,
        [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=4),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40),
        ],
        milestones=[4],
    )
    ds = AugmentedDataset(n) if augment else NoisyDataset(n)
    sampler = cg.ResumableSampler(ds, shuffle=True, seed=seed)
    loader = DataLoader(
        ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
        persistent_workers=persistent_workers, worker_init_fn=worker_init_fn,
    )
    gs = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**8) if scaler else None
    state = cg.TrainState(
        model=model, optimizer=opt, scheduler=sched, scaler=gs,
        dataloader=None if pass_sampler_only else loader,
        sampler=sampler if pass_sampler_only else None,
        config={"lr": 1e-2, "hidden": hidden}, extra={"epoch": 0, "seen": 0},
    )
    return {"model": model, "opt": opt, "sched": sched, "loader": loader, "scaler": gs, "state": state}


def train_step(s: dict[str, Any], xb: torch.Tensor, yb: torch.Tensor) -> float:
    model, opt, sched, scaler = s["model"], s["opt"], s["sched"], s["scaler"]
    # python and numpy RNG used inside the loop, so their state must be restored too
    noise = 1.0 + 0.01 * random.random() + 0.01 * float(np.random.rand())
    loss = nn.functional.cross_entropy(model(xb * noise), yb)
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    sched.step()
    return float(loss.item())


def run_training(
    run: Any,
    total: int,
    *,
    stop_at: int | None = None,
    every_steps: int = 5,
    async_save: bool = False,
    setup_kwargs: dict[str, Any] | None = None,
    manager_kwargs: dict[str, Any] | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> dict[str, torch.Tensor]:
    """Train (resuming from ``run`` if it has checkpoints) until ``total`` or ``stop_at``."""
    s = make_setup(**(setup_kwargs or {}))
    state = s["state"]
    mgr = cg.CheckpointManager(run, every_steps=every_steps, async_save=async_save, **(manager_kwargs or {}))
    step = mgr.restore(state) or 0
    loader = s["loader"]
    while step < total:
        for xb, yb in loader:
            loss = train_step(s, xb, yb)
            step += 1
            state.extra["seen"] += len(xb)
            if on_step is not None:
                on_step(step, s)
            mgr.save(step, state, metrics={"loss": loss})
            if step == stop_at or step >= total:
                break
        if step == stop_at:
            break
        state.extra["epoch"] += 1
    if step == stop_at and stop_at is not None:
        mgr.save(step, state, force=True)
    mgr.close()
    return {k: v.detach().clone() for k, v in s["model"].state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def two_step_run(run: Any, **save_kw: Any) -> dict[str, torch.Tensor]:
    """A tiny run with checkpoints at steps 1 and 2; returns the step-1 weights."""
    s = make_setup(hidden=4)
    it = iter(s["loader"])
    with cg.CheckpointManager(run) as mgr:
        for step in (1, 2):
            train_step(s, *next(it))
            if step == 1:
                w1 = {k: v.clone() for k, v in s["model"].state_dict().items()}
            mgr.save(step, s["state"], force=True, **save_kw)
    return w1


def exit_worker() -> None:
    """End a finished torchrun worker without the interpreter's finalization: with gloo, torch
    sometimes aborts there ("terminate called without an active exception", SIGABRT) after
    everything is written and the groups destroyed (its worker threads outliving the interpreter,
    pytorch/pytorch#179291), and the agent would then restart a finished run."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
