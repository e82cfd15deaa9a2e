"""``max_bytes`` counts bytes really stored (issue 13 item 7).

Definition: the stored bytes of a set of kept checkpoints are each one's own files (``state.json``,
plain tensor files...) plus every shared pack under ``objects/`` that any of them references,
counted once; manifests and status marks are not counted. That is what the run holds on disk
once GC has freed what no kept checkpoint references. Before this fix the budget summed logical
sizes: 20 checkpoints sharing an 8 MB frozen tensor under a 40 MB budget kept 4.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import torch
from hypothesis import given, settings
from torch import nn

import ckptguard as cg
from ckptguard.policies.retention import budget_overrun, plan_retention
from ckptguard.run.catalog import CheckpointInfo

NOT_OWN = {"MANIFEST.json", "STATUS.json", "PINNED"}


# ---- oracle: stored bytes from the files on disk (shares no code with the library) -----------


def disk_facts(run: Path, step: int) -> tuple[int, dict[str, int]]:
    """(bytes of the checkpoint's own files, {pack: size} it references), read from disk."""
    d = run / f"step-{step:09d}"
    own = sum(p.stat().st_size for p in d.iterdir() if p.name not in NOT_OWN)
    m = json.loads((d / "MANIFEST.json").read_text())
    packs = {
        c["pack"]
        for e in m["files"].values() for t in (e.get("tensors") or {}).values() for c in t.get("chunks") or ()
    }
    return own, {p: os.path.getsize(run / "objects" / p) for p in packs}


def stored(facts: list[tuple[int, dict[str, int]]]) -> int:
    packs: dict[str, int] = {}
    for _, p in facts:
        packs.update(p)
    return sum(own for own, _ in facts) + sum(packs.values())


def listed(run: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in run.glob("step-*") if (p / "MANIFEST.json").exists())


class Frozen8MB(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(1000, 2000)  # 8.0 MB of float32, frozen
        self.head = nn.Linear(2000, 128)  # 1 MB trained (+ 2 MB of AdamW state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def test_twenty_checkpoints_sharing_a_frozen_8mb_tensor_under_40mb(tmp_path: Path) -> None:
    run = tmp_path / "run"
    budget = 40_000_000
    torch.manual_seed(0)
    model = Frozen8MB()
    model.body.requires_grad_(False)
    opt = torch.optim.AdamW(model.head.parameters(), lr=1e-3)
    state = cg.TrainState(model=model, optimizer=opt)
    facts: dict[int, tuple[int, dict[str, int]]] = {}
    prev: list[int] = []
    with cg.CheckpointManager(run, every_steps=1, incremental=True, retention=cg.Retention(max_bytes=budget)) as mgr:
        for step in range(1, 21):
            loss = model(torch.randn(4, 1000)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mgr.save(step, state)
            mgr.wait()
            facts[step] = disk_facts(run, step)  # measured while it exists
            kept = listed(run)
            assert stored([facts[s] for s in kept]) <= budget, step
            # greedy on stored bytes: the longest suffix of what was kept, plus this one, that fits
            cand = sorted(set(prev) | {step})
            assert kept == next(cand[i:] for i in range(len(cand)) if stored([facts[s] for s in cand[i:]]) <= budget)
            prev = kept
    kept = listed(run)
    logical = sum(
        e["size"] for s in kept for e in json.loads((run / f"step-{s:09d}" / "MANIFEST.json").read_text())["files"].values()
    )
    # the oracle's plan: the newest suffix of all 20 whose stored bytes fit
    want = next(list(range(i, 21)) for i in range(1, 21) if stored([facts[s] for s in range(i, 21)]) <= budget)
    assert kept == want
    assert len(kept) >= 9 and logical > budget  # logical counting kept 4
    # nothing else is stored: every pack on disk is one a kept checkpoint references
    on_disk = {p.name: p.stat().st_size for p in (run / "objects").glob("p-*.pack")}
    assert on_disk == {p: n for s in kept for p, n in facts[s][1].items()}
    assert stored([facts[s] for s in kept]) == sum(on_disk.values()) + sum(facts[s][0] for s in kept)


# ---- the planner against a reference on synthetic manifests -----------------------------------


def ckpt(step: int, own: int, packs: dict[str, int]) -> CheckpointInfo:
    files: dict[str, Any] = {"state.json": {"kind": "blob", "size": own}}
    if packs:
        files["model.safetensors"] = {"kind": "chunked", "size": 10**9, "packs": packs, "tensors": {}}
    return CheckpointInfo(
        step=step, name=f"step-{step:09d}", path="", valid=True, metrics={}, size_bytes=own + 10**9 * bool(packs),
        created=None, status="committed", manifest={"files": files},
    )


def reference_plan(rows: list[tuple[int, int, dict[str, int]]], keep_last: int, budget: int) -> list[int]:
    """The newest keep_last; then drop the oldest but the newest until the stored bytes (own
    files + distinct packs) fit."""
    steps = [s for s, _, _ in rows]
    keep = set(steps[-keep_last:])
    protected = {steps[-1]}
    facts = {s: (own, packs) for s, own, packs in rows}
    for s in sorted(keep):
        if stored([facts[k] for k in keep]) <= budget:
            break
        if s not in protected:
            keep.discard(s)
    return sorted(keep)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 50),
            st.sets(st.sampled_from(["pa", "pb", "pc", "pd", "pe"]), max_size=3),
        ),
        min_size=1, max_size=8,
    ),
    st.integers(1, 8),
    st.integers(1, 300),
)
def test_budget_plan_matches_the_reference(rows: list[Any], keep_last: int, budget: int) -> None:
    # a pack has one size in every manifest that names it
    sizes = {name: 7 * (i + 1) for i, name in enumerate(["pa", "pb", "pc", "pd", "pe"])}
    keep_last = min(keep_last, len(rows))  # KeepLast(n > count) is another package's fix (issue 13)
    full = [(i + 1, own, {p: sizes[p] for p in sorted(packs)}) for i, (own, packs) in enumerate(rows)]
    ckpts = [ckpt(s, own, packs) for s, own, packs in full]
    retention = cg.Retention(keep_last=keep_last, max_bytes=budget)
    decisions = plan_retention(ckpts, retention)
    got = [d.step for d in decisions if d.keep]
    assert got == reference_plan(full, keep_last, budget)
    facts = {s: (own, packs) for s, own, packs in full}
    assert budget_overrun(decisions, retention) == max(0, stored([facts[s] for s in got]) - budget)
