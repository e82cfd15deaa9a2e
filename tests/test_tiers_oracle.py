"""Which checkpoint a tiered restore picks, against a few-line reference over generated tier
contents (hypothesis): the newest step any tier holds a sound copy of, read from the fastest tier
holding one; damaged copies are passed over copy by copy; no copy at all is a fresh run; copies
that are all damaged raise NoValidCheckpointError. Real files, real checkpoints, real damage.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ckptguard as cg
from ckptguard.run.runrecord import RunRecord
from ckptguard.storage import LocalStorage
from ckptguard.tiers import Tiers

TIERS = ("local", "durable")  # fastest first (the hot tier is the same code with a keeper: tests/test_tiers.py)
LINEAGE = "oracle"  # every copy is of one run (copies of no lineage of the run are never restored)

# per step: for each tier, None (no copy), "ok" or "damaged"
copy = st.sampled_from([None, "ok", "damaged"])
layouts = st.dictionaries(st.integers(1, 6), st.tuples(copy, copy), max_size=5)


def reference(layout: dict[int, tuple[str | None, str | None]]) -> tuple[int, str] | None | str:
    """The meaning, written again: newest step first, fastest sound copy first."""
    for step in sorted(layout, reverse=True):
        for tier, kind in zip(TIERS, layout[step]):
            if kind == "ok":
                return step, tier
    return "no valid" if any(k for kinds in layout.values() for k in kinds) else None


def write_copy(root: Path, step: int, tier: str, damaged: bool) -> None:
    state = cg.TrainState(model=torch.nn.Linear(2, 2), extra={"tier": tier, "step": step})
    with torch.no_grad():
        state.model.weight.fill_(float(step))
    with cg.CheckpointManager(root, lock=False, run_id=LINEAGE) as mgr:
        mgr.save(step, state, force=True)
    if damaged:
        f = next((root / f"step-{step:09d}").glob("*.safetensors"))
        data = bytearray(f.read_bytes())
        data[-3] ^= 0x55
        f.write_bytes(bytes(data))


@settings(max_examples=25, deadline=None)
@given(layouts)
def test_tiered_restore_picks_what_the_reference_says(layout: dict[int, tuple[str | None, str | None]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        roots = {"local": Path(d, "local"), "durable": Path(d, "durable")}
        roots["durable"].mkdir()
        RunRecord(LocalStorage(roots["durable"]), LINEAGE).write()  # the run, as its first save records it
        for step, kinds in layout.items():
            for tier, kind in zip(TIERS, kinds):
                if kind is not None:
                    write_copy(roots[tier], step, tier, kind == "damaged")
        expected = reference(layout)
        state = cg.TrainState(model=torch.nn.Linear(2, 2), extra={"tier": None, "step": None})
        mgr = cg.CheckpointManager(roots["durable"], lock=False, tiers=Tiers(hot=False, local=str(roots["local"]), durable_every_seconds=1e9))
        try:
            if expected == "no valid":
                try:
                    mgr.restore(state)
                except cg.NoValidCheckpointError as e:
                    assert "none restorable" in str(e)
                    return
                raise AssertionError("restore did not raise NoValidCheckpointError")
            got = mgr.restore(state)
            if expected is None:
                assert got is None
                return
            assert isinstance(expected, tuple)
            assert (got, state.extra["tier"]) == expected
            assert torch.all(state.model.weight == float(expected[0]))
        finally:
            mgr.close()
