"""Ordinary-use cases an outside reviewer found after issue 12 (real tiny training, no mocks).

Gradient accumulation is the loop shape here: ``loss / ACCUM`` is back-propagated every batch,
the optimizer steps (and ``zero_grad``s) every ``ACCUM`` batches, and the user's step counter
counts batches, as in most hand-written loops.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ckptguard as cg

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
