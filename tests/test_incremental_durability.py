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

import json
import posixpath
import shutil
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from torch import nn

import ckptguard as cg
from ckptguard.persist.chunked_read import verify_chunked
from ckptguard.persist.gc import collect
from ckptguard.persist.incremental import IncrementalSave, trusted_index
from ckptguard.persist.writer import clean_debris, delete_checkpoint
from ckptguard.run.catalog import ManifestCache
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


# ---- damage records survive pruning; GC forgets them only with their pack ---------------------


def small_run(run: Path, steps: int, **mgr_kw: object) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 2))
    model[0].requires_grad_(False)
    opt = torch.optim.SGD(model[1].parameters(), lr=0.1)
    state = cg.TrainState(model=model, optimizer=opt)
    with cg.CheckpointManager(run, every_steps=1, incremental=True, **mgr_kw) as mgr:  # type: ignore[arg-type]
        for step in range(1, steps + 1):
            model(torch.randn(2, 16)).sum().backward()
            opt.step()
            opt.zero_grad()
            mgr.save(step, state)


def body_chunk(run: Path, step: int) -> dict[str, object]:
    m = json.loads((run / f"step-{step:09d}" / "MANIFEST.json").read_text())
    return m["files"]["model.safetensors"]["tensors"]["0.weight"]["chunks"][0]


def test_a_recorded_chunk_is_never_referenced_again_even_when_trusted_as_checked(tmp_path: Path) -> None:
    run = tmp_path / "run"
    small_run(run, 3)
    c = body_chunk(run, 1)
    assert body_chunk(run, 3) == c  # shared by all three
    with open(run / "objects" / c["pack"], "r+b") as f:
        f.seek(c["offset"] + 5)
        b = f.read(1)
        f.seek(c["offset"] + 5)
        f.write(bytes([b[0] ^ 1]))
    report = cg.verify(run)
    assert not report.ok
    record = run / "objects" / "distrusted" / f"{c['pack']}@{c['offset']}.json"
    body = json.loads(record.read_text())
    assert (body["format"], body["version"], body["pack"], body["offset"], body["digest"]) == (
        "ckptguard-distrust", 1, c["pack"], c["offset"], c["digest"])
    # ls and retention: every checkpoint referencing it is invalid, and says why
    with cg.CheckpointManager(run, incremental=True) as mgr:
        infos = mgr.checkpoints()
    assert [i.valid for i in infos] == [False, False, False]
    assert all("failed a check" in "; ".join(i.problems) and "0.weight" in "; ".join(i.problems) for i in infos)
    # prune the two newest by hand: step 1 still references the pack, the record stays
    for s in (2, 3):
        shutil.rmtree(run / f"step-{s:09d}")
    storage = LocalStorage(run)
    idx = trusted_index(ManifestCache(storage))
    assert idx.find(c["digest"], c["size"]) is None  # the damaged location is not offered
    # a save that believes the location was just checked still writes a fresh copy
    torch.manual_seed(0)
    body = nn.Linear(16, 16).weight.detach().clone()  # the frozen layer's bytes, as saved
    save = IncrementalSave(idx, checked={(c["pack"], c["offset"]): 0})
    entry = save(storage, "x/model.safetensors", {"0.weight": body})
    (chunk,) = entry["tensors"]["0.weight"]["chunks"]
    assert chunk["digest"] == c["digest"] and chunk["pack"] != c["pack"]
    assert (save.reused_bytes, save.written_bytes) == (0, 16 * 16 * 4)
    # GC forgets the record only when no committed manifest references the pack any more
    assert c["pack"] not in collect(storage).deleted and record.exists()
    shutil.rmtree(run / "step-000000001")
    small_run(run, 1)  # a new step 1 (a fresh copy of the body); its GC frees the old pack
    assert not (run / "objects" / c["pack"]).exists() and not record.exists()
    assert body_chunk(run, 1)["pack"] != c["pack"]


