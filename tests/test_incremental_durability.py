"""A pruned checkpoint's manifest removal is durable before GC deletes its packs (issue 13 item 8).

Every operation that changes the run is logged in order by the fault-injecting storage
(``ckptguard.testing.FaultyStorage``, never armed). A tiny crash model replays the log: a change
to a directory (a rename, an unlink) survives a power cut only once that directory was synced.
A pack deletion may reach the disk at any moment after it is issued (the next save's sync of
``objects/`` certainly makes it durable), so when a pack is deleted no uncommit may still be
pending: neither the rename of ``step-N`` to ``.trash-*`` nor the unlink of the trash's manifest
(unless the trash directory's own removal is durable). Otherwise a crash brings back a manifest
whose packs are gone, and ``clean_debris`` puts that checkpoint back.
"""

from __future__ import annotations

import posixpath
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

import ckptguard as cg
from ckptguard.storage.local import LocalStorage
from ckptguard.testing import FaultyStorage


def replay(log: list[tuple[str, str]]) -> int:
    """Check the crash model over the op log; return how many packs were deleted."""
    pending: dict[str, set[str]] = defaultdict(set)  # directory -> changes not yet synced
    gone: set[str] = set()  # top-level directories whose removal is durable
    packs = 0
    for i, (op, path) in enumerate(log):
        top = "/" not in path
        if op == "rename" and top and path.startswith(".trash-"):
            pending[""].add("mv:" + path)
        elif op == "delete" and path.endswith("/MANIFEST.json"):
            pending[posixpath.dirname(path)].add("MANIFEST.json")
        elif op == "delete" and top and path.startswith(".trash-"):
            pending[""].add("rm:" + path)
        elif op == "delete" and path.startswith("objects/p-"):
            packs += 1
            renames = [n for n in pending[""] if n.startswith("mv:")]
            assert not renames, (i, path, renames)
            unlinked = [d for d, names in pending.items() if d and "MANIFEST.json" in names and d not in gone]
            assert not unlinked, (i, path, unlinked)
        elif op == "fsync" and path == "":
            gone.update(n[3:] for n in pending[""] if n.startswith("rm:"))
            pending[""].clear()
        elif op == "fsync" and top and path.startswith(".trash-"):
            pending[path].clear()
    return packs


def test_pruned_manifest_removal_is_durable_before_packs_are_deleted(tmp_path: Path, async_save: bool) -> None:
    fs = FaultyStorage(LocalStorage(tmp_path / "run"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 4))
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model[1].parameters(), lr=0.1)
    state = cg.TrainState(model=model, optimizer=opt)
    with cg.CheckpointManager(fs, every_steps=1, incremental=True, async_save=async_save,
                              retention=cg.Retention(keep_last=1)) as mgr:
        for step in range(1, 7):
            model(torch.randn(2, 32)).sum().backward()
            opt.step()
            opt.zero_grad()
            mgr.save(step, state)
    log = [(e.op, e.path) for e in fs.log]
    assert replay(log) >= 4  # every save after the first freed the pruned one's packs
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*")) == ["step-000000006"]


def test_the_crash_model_rejects_the_old_order() -> None:
    """The replay fails on the order GC used before (uncommit, then packs, nothing synced)."""
    old = [("rename", ".trash-step-000000001-aaaa"), ("fsync", ""), ("delete", ".trash-step-000000001-aaaa/MANIFEST.json"),
           ("delete", ".trash-step-000000001-aaaa"), ("delete", "objects/p-0000000000001-00000000.pack")]
    try:
        replay(old)
    except AssertionError as e:
        assert ".trash-step-000000001-aaaa" in str(e)
    else:
        raise AssertionError("the crash model accepted an undurable uncommit")
    fixed = old[:4] + [("fsync", ".trash-step-000000001-aaaa"), ("fsync", "")] + old[4:]
    assert replay(fixed) == 1
