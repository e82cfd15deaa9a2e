"""Per-component retention (issue 18): ``Retention(full_last=N)`` slims older kept checkpoints to
their weights. Tested the way a user meets it: a real model with Adam, real files; the slimmed
checkpoint verifies, lists and restores its weights (saying it cannot resume exactly); a plain
restore() never resumes from it; kills at every operation of a save that slims (and a real
SIGKILL) leave each checkpoint full or slimmed, both valid, and the next save converges; an
incremental run frees the optimizer's packs; an S3 run; ``ckptguard prune`` shows and applies it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ckptguard as cg
from ckptguard.cli import main
from ckptguard.persist.gc import collect
from ckptguard.persist.incremental import OBJECTS
from ckptguard.persist.prune import apply_decisions
from ckptguard.persist.slim import slim_checkpoint
from ckptguard.policies.retention import Retention, plan_retention
from ckptguard.run.catalog import scan
from ckptguard.storage import LocalStorage, open_storage
from ckptguard.testing import FaultyStorage, KillAt, SimulatedCrash, count_ops
from trainlib import same_weights

OPT = "optimizer.safetensors"


def make(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer, cg.TrainState]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    return model, opt, cg.TrainState(model=model, optimizer=opt, scheduler=sched, extra={"epoch": 0})


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    loss = model(torch.randn(8, 16, generator=g)).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(run: Any, steps: range, retention: Retention, **kw: Any) -> dict[int, dict[str, torch.Tensor]]:
    """Train and save at every step of ``steps``; return the weights each step saved."""
    model, opt, state = make()
    saved = {}
    with cg.CheckpointManager(run, retention=retention, **kw) as mgr:
        mgr.restore(state)
        for step in steps:
            train_step(model, opt, step)
            mgr.save(step, state, metrics={"loss": 1.0 / step}, force=True)
            saved[step] = weights(model)
    return saved


def files_of(run: Path, step: int) -> set[str]:
    return {p.name for p in (run / f"step-{step:09d}").iterdir()}


def manifest_of(run: Path, step: int) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((run / f"step-{step:09d}" / "MANIFEST.json").read_text())
    return data


def restored(run: Any, step: int | None) -> tuple[int | None, nn.Module, torch.optim.Optimizer, cg.CheckpointManager]:
    model, opt, state = make(seed=7)
    with cg.CheckpointManager(run, lock=False) as mgr:
        got = mgr.restore(state, step=step)
    return got, model, opt, mgr


def test_full_last_keeps_training_state_for_the_newest_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    saved = train(run, range(1, 7), Retention(full_last=2))
    for step in range(1, 5):  # older kept ones: weights, state.json, config... but no optimizer state
        m = manifest_of(run, step)
        assert OPT not in m["files"] and OPT not in files_of(run, step)
        assert m["slimmed"]["dropped"] == [OPT] and m["slimmed"]["bytes_freed"] > 0
        assert {"model.safetensors", "state.json"} <= set(m["files"])
    for step in (5, 6):
        assert "slimmed" not in manifest_of(run, step) and OPT in files_of(run, step)
    report = cg.verify(run)
    assert report.ok, [str(p) for p in report.problems]
    assert [c.step for c in scan(LocalStorage(run))] == list(range(1, 7))  # all listed, all valid
    assert all(c.valid for c in scan(LocalStorage(run)))

    got, model, opt, _ = restored(run, None)  # a plain restore resumes from a full one
    assert got == 6 and same_weights(weights(model), saved[6]) and opt.state
    with caplog.at_level(logging.WARNING):
        got, model, opt, mgr = restored(run, 3)  # by its step: the weights, and a clear warning
    assert got == 3 and same_weights(weights(model), saved[3])
    assert not opt.state  # the optimizer was left as it was: nothing to resume exactly from
    assert mgr.last_restore_report is not None
    assert any("cannot resume training exactly" in n for n in mgr.last_restore_report.notes)
    assert "step-000000003 was slimmed to its weights" in caplog.text
    assert "cannot resume training exactly" in caplog.text


def test_slimmed_checkpoint_restores_only_the_weights(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(run, range(1, 4), Retention(full_last=1))
    model, opt, state = make(seed=3)
    sched_before = state.scheduler.state_dict()
    state.extra["epoch"] = 41
    with cg.CheckpointManager(run, lock=False) as mgr:
        assert mgr.restore(state, step=1) == 1
    assert state.extra == {"epoch": 41} and state.scheduler.state_dict() == sched_before and not opt.state


def test_restore_never_resumes_from_a_slimmed_checkpoint(tmp_path: Path) -> None:
    """Newest full ones damaged: restore() falls back to an older FULL one (a pinned one) past
    newer slimmed ones; with no full one left it raises, naming the slimmed ones and how to load
    them, instead of resuming training from weights alone."""
    run = tmp_path / "run"
    model, opt, state = make()
    saved = {}
    with cg.CheckpointManager(run, retention=Retention(full_last=2)) as mgr:
        for step in range(1, 7):
            train_step(model, opt, step)
            mgr.save(step, state, force=True)
            saved[step] = weights(model)
            if step == 1:
                mgr.pin(1)
    assert OPT in manifest_of(run, 1)["files"]  # pinned: never slimmed
    assert [s for s in range(1, 7) if "slimmed" in manifest_of(run, s)] == [2, 3, 4]
    for step in (5, 6):  # flip a byte in each full newest one's optimizer file
        f = run / f"step-{step:09d}" / OPT
        raw = bytearray(f.read_bytes())
        raw[-1] ^= 0xFF
        f.write_bytes(bytes(raw))
    got, model, _, _ = restored(run, None)
    assert got == 1 and same_weights(weights(model), saved[1])
    shutil.rmtree(run / "step-000000001")
    with pytest.raises(cg.NoValidCheckpointError, match=r"slimmed to its weights .*restore\(state, step=4\)"):
        restored(run, None)
    assert restored(run, 4)[0] == 4


# ---- kills at every operation --------------------------------------------------------------------


def _snapshot_state(run: Path) -> dict[int, str]:
    """Each checkpoint as 'full' or 'slim' by its manifest, after checking that every file it
    lists is there (a dropped file that is still there is a leftover, allowed)."""
    out = {}
    for c in scan(LocalStorage(run)):
        assert c.valid, (c.step, c.problems)
        out[c.step] = "slim" if "slimmed" in (c.manifest or {}) else "full"
    return out


def _leftovers(run: Path) -> list[str]:
    out = []
    for d in run.glob("step-*"):
        m = json.loads((d / "MANIFEST.json").read_text())
        out += [f"{d.name}/{p.name}" for p in d.iterdir() if p.name == OPT and OPT not in m["files"]]
        out += [f"{d.name}/{p.name}" for p in d.iterdir() if p.name.startswith("MANIFEST.json.tmp-")]
    return sorted(out)


@pytest.mark.parametrize("incremental", [False, True])
def test_a_kill_at_every_operation_of_a_slimming_save(tmp_path: Path, incremental: bool) -> None:
    """A run saved 1..4 keeping everything; then a session with full_last=1 saves step 5, which
    slims 1..4. The process dies at each operation of that save in turn (every write, fsync,
    rename, replace and delete): each checkpoint is then full or slimmed, every one verifies and
    restores the exact weights it saved; the next save converges (all slimmed, no leftovers)."""
    pristine = tmp_path / "pristine"
    saved = train(pristine, range(1, 5), Retention(), incremental=incremental)
    model, opt, state = make()

    def slimming_save(storage: Any) -> None:
        mgr = cg.CheckpointManager(storage, retention=Retention(full_last=1), lock=False, incremental=incremental)
        try:
            mgr.restore(state)
            train_step(model, opt, 5)
            mgr.save(5, state, force=True)
        finally:
            _close(mgr)

    probe = tmp_path / "probe"
    shutil.copytree(pristine, probe)
    fs = FaultyStorage(LocalStorage(probe))
    n = count_ops(fs, lambda: slimming_save(fs))
    assert _snapshot_state(probe) == {1: "slim", 2: "slim", 3: "slim", 4: "full", 5: "full"}  # 4: resumed from
    saved[5] = weights(model)
    slim_ops = [e for e in fs.log if e.op in ("replace", "delete") and e.path.startswith("step-00000000") and not e.path.startswith("step-000000005")]
    assert len(slim_ops) == (3 if incremental else 6)  # a replace (and a delete) per checkpoint
    seen: set[tuple[str, ...]] = set()
    for k in range(1, n + 1):
        run = tmp_path / f"k{k}"
        shutil.copytree(pristine, run)
        fs = FaultyStorage(LocalStorage(run), fail_at=k, crash=True)
        with contextlib.suppress(SimulatedCrash):
            slimming_save(fs)
        assert fs.failed is not None and fs.failed.index == k
        states = _snapshot_state(run)
        seen.add(tuple(states.get(s, "-") for s in range(1, 6)))
        assert cg.verify(run).ok
        for step in states:  # each one restores exactly what it saved
            got, m, _, _ = restored(run, step)
            assert got == step and same_weights(weights(m), saved[step]), (k, step)
        got, _, o, _ = restored(run, None)  # resumes from a full one
        assert got in (4, 5) and o.state
        train(run, range(6, 7), Retention(full_last=1), incremental=incremental)  # the next save converges
        # all slimmed but the new one and the one it resumed from (protected, as from deletion)
        assert _snapshot_state(run) == {**dict.fromkeys(states, "slim"), got: "full", 6: "full"}, k
        assert _leftovers(run) == [] and cg.verify(run).ok
        if incremental:
            assert collect(LocalStorage(run), dry_run=True).deleted == ()  # GC ran: nothing unreferenced left
        shutil.rmtree(run)
    assert len(seen) >= 4  # kills before, between and after the slimmings


def _close(mgr: cg.CheckpointManager) -> None:
    with contextlib.suppress(SimulatedCrash, cg.CheckpointError):
        mgr.close()


def test_a_real_sigkill_at_every_operation_of_slimming(tmp_path: Path) -> None:
    """A forked process applies a slimming plan and is SIGKILLed before each of its operations
    (the local replace of MANIFEST.json is one operation: the kill lands before or after it);
    the run is then valid as it is, and applying the plan again finishes it."""
    pristine = tmp_path / "pristine"
    saved = train(pristine, range(1, 5), Retention())
    plan = plan_retention(scan(LocalStorage(pristine)), Retention(full_last=1))
    assert [d.step for d in plan if d.slim] == [1, 2, 3]
    shutil.copytree(pristine, tmp_path / "count")
    fs = FaultyStorage(LocalStorage(tmp_path / "count"))
    n = count_ops(fs, lambda: apply_decisions(fs, plan))
    assert n == 6  # per checkpoint: replace the manifest, delete the optimizer file
    for k in range(1, n + 2):
        run = tmp_path / f"k{k}"
        shutil.copytree(pristine, run)
        pid = os.fork()
        if pid == 0:
            try:
                apply_decisions(KillAt(LocalStorage(run), k), plan)
            finally:
                os._exit(3)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) if k <= n else os.WEXITSTATUS(status) == 3
        assert cg.verify(run).ok
        for c in scan(LocalStorage(run)):
            got, m, _, _ = restored(run, c.step)
            assert got == c.step and same_weights(weights(m), saved[c.step])
        assert apply_decisions(LocalStorage(run), plan_retention(scan(LocalStorage(run)), Retention(full_last=1)))[1] == {}
        assert _snapshot_state(run) == {1: "slim", 2: "slim", 3: "slim", 4: "full"} and _leftovers(run) == []
        shutil.rmtree(run)


def test_a_failed_removal_leaves_a_leftover_the_next_save_removes(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(run, range(1, 3), Retention())
    fs = FaultyStorage(LocalStorage(run), fail_at=1, ops={"remove_file"}, path=f"*/{OPT}")
    _, failed = apply_decisions(fs, plan_retention(scan(fs), Retention(full_last=1)))
    assert list(failed) == [1] and "slimmed" in manifest_of(run, 1)
    assert _leftovers(run) == ["step-000000001/optimizer.safetensors"] and cg.verify(run).ok
    train(run, range(3, 4), Retention(full_last=1))  # resumes from 2: kept full while resumed from
    assert _leftovers(run) == [] and _snapshot_state(run) == {1: "slim", 2: "full", 3: "full"}


def test_slim_checkpoint_twice_changes_nothing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(run, range(1, 3), Retention())
    storage = LocalStorage(run)
    assert slim_checkpoint(storage, "step-000000001") > 0
    raw = (run / "step-000000001" / "MANIFEST.json").read_bytes()
    assert slim_checkpoint(storage, "step-000000001") == 0
    assert (run / "step-000000001" / "MANIFEST.json").read_bytes() == raw


# ---- incremental runs, object stores, the CLI ------------------------------------------------------


def test_incremental_slimming_frees_the_optimizer_packs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    saved = train(run, range(1, 6), Retention(), incremental=True)
    before = sum(p.stat().st_size for p in (run / OBJECTS).glob("*.pack"))
    train(run, range(6, 7), Retention(full_last=1), incremental=True)
    after = sum(p.stat().st_size for p in (run / OBJECTS).glob("*.pack"))
    assert [s for s in range(1, 7) if "slimmed" in manifest_of(run, s)] == [1, 2, 3, 4]  # 5: resumed from
    freed = sum(manifest_of(run, s)["slimmed"]["bytes_freed"] for s in range(1, 5))
    added = sum(e["size"] for e in manifest_of(run, 6)["files"].values() if e["kind"] == "chunked")
    # the optimizer's packs are gone (less a few tiny chunks, e.g. Adam's step counts, that newer
    # checkpoints share and that are written once)
    assert freed > 0 and after <= before + added - 0.95 * freed, (before, added, freed, after)
    assert collect(LocalStorage(run), dry_run=True).deleted == ()
    assert cg.verify(run).ok
    for step in range(1, 6):
        got, m, _, _ = restored(run, step)
        assert got == step and same_weights(weights(m), saved[step])


def test_slimming_on_s3(s3_url: str) -> None:
    saved = train(s3_url, range(1, 5), Retention(full_last=2))
    storage = open_storage(s3_url)
    ckpts = scan(storage)
    assert [("slimmed" in (c.manifest or {})) for c in ckpts] == [True, True, False, False]
    assert all(c.valid for c in ckpts)
    assert not storage.exists(f"step-000000001/{OPT}") and storage.exists(f"step-000000004/{OPT}")
    assert cg.verify(s3_url).ok
    got, m, _, _ = restored(s3_url, 2)
    assert got == 2 and same_weights(weights(m), saved[2])
    assert restored(s3_url, None)[0] == 4


def test_prune_dry_run_shows_slim_decisions_and_prune_applies_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    train(run, range(1, 5), Retention(keep_last=3))
    capsys.readouterr()
    assert main(["prune", str(run), "--full-last", "1", "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(d["step"], d["keep"], d["slim"]) for d in out["decisions"]] == [(2, True, True), (3, True, True), (4, True, False)]
    assert all(OPT in manifest_of(run, s)["files"] for s in (2, 3, 4))  # a dry run changes nothing
    assert main(["prune", str(run), "--full-last", "1", "--dry-run"]) == 0
    table = capsys.readouterr().out
    assert "would slim" in table
    assert main(["prune", str(run), "--full-last", "1"]) == 0
    assert "slimmed" in capsys.readouterr().out
    assert _snapshot_state(run) == {2: "slim", 3: "slim", 4: "full"} and _leftovers(run) == []
    assert main(["prune", str(run), "--full-last", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [d["slimmed"] for d in out["decisions"]] == [True, True, False]


def test_full_last_is_validated_and_recorded(tmp_path: Path) -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError, match="full_last"):
            Retention(full_last=bad)
    assert not Retention(full_last=1).keeps_everything
    assert Retention.from_json(Retention(keep_last=4, full_last=2).to_json()) == Retention(keep_last=4, full_last=2)


def test_loss_guard_rolls_back_to_a_full_checkpoint_not_a_slimmed_one(tmp_path: Path) -> None:
    """A trip at step 5 marks step 5 failed; the newest checkpoint before it (4) is slimmed, so
    the rollback takes the newest FULL one before the trip (1, pinned), with its optimizer state."""
    run = tmp_path / "run"
    model, opt, state = make()
    saved = {}
    with cg.CheckpointManager(run, retention=Retention(full_last=1)) as mgr:
        for step in range(1, 6):
            train_step(model, opt, step)
            mgr.save(step, state, force=True)
            saved[step] = weights(model)
            if step == 1:
                mgr.pin(1)
        assert [s for s in range(1, 6) if "slimmed" in manifest_of(run, s)] == [2, 3, 4]
        guard = cg.LossGuard(mgr, window=4, min_history=2)
        for step in range(1, 5):
            assert not guard.check(step, 1.0)
        assert guard.check(5, float("nan"))
        opt.state.clear()
        assert guard.rollback(state) == 1
    assert same_weights(weights(model), saved[1]) and opt.state  # resumed exactly, optimizer included


def test_a_crash_at_every_operation_of_slimming_on_an_object_store() -> None:
    """memory:// (no atomic rename: the manifest's replace is one PUT): a crash at each operation
    of a slimming pass leaves every checkpoint full or slimmed and valid; the next pass converges."""
    import uuid

    for k in range(1, 8):
        url = f"memory://slim-{uuid.uuid4().hex[:8]}/run"
        saved = train(url, range(1, 5), Retention())
        storage = open_storage(url)
        plan = plan_retention(scan(storage), Retention(full_last=1))
        fs = FaultyStorage(storage, fail_at=k, crash=True)
        with contextlib.suppress(SimulatedCrash):
            apply_decisions(fs, plan)
        assert (fs.failed is not None) == (k <= 6)  # a replace and a delete for each of 1, 2, 3
        assert all(c.valid for c in scan(storage)) and cg.verify(url).ok
        for c in scan(storage):
            got, m, _, _ = restored(url, c.step)
            assert got == c.step and same_weights(weights(m), saved[c.step])
        assert apply_decisions(storage, plan_retention(scan(storage), Retention(full_last=1)))[1] == {}
        assert [("slimmed" in (c.manifest or {})) for c in scan(storage)] == [True, True, True, False]
        assert [storage.exists(f"step-{s:09d}/{OPT}") for s in range(1, 5)] == [False, False, False, True]


def test_a_kill_inside_the_manifest_replace_leaves_a_temp_file_the_slimming_removes(tmp_path: Path) -> None:
    """A kill between writing MANIFEST.json.tmp-<id> and its rename (inside the local replace)
    leaves the full checkpoint and that file: valid as it is; the slimming that follows removes it."""
    run = tmp_path / "run"
    saved = train(run, range(1, 3), Retention())
    d = run / "step-000000001"
    (d / "MANIFEST.json.tmp-0123abcd").write_bytes((d / "MANIFEST.json").read_bytes()[:100])
    assert cg.verify(run).ok and _snapshot_state(run) == {1: "full", 2: "full"}
    got, m, _, _ = restored(run, 1)
    assert got == 1 and same_weights(weights(m), saved[1])
    assert _leftovers(run) == ["step-000000001/MANIFEST.json.tmp-0123abcd"]
    apply_decisions(LocalStorage(run), plan_retention(scan(LocalStorage(run)), Retention(full_last=1)))
    assert _leftovers(run) == [] and _snapshot_state(run) == {1: "slim", 2: "full"}


def test_resuming_after_slimming_is_exact(tmp_path: Path) -> None:
    """Slimming touches only older checkpoints: a run stopped and resumed (from its newest, full
    checkpoint) ends with the weights and optimizer state of an uninterrupted run."""
    whole = train(tmp_path / "whole", range(1, 9), Retention(full_last=1))
    train(tmp_path / "cut", range(1, 6), Retention(full_last=1))
    resumed = train(tmp_path / "cut", range(6, 9), Retention(full_last=1))
    assert same_weights(resumed[8], whole[8])
    a, b = make(seed=1), make(seed=2)
    for run, (_, _, state) in ((tmp_path / "whole", a), (tmp_path / "cut", b)):
        with cg.CheckpointManager(run, lock=False) as mgr:
            assert mgr.restore(state) == 8
    sa, sb = a[1].state_dict()["state"], b[1].state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)


def test_ls_says_which_checkpoints_are_slimmed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    train(run, range(1, 5), Retention(full_last=2))
    assert main(["ls", str(run), "--json"]) == 0
    rows = {c["step"]: c["slimmed"] for c in json.loads(capsys.readouterr().out)["checkpoints"]}
    assert rows == {1: True, 2: True, 3: False, 4: False}
    assert main(["ls", str(run)]) == 0
    assert capsys.readouterr().out.count("slimmed") >= 2
