"""The child of the SIGKILL test: saves large checkpoints in a loop until it is killed.

Weights at step ``s`` are ``base + s`` (``base`` from a fixed seed), so the parent knows exactly
what every step saved. After each save has returned (and, for async saves, is durable), the step
is appended to ``side`` (the parent's record of what was acknowledged).
"""

from __future__ import annotations

import os

import torch
from torch import nn

import ckptguard as cg

SHAPES = {"a": (1024, 2048), "b": (1024, 2048), "c": (2048, 1024)}  # 3 x 8 MiB = 24 MiB per save


class Big(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for name, shape in SHAPES.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)))


def base() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}


def set_step(model: Big, b: dict[str, torch.Tensor], step: int) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            torch.add(b[name], float(step), out=p.data)


def expected(b: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    return {k: v + float(step) for k, v in b.items()}


def child(run: str, side: str, async_save: bool) -> None:
    torch.set_num_threads(1)
    model = Big()
    state = cg.TrainState(model=model)
    b = base()
    mgr = cg.CheckpointManager(run, async_save=async_save, retention=cg.Retention(keep_last=2))
    step = mgr.restore(state) or 0
    while True:
        step += 1
        set_step(model, b, step)
        mgr.save(step, state, force=True)
        mgr.wait()
        with open(side, "a") as f:
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
