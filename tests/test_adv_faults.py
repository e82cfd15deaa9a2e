"""Adversarial fault cases beyond issue 13: each was found failing on wp-adv13's base.

Real files, the loopback moto S3 server, ckptguard.testing.FaultyStorage (the library's own
fault injector, which raises exactly what the backend raises); no mocks.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

import ckptguard as cg
from ckptguard.errors import CheckpointError, DiskFullError
from ckptguard.run.catalog import find_unknown
from ckptguard.storage import FsspecStorage
from ckptguard.testing import FaultyStorage, count_ops
from s3_fixture import s3_endpoint, s3_url  # noqa: F401  (fixtures)
from trainlib import make_setup, same_weights, train_step


def _train_and_save(store: Any, steps: int, *, every: int, keep_last: int) -> tuple[dict[str, Any], cg.CheckpointManager]:
    """The DESIGN.md loop: save when due inside the loop, then a forced final save."""
    s = make_setup(hidden=4)
    mgr = cg.CheckpointManager(store, every_steps=every, retention=cg.Retention(keep_last=keep_last))
    step = 0
    while step < steps:
        for xb, yb in s["loader"]:
            loss = train_step(s, xb, yb)
            step += 1
            mgr.save(step, s["state"], metrics={"loss": loss})
            if step >= steps:
                break
    return s, mgr


@pytest.mark.timeout(120)
def test_the_final_forced_save_never_touches_the_committed_step_on_s3(s3_url: str) -> None:  # noqa: F811
    """The README/DESIGN loop saves step N when due, then ``save(N, force=True)`` after the loop.
    On an object store a re-save of N used to delete N's manifest first, so an upload failing (or a
    kill) during it lost the committed step N, and with keep_last=1 the whole run. Now the manager
    that saved N does not save it again (no storage operation at all), and another writer that did
    not restore is refused before it changes anything."""
    fs = FaultyStorage(FsspecStorage(s3_url))
    s, mgr = _train_and_save(fs, 4, every=4, keep_last=1)
    assert [c.step for c in mgr.checkpoints() if c.valid] == [4]
    saved = {k: v.clone() for k, v in s["model"].state_dict().items()}
    assert count_ops(fs, lambda: mgr.save(4, s["state"], force=True)) == 0  # already saved: skipped
    mgr.close()
    other = cg.CheckpointManager(fs, retention=cg.Retention(keep_last=1))
    with pytest.raises(CheckpointError, match="belongs to another run"):
        assert count_ops(fs, lambda: other.save(4, s["state"], force=True)) == 0
    other.close()
    # A new process: step 4 is still there and restores bit for bit.
    s2 = make_setup(hidden=4, seed=1)
    with cg.CheckpointManager(FsspecStorage(s3_url)) as m2:
        assert m2.restore(s2["state"]) == 4
    assert same_weights(s2["model"].state_dict(), saved)


CLI = [sys.executable, "-m", "ckptguard"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, env=os.environ.copy())


@pytest.mark.timeout(180)
def test_a_pack_the_storage_cannot_stat_skips_the_checkpoint_but_never_marks_it_corrupt(tmp_path: Path) -> None:
    """Promise 3: only byte-level evidence marks a checkpoint corrupt. ``objects/`` replaced by a
    file (a mount point gone wrong, a bad copy) gives ENOTDIR on every pack: that says nothing
    about the stored bytes. restore and verify used to mark the checkpoint corrupt (STATUS.json),
    so once ``objects/`` was put back, restore still refused it: the run was lost."""
    run = tmp_path / "run"
    s = make_setup(hidden=4)
    with cg.CheckpointManager(str(run), every_steps=1, incremental=True) as m:
        m.save(1, s["state"], force=True)
    saved = {k: v.clone() for k, v in s["model"].state_dict().items()}
    os.rename(run / "objects", tmp_path / "objects.aside")
    (run / "objects").write_text("not a directory\n")

    s2 = make_setup(hidden=4, seed=1)
    with cg.CheckpointManager(str(run), every_steps=1, incremental=True) as m2:
        with pytest.raises(cg.CheckpointError) as ei:
            m2.restore(s2["state"])
    assert "Not a directory" in str(ei.value) and "objects/p-" in str(ei.value)
    v = _cli("verify", str(run))
    assert v.returncode == 1, v.stdout + v.stderr
    assert "not evidence of damage" in v.stdout and "Traceback" not in v.stderr
    assert not (run / "step-000000001" / "STATUS.json").exists()  # not marked by either

    (run / "objects").unlink()
    os.rename(tmp_path / "objects.aside", run / "objects")
    with cg.CheckpointManager(str(run), every_steps=1, incremental=True) as m3:
        assert [(c.step, c.valid) for c in m3.checkpoints()] == [(1, True)]
        assert m3.restore(s2["state"]) == 1
    assert same_weights(s2["model"].state_dict(), saved)
    assert _cli("verify", str(run)).returncode == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("incremental", [False, True])
def test_a_save_that_fails_before_its_uncommitted_marker_leaves_debris_not_an_unknown_folder(incremental: bool) -> None:
    """On a store with real directories and no renames (fsspec ``memory://``), a save makes
    ``step-N/`` and then uploads its ``UNCOMMITTED`` marker. When that upload failed (ENOSPC,
    EIO), the empty ``step-N/`` was taken for a folder whose manifest was deleted by hand:
    ``verify`` failed for ever, ``prune`` kept it, and every later save of step N (the resumed
    run reaching that step again) was refused."""
    url = f"memory://adv-{uuid.uuid4().hex}/run"
    fs = FaultyStorage(FsspecStorage(url), ops=["create"])
    s = make_setup(hidden=4)
    mgr = cg.CheckpointManager(fs, every_steps=1, incremental=incremental)
    mgr.save(1, s["state"], force=True)
    fs.arm(1, error=errno.ENOSPC)  # the marker of step 2: the first file the save creates
    with pytest.raises(DiskFullError):
        mgr.save(2, s["state"], force=True)
    assert fs.failed is not None and fs.failed.path.endswith("step-000000002/UNCOMMITTED")
    fs.arm(None)
    mgr.close()
    assert find_unknown(FsspecStorage(url)) == []
    # The user's script restarts: resumes from step 1 and reaches step 2 again.
    s2 = make_setup(hidden=4)
    with cg.CheckpointManager(FsspecStorage(url), every_steps=1, incremental=incremental) as m2:
        assert m2.restore(s2["state"]) == 1
        assert m2.save(2, s2["state"], force=True) is True
        assert [(c.step, c.valid) for c in m2.checkpoints()] == [(1, True), (2, True)]
    rep = cg.verify(url)
    assert rep.ok, rep.problems


CHILD_FIRST_SAVE = r"""
import resource, sys, time
sys.path.insert(0, sys.argv[2])
from trainlib import make_setup
import ckptguard as cg
s = make_setup(hidden=4)
with cg.CheckpointManager(sys.argv[1], every_steps=1) as m:
    if sys.argv[3] == "restore":
        assert m.restore(s["state"]) == 2_000_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    m.save(2_000_001, s["state"], metrics={"loss": 0.5}, force=True)
    print("COST", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, time.perf_counter() - t)
"""


@pytest.mark.timeout(300)
@pytest.mark.parametrize("resume", [
    "append",  # a process that adds to the run without restoring (an evaluation job's metrics)
    "restore",  # a resume: rows past the restored step are looked for in a stream, none found
])
def test_the_first_save_of_a_resumed_long_run_does_not_parse_all_of_metrics_csv(tmp_path: Path, resume: str) -> None:
    """A run that logged a metric every step for 2 million steps has a 70 MB metrics.csv. Each
    resumed process's first save parsed every row of it into dicts only to learn the columns:
    +1 GB of memory and seconds per resume (15x the file; ~9 GB at the 512 MB cap). Reading the
    header line is enough when no column is new."""
    run = tmp_path / "run"
    rows = 2_000_000
    s = make_setup(hidden=4)
    with cg.CheckpointManager(str(run), every_steps=1) as m:
        m.save(rows, s["state"], force=True)
    with open(run / "metrics.csv", "w") as f:
        f.write("step,wall_time,loss\n")
        f.writelines(f"{i},1796188847.289,0.{i % 9973}\n" for i in range(1, rows + 1))
    out = subprocess.run(
        [sys.executable, "-c", CHILD_FIRST_SAVE, str(run), str(Path(__file__).parent), resume],
        capture_output=True, text=True, timeout=240, env=os.environ.copy(),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    cost = next(line for line in out.stdout.splitlines() if line.startswith("COST")).split()
    grown_kb = int(cost[1])
    assert grown_kb < 60_000, f"the first save grew the process by {grown_kb} KB"  # the file is ~70 MB
    tail = (run / "metrics.csv").read_bytes()[-200:].decode().splitlines()
    assert tail[-1].startswith("2000001,") and tail[-1].endswith(",0.5")  # appended, not rewritten
    assert (run / "metrics.csv").read_bytes().count(b"\n") == rows + 2


def _three_steps(run: Path) -> None:
    s = make_setup(hidden=4)
    with cg.CheckpointManager(str(run), every_steps=1) as m:
        for i in (1, 2, 3):
            m.save(i, s["state"], force=True)


@pytest.mark.timeout(180)
def test_pruning_a_symlinked_checkpoint_folder_never_deletes_through_the_link(tmp_path: Path) -> None:
    """A user links another run's checkpoints into a run (``ln -s ../B/step-1 A/step-1``). ckptguard
    refuses to read through the link, but ``prune`` (and retention) deleted the "invalid" entry
    by uncommitting it first: renaming the link, then removing ``MANIFEST.json`` *through* it, so
    run B lost its committed checkpoints. A save of a step whose folder is such a link did the
    same to the linked checkpoint when it replaced it."""
    a, b = tmp_path / "A", tmp_path / "B"
    _three_steps(a)
    _three_steps(b)
    shutil.rmtree(a / "step-000000001")
    os.symlink(b / "step-000000001", a / "step-000000001")
    os.symlink(b / "step-000000002", a / "step-000000007")
    out = _cli("prune", str(a), "--keep-last", "1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert sorted(os.listdir(a)) == [".ckptguard.run.lock", "ckptguard.json", "step-000000003"]
    # run B is untouched: three committed checkpoints, every one restorable and sound.
    with cg.CheckpointManager(str(b), every_steps=1) as mb:
        assert [(c.step, c.valid) for c in mb.checkpoints()] == [(1, True), (2, True), (3, True)]
    assert cg.verify(str(b)).ok

    # A save of step 5 over a link to B's step 3 replaces the link, not B's checkpoint.
    os.symlink(b / "step-000000003", a / "step-000000005")
    s = make_setup(hidden=4)
    with cg.CheckpointManager(str(a), every_steps=1) as ma:
        assert ma.restore(s["state"]) == 3
        ma.save(5, s["state"], force=True)
        assert [(c.step, c.valid) for c in ma.checkpoints()] == [(3, True), (5, True)]
    assert not (a / "step-000000005").is_symlink()
    with cg.CheckpointManager(str(b), every_steps=1) as mb:
        assert [(c.step, c.valid) for c in mb.checkpoints()] == [(1, True), (2, True), (3, True)]


@pytest.mark.timeout(180)
def test_a_symlinked_objects_folder_is_never_written_or_collected_through(tmp_path: Path) -> None:
    """Two incremental runs; a user links A's ``objects/`` to B's to share the packs. Reads refuse
    the link, but A's save wrote its new pack into B's folder and A's GC (after the save, or
    ``prune``) deleted every pack there that A's manifests do not name: B's only data. B's
    checkpoints became unrestorable."""
    a, b = tmp_path / "A", tmp_path / "B"
    for run, seed in ((a, 0), (b, 5)):
        s = make_setup(hidden=4, seed=seed)
        with cg.CheckpointManager(str(run), every_steps=1, incremental=True) as m:
            m.save(1, s["state"], force=True)
            m.save(2, s["state"], force=True)
    b_packs = sorted(os.listdir(b / "objects"))
    shutil.rmtree(a / "objects")
    os.symlink(b / "objects", a / "objects")

    s = make_setup(hidden=4, seed=9)
    with cg.CheckpointManager(str(a), every_steps=1, incremental=True, retention=cg.Retention(keep_last=1)) as m:
        with pytest.raises(cg.CheckpointError, match="symbolic link"):
            m.save(3, s["state"], force=True)
    out = _cli("prune", str(a), "--keep-last", "1")
    assert "Traceback" not in out.stderr
    assert sorted(os.listdir(b / "objects")) == b_packs  # nothing added, nothing deleted
    s2 = make_setup(hidden=4, seed=1)
    with cg.CheckpointManager(str(b), every_steps=1, incremental=True) as mb:
        assert [(c.step, c.valid) for c in mb.checkpoints()] == [(1, True), (2, True)]
        assert mb.restore(s2["state"]) == 2
    assert cg.verify(str(b)).ok
