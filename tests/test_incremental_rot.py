"""Rot that cannot spread (issue 13 item 1, DESIGN promise 3).

A real tiny training run (a frozen body layer, a trained head, AdamW) with incremental saves:
one chunk of the frozen layer is damaged right after step 10 is saved (one flipped bit, or its
pack deleted), training goes on to step 40, and then every listed checkpoint is restored
explicitly on a fresh manager. The damage may cost only the checkpoints that already referenced
the damaged chunk when it was damaged; every later checkpoint must restore, bit for bit.
Restorable checkpoints on the code before this fix (bit flip and deleted pack alike), saving every
5 steps: keep_last=2: 0 of 2 without a probe (``restore`` raised "No valid checkpoint"), 2 of 2 with
one; keeping all 8 checkpoints (the damaged chunk shared by steps 5 and 10): 0 of 8 without a probe,
5 of 8 with one (step 15 referenced the damaged chunk too); keep_every=10 with a probe lost step 35
(it went back to the damaged copy once the probe-failed checkpoint was pruned). Saving every 2
steps (20 checkpoints): 0 of 20 and 14 of 20. After the fix: 2 of 2, 6 of 8 and 15 of 20 (exactly
the checkpoints saved after the damage), nothing lost. CKPTGUARD_TEST_FULL=1 runs every variant.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ckptguard as cg
from conftest import FULL

DAMAGE_AT = 10
TOTAL = 40
EVERY = 5
SAMPLED = pytest.mark.skipif(not FULL, reason="sampled; CKPTGUARD_TEST_FULL=1 runs every variant")


class Frozen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def make(seed: int = 0) -> tuple[Frozen, torch.optim.Optimizer, cg.TrainState]:
    torch.manual_seed(seed)
    model = Frozen()
    model.body.requires_grad_(False)
    opt = torch.optim.AdamW(model.head.parameters(), lr=1e-2)
    return model, opt, cg.TrainState(model=model, optimizer=opt)


def manifest(run: Path, step: int) -> dict[str, Any]:
    return json.loads((run / f"step-{step:09d}" / "MANIFEST.json").read_text())


def body_chunk(run: Path, step: int) -> dict[str, Any]:
    """The (only) chunk of the frozen layer's weight as checkpoint ``step`` references it."""
    return manifest(run, step)["files"]["model.safetensors"]["tensors"]["body.weight"]["chunks"][0]


def listed_steps(run: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in run.glob("step-*") if (p / "MANIFEST.json").exists())


def referencing(run: Path, pack: str, offset: int | None) -> set[int]:
    """Oracle: the listed checkpoints whose manifest references that pack (at that offset)."""
    out = set()
    for step in listed_steps(run):
        for entry in manifest(run, step)["files"].values():
            for t in (entry.get("tensors") or {}).values():
                for c in t.get("chunks") or ():
                    if c["pack"] == pack and (offset is None or c["offset"] == offset):
                        out.add(step)
    return out


def damage(run: Path, how: str) -> tuple[str, int | None]:
    c = body_chunk(run, DAMAGE_AT)
    path = run / "objects" / c["pack"]
    if how == "delete":
        os.remove(path)
        return c["pack"], None
    with open(path, "r+b") as f:  # one bit, in the middle of the frozen weight's chunk
        f.seek(c["offset"] + 77)
        b = f.read(1)
        f.seek(c["offset"] + 77)
        f.write(bytes([b[0] ^ 0x08]))
    return c["pack"], c["offset"]


def train(run: Path, how: str, *, probe: bool, retention: cg.Retention | None) -> tuple[dict[int, Any], set[int]]:
    """Train to TOTAL, damaging after step DAMAGE_AT; return ({step: weights}, steps that
    referenced the damaged chunk at the moment it was damaged)."""
    model, opt, state = make()
    g = torch.Generator().manual_seed(1)
    weights: dict[int, Any] = {}
    hit: set[int] = set()
    kw: dict[str, Any] = {"probe": torch.randn(4, 16, generator=torch.Generator().manual_seed(7))} if probe else {}
    with cg.CheckpointManager(run, every_steps=EVERY, incremental=True, retention=retention, **kw) as mgr:
        for step in range(1, TOTAL + 1):
            x = torch.randn(8, 16, generator=g)
            loss = nn.functional.cross_entropy(model(x), torch.arange(8) % 2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if mgr.save(step, state, metrics={"loss": loss.item()}):
                weights[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if step == DAMAGE_AT:
                mgr.wait()
                pack, offset = damage(run, how)
                hit = referencing(run, pack, offset)
    return weights, hit


def restorable(run: Path, weights: dict[int, Any]) -> list[int]:
    """Restore every listed checkpoint explicitly on a fresh manager; the steps that restored
    exactly the weights saved at that step."""
    ok = []
    for step in listed_steps(run):
        model, _, state = make(seed=99)
        with cg.CheckpointManager(run, incremental=True) as mgr:
            try:
                assert mgr.restore(state, step=step) == step
            except cg.CheckpointError:
                continue
        assert all(torch.equal(v, weights[step][k]) for k, v in model.state_dict().items()), step
        ok.append(step)
    return ok


@pytest.mark.parametrize(
    ("how", "probe"),
    [("bitflip", False), ("delete", False), ("bitflip", True), pytest.param("delete", True, marks=SAMPLED)],
)
def test_keep_last_2_survives_one_damaged_chunk(tmp_path: Path, how: str, probe: bool) -> None:
    run = tmp_path / "run"
    weights, hit = train(run, how, probe=probe, retention=cg.Retention(keep_last=2))
    assert DAMAGE_AT in hit
    assert restorable(run, weights) == [TOTAL - EVERY, TOTAL]
    model, _, state = make(seed=99)
    with cg.CheckpointManager(run, incremental=True) as mgr:
        assert mgr.restore(state) == TOTAL


@pytest.mark.parametrize(
    ("how", "probe"),
    [("bitflip", False), ("delete", True), pytest.param("bitflip", True, marks=SAMPLED),
     pytest.param("delete", False, marks=SAMPLED)],
)
def test_damage_costs_only_the_checkpoints_that_referenced_it(tmp_path: Path, how: str, probe: bool) -> None:
    run = tmp_path / "run"
    weights, hit = train(run, how, probe=probe, retention=None)
    every = list(range(EVERY, TOTAL + 1, EVERY))
    assert listed_steps(run) == every
    assert len(hit) >= 2 and max(hit) == DAMAGE_AT  # the damaged chunk was shared
    assert restorable(run, weights) == [s for s in every if s not in hit]
    report = cg.verify(run)
    assert not report.ok and any(("objects" in p) for p in map(str, report.problems)), report.problems


@pytest.mark.parametrize("how", ["bitflip", pytest.param("delete", marks=SAMPLED)])
def test_probe_run_keeping_the_damaged_checkpoint_never_references_it_again(tmp_path: Path, how: str) -> None:
    """keep_every=10 keeps step 10 (and its damaged chunk) for good: a probe-failed checkpoint
    is pruned, yet no later save may go back to the damaged copy (before: the distrust went
    with the pruned checkpoint and the index preferred the oldest copy)."""
    run = tmp_path / "run"
    weights, hit = train(run, how, probe=True, retention=cg.Retention(keep_last=2, keep_every=10))
    listed = listed_steps(run)
    assert {20, 30, TOTAL - EVERY, TOTAL} <= set(listed)
    assert restorable(run, weights) == [s for s in listed if s not in hit and s > DAMAGE_AT]
    assert [s for s in listed if s <= DAMAGE_AT and s not in hit] == []
