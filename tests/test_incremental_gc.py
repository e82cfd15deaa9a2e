"""GC and incremental saves under fault injection: crash at the k-th write or the k-th delete of a
save that also prunes and collects garbage, for every k; every committed checkpoint must still
restore bit-exactly, and the next normal save must converge (no unreferenced pack left)."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import ckptguard as cg
from ckptguard.persist.gc import collect
from ckptguard.persist.incremental import OBJECTS, chunk_refs
from ckptguard.run.catalog import scan
from ckptguard.storage import LocalStorage
from ckptguard.testing import FaultyStorage, SimulatedCrash
from conftest import FULL
from trainlib import same_weights


def make(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, cg.TrainState]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 2))
    model[:2].requires_grad_(False)  # frozen body, trainable head
    opt = torch.optim.AdamW(model[2].parameters(), lr=1e-2)
    return model, opt, cg.TrainState(model=model, optimizer=opt)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    loss = model(torch.randn(8, 32, generator=g)).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


RETENTION = cg.Retention(keep_last=2)


def build_run(run: Path, steps: int) -> dict[int, dict[str, torch.Tensor]]:
    model, opt, state = make()
    saved = {}
    with cg.CheckpointManager(run, incremental=True, retention=RETENTION, lock=False) as mgr:
        for step in range(1, steps + 1):
            train_step(model, opt, step)
            mgr.save(step, state, force=True)
            saved[step] = weights(model)
    return saved


# What a crash "at the k-th write" or "at the k-th delete" counts: the calls of the old test wrapper
# (plain writers, so every byte goes through a counted write(); renames count as deletes).
CRASH_OPS = {"write": {"create", "write", "close", "replace", "append"}, "delete": {"delete", "rename"}}


def crashing(run: Path, kind: str, crash_at: int | None = None) -> FaultyStorage:
    """A storage on ``run`` whose process dies at the ``crash_at``-th operation of ``kind``."""
    return FaultyStorage(LocalStorage(run), fail_at=crash_at, ops=CRASH_OPS[kind], crash=True, plain_writers=True)


def crash_during_save(run: Path, step: int, storage: FaultyStorage, async_save: bool) -> dict[str, torch.Tensor]:
    """Continue the run from its last checkpoint and save ``step`` through ``storage``."""
    model, opt, state = make()
    mgr = cg.CheckpointManager(storage, incremental=True, retention=RETENTION, lock=False, async_save=async_save)
    mgr.restore(state)
    train_step(model, opt, step)
    try:
        mgr.save(step, state, force=True)
        mgr.wait()
    except (SimulatedCrash, cg.AsyncSaveError) as e:
        if isinstance(e, cg.AsyncSaveError):
            assert isinstance(e.__cause__, SimulatedCrash)
        storage.dead = True
    finally:
        with contextlib.suppress(SimulatedCrash):  # the process is gone: its storage refuses every change
            mgr.close()
    return weights(model)


def check_run(run: Path, expected: dict[int, dict[str, torch.Tensor]]) -> list[int]:
    ckpts = scan(LocalStorage(run))
    assert ckpts, "a crash must never lose every checkpoint"
    for c in ckpts:
        model, _, state = make(seed=7)
        with cg.CheckpointManager(run, lock=False) as mgr:
            assert mgr.restore(state, step=c.step) == c.step
        assert same_weights(model.state_dict(), expected[c.step]), c.step
    return [c.step for c in ckpts]


def converge(run: Path, expected: dict[int, dict[str, torch.Tensor]]) -> None:
    """After the crash, a normal save prunes and collects what the crash left behind."""
    model, opt, state = make()
    with cg.CheckpointManager(run, incremental=True, retention=RETENTION, lock=False) as mgr:
        step = mgr.restore(state)
        assert step is not None
        train_step(model, opt, 50)
        mgr.save(50, state, force=True)
    expected[50] = weights(model)
    storage = LocalStorage(run)
    referenced = {p for c in scan(storage) for _, _, p, _ in chunk_refs(c.manifest)}
    assert set(storage.listdir(OBJECTS)) == referenced
    assert [c.step for c in scan(storage)] == [step, 50]
    check_run(run, expected)


@pytest.mark.parametrize("kind", ["delete", "write"])
def test_crash_at_every_operation_of_a_save_with_gc(tmp_path: Path, kind: str, async_save: bool) -> None:
    base = tmp_path / "base"
    expected = build_run(base, 3)
    # count the operations of one save (which writes, prunes step 2 and collects its packs)
    probe = tmp_path / "probe"
    shutil.copytree(base, probe)
    counter = crashing(probe, kind)
    crash_during_save(probe, 4, counter, async_save)
    total = counter.count
    assert total >= (3 if kind == "delete" else 10), total
    # every k for deletes of a sync save (GC's own operations); a spread sample otherwise
    every = FULL or (kind == "delete" and not async_save)
    ks = range(1, total + 1) if every else sorted({1, 2, total // 3, total // 2, 2 * total // 3, total - 1, total})
    for k in ks:
        run = tmp_path / f"{kind}-{k}"
        shutil.copytree(base, run)
        new_weights = crash_during_save(run, 4, crashing(run, kind, crash_at=k), async_save)
        exp = {**expected, 4: new_weights}
        steps = check_run(run, exp)
        assert steps[-1] in (3, 4) and set(steps) <= {2, 3, 4}, (k, steps)
        converge(run, exp)
        shutil.rmtree(run)


def test_gc_deletes_nothing_when_a_manifest_is_unreadable(tmp_path: Path) -> None:
    run = tmp_path / "run"
    expected = build_run(run, 3)
    storage = LocalStorage(run)
    (run / OBJECTS / "p-0000000000001-deadbeef.pack").write_bytes(b"orphan")
    (run / "step-000000002" / "MANIFEST.json").write_bytes(b"{not json")
    report = collect(storage)
    assert report.stopped and not report.deleted
    assert (run / OBJECTS / "p-0000000000001-deadbeef.pack").exists()
    (run / "step-000000002" / "MANIFEST.json").unlink()
    report = collect(storage)  # step 2 is now debris: its own packs go with the orphan
    assert "p-0000000000001-deadbeef.pack" in report.deleted and len(report.deleted) > 1
    assert check_run(run, expected) == [3]


def test_gc_keeps_packs_newer_than_the_newest_commit_and_foreign_names(tmp_path: Path) -> None:
    run = tmp_path / "run"
    build_run(run, 2)
    future = "p-9999999999999-0123abcd.pack"
    for name in (future, "notes.txt", "p-1-x.pack"):
        (run / OBJECTS / name).write_bytes(b"x")
    report = collect(LocalStorage(run))
    assert future in report.kept_unreferenced and not report.deleted
    assert all((run / OBJECTS / n).exists() for n in (future, "notes.txt", "p-1-x.pack"))