def test_a_missing_pack_is_recorded_and_ls_says_so(tmp_path: Path) -> None:
    run = tmp_path / "run"
    small_run(run, 2)
    c = body_chunk(run, 2)
    (run / "objects" / c["pack"]).unlink()
    with cg.CheckpointManager(run, incremental=True) as mgr:
        infos = mgr.checkpoints()
        assert [i.valid for i in infos] == [False, False]
        assert all(f"shared pack objects/{c['pack']} is missing" in "; ".join(i.problems) for i in infos)
        model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 2))
        with pytest.raises(cg.NoValidCheckpointError, match="2 checkpoint\\(s\\), none restorable"):
            mgr.restore(cg.TrainState(model=model))
    # a resized pack is as bad as a missing one
    run2 = tmp_path / "run2"
    small_run(run2, 1)
    c2 = body_chunk(run2, 1)
    with open(run2 / "objects" / c2["pack"], "ab") as f:
        f.write(b"x")
    with cg.CheckpointManager(run2, incremental=True) as mgr:
        (info,) = mgr.checkpoints()
    assert not info.valid and "bytes, the manifest recorded" in "; ".join(info.problems)


def test_a_whole_trash_checkpoint_keeps_its_packs_until_put_back(tmp_path: Path) -> None:
    """A delete killed after its rename leaves .trash-step-N-* with its manifest; the next save
    puts it back, so GC in between must not delete its packs."""
    run = tmp_path / "run"
    small_run(run, 2)
    storage = LocalStorage(run)
    mine = {body_chunk(run, 1)["pack"]} | {
        ch["pack"]
        for e in json.loads((run / "step-000000001" / "MANIFEST.json").read_text())["files"].values()
        for t in (e.get("tensors") or {}).values() for ch in t.get("chunks") or ()
    }
    (run / "step-000000001").rename(run / ".trash-step-000000001-0badcafe")
    report = collect(storage)
    assert report.stopped == "" and not (set(report.deleted) & mine)
    assert all((run / "objects" / p).exists() for p in mine)
    assert clean_debris(storage) == []  # put back, not removed
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 2))
    with cg.CheckpointManager(run, incremental=True) as mgr:
        assert mgr.restore(cg.TrainState(model=model), step=1) == 1


def flip(run: Path, c: dict[str, object]) -> None:
    with open(run / "objects" / str(c["pack"]), "r+b") as f:
        f.seek(int(c["offset"]) + 3)  # type: ignore[call-overload]
        b = f.read(1)
        f.seek(int(c["offset"]) + 3)  # type: ignore[call-overload]
        f.write(bytes([b[0] ^ 0x80]))


def test_restore_records_the_chunk_it_found_damaged(tmp_path: Path) -> None:
    run = tmp_path / "run"
    small_run(run, 1)
    c = body_chunk(run, 1)
    flip(run, c)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 2))
    with cg.CheckpointManager(run, incremental=True) as mgr:
        with pytest.raises(cg.CheckpointError, match="does not match chunk"):
            mgr.restore(cg.TrainState(model=model))
    assert (run / "objects" / "distrusted" / f"{c['pack']}@{c['offset']}.json").exists()


def test_a_finding_that_cannot_be_recorded_still_fails_the_read(tmp_path: Path) -> None:
    """A read-only run: the record is lost (logged), the damaged checkpoint is still refused."""
    run = tmp_path / "run"
    small_run(run, 1)
    c = body_chunk(run, 1)
    flip(run, c)
    fs = FaultyStorage(LocalStorage(run), fail_at=1, ops={"mkdir", "replace"}, sticky=True)
    entry = json.loads((run / "step-000000001" / "MANIFEST.json").read_text())["files"]["model.safetensors"]
    with pytest.raises(cg.CheckpointError, match="does not match chunk") as err:
        verify_chunked(fs, "step-000000001", "model.safetensors", entry)
    assert "'0.weight'" in str(err.value) and c["pack"] in str(err.value)
    assert fs.failed is not None and not (run / "objects" / "distrusted").exists()


def test_gc_deletes_nothing_when_the_uncommit_cannot_be_made_durable(tmp_path: Path) -> None:
    run = tmp_path / "run"
    small_run(run, 2)
    storage = LocalStorage(run)
    delete_checkpoint(storage, "step-000000001")
    stray = run / "objects" / "p-0000000000001-00000000.pack"  # unreferenced, older than any commit
    stray.write_bytes(b"x" * 10)
    fs = FaultyStorage(storage, fail_at=1, ops={"fsync"}, sticky=True)
    report = collect(fs)
    assert (report.deleted, fs.failed.op if fs.failed else None) == ((), "fsync")
    assert "injected fault" in report.stopped and stray.exists()
    report = collect(storage)  # the next pass frees it
    assert report.deleted == (stray.name,) and report.stopped == "" and not stray.exists()
