"""metrics.csv reads as the run's true history (one row per step) after any number of crashes:
rows a killed attempt logged past its last checkpoint are superseded at restore, and a row torn
mid-number is never joined with the next append (issue 12 item 5, issue 13 item 8)."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptguard as cg
from ckptguard.run.metrics_log import METRICS_FILE, MetricsLog, read_metrics
from ckptguard.storage.local import LocalStorage
from ckptguard.testing import FaultyStorage

TOTAL = 30


def run_child(run: Any, kill_at: int, *, flush_now: bool = True) -> int:
    """The user's script in a real child process (forked: no second torch import), which SIGKILLs
    itself right after logging step ``kill_at``; returns its wait status as subprocess does."""
    import time

    import metrics_child

    pid = os.fork()
    if pid == 0:  # the child: train, die by SIGKILL; any other ending is a failure
        try:
            metrics_child.main(run if not isinstance(run, Path) else str(run), TOTAL, kill_at, flush_now=flush_now)
        finally:
            os._exit(3)
    deadline = time.monotonic() + 600
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            raise AssertionError("the training child hung")
        time.sleep(0.05)


def run_to_the_end(run: Path) -> None:
    import metrics_child

    metrics_child.main(str(run), TOTAL, 0)


def raw_rows(run: Path) -> list[dict[str, str]]:
    with open(run / METRICS_FILE, newline="") as f:
        return list(csv.DictReader(f))


def checkpoints(run: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in run.glob("step-*") if (p / "MANIFEST.json").exists())


def test_metrics_csv_is_the_true_history_after_repeated_sigkills(tmp_path: Path) -> None:
    ref = tmp_path / "reference"
    run_to_the_end(ref)
    reference = raw_rows(ref)
    assert [int(r["step"]) for r in reference] == list(range(1, TOTAL + 1))

    run = tmp_path / "run"
    # each attempt dies after logging steps past its last checkpoint (saves every 4 steps)
    for kill_at, last_ckpt in ((7, 4), (6, 4), (15, 12), (23, 20)):
        assert run_child(run, kill_at) == -9
        assert checkpoints(run)[-1] == last_ckpt
        steps = [int(r["step"]) for r in raw_rows(run)]
        assert steps == list(range(1, kill_at + 1))  # the rows past the checkpoint are on disk...
        assert max(steps) > last_ckpt
    run_to_the_end(run)
    rows = raw_rows(run)
    # ...and the resumed runs superseded them: one row per step, in order, no repeats
    assert [int(r["step"]) for r in rows] == list(range(1, TOTAL + 1))
    # exact resume: the same losses and learning rates as the uninterrupted run, bit for bit
    assert [(r["loss"], r["lr"]) for r in rows] == [(r["loss"], r["lr"]) for r in reference]
    _, parsed = read_metrics(LocalStorage(run))
    assert [r["step"] for r in parsed] == list(range(1, TOTAL + 1))


class KillAfterCommit(FaultyStorage):
    """The process SIGKILLs itself right after the rename that commits checkpoint ``name``."""

    def __init__(self, inner: Any, name: str) -> None:
        super().__init__(inner)
        self.name = name

    def rename_dir(self, src: str, dst: str) -> None:
        super().rename_dir(src, dst)
        if dst == self.name:
            os.kill(os.getpid(), signal.SIGKILL)


def test_no_row_is_lost_when_killed_right_after_a_commit(tmp_path: Path) -> None:
    """Rows are buffered between saves (the default): a kill right after a checkpoint's commit
    rename must not lose the rows up to that step (they reach the file before the commit)."""
    ref = tmp_path / "reference"
    run_to_the_end(ref)
    run = tmp_path / "run"
    assert run_child(KillAfterCommit(LocalStorage(run), "step-000000012"), 0, flush_now=False) == -9
    assert checkpoints(run)[-1] == 12
    assert [int(r["step"]) for r in raw_rows(run)] == list(range(1, 13))
    run_to_the_end(run)
    assert [(r["step"], r["loss"]) for r in raw_rows(run)] == [(r["step"], r["loss"]) for r in raw_rows(ref)]


def test_readers_see_one_row_per_step_before_the_resumed_run_writes(tmp_path: Path) -> None:
    """A file an older version (or a killed attempt) left with repeated steps reads as one row
    per step, the last one written winning; the next write after a restore drops the stale rows."""
    run = tmp_path / "run"
    run.mkdir()
    (run / METRICS_FILE).write_text(
        "step,wall_time,loss\n1,10.0,0.9\n2,11.0,0.8\n3,12.0,0.7\n2,20.0,0.85\n3,21.0,0.75\n"
    )
    storage = LocalStorage(run)
    _, rows = read_metrics(storage)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 0.9), (2, 0.85), (3, 0.75)]
    log = MetricsLog(storage)
    log.record(9, {"loss": 0.5})  # buffered before the restore: a step past it, dropped
    log.restart_after(1)
    log.record(2, {"loss": 0.6})
    log.flush()
    assert (run / METRICS_FILE).read_text().splitlines()[:2] == ["step,wall_time,loss", "1,10.0,0.9"]
    _, rows = read_metrics(storage)
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 0.9), (2, 0.6)]
    assert len((run / METRICS_FILE).read_text().splitlines()) == 3


def test_fresh_start_drops_rows_of_an_attempt_that_never_committed(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / METRICS_FILE).write_text("step,wall_time,loss\n1,10.0,0.9\n2,11.0,0.8\n")
    state = cg.TrainState(model=torch.nn.Linear(2, 2))
    with cg.CheckpointManager(run) as mgr:
        assert mgr.restore(state) is None
        mgr.save(1, state, metrics={"loss": 0.5}, force=True)
    assert [(r["step"], r["loss"]) for r in raw_rows(run)] == [("1", "0.5")]


def test_a_row_torn_mid_number_is_never_joined_with_the_next_append(tmp_path: Path) -> None:
    """Cut the file at every byte of its last row (what a write killed mid-append leaves), then
    append as the resumed run does: the torn row is gone, never read as a valid, wrong row."""
    src = tmp_path / "src"
    src.mkdir()
    log = MetricsLog(LocalStorage(src))
    for step, loss in ((1, 0.123456), (2, 0.654321), (3, 1.5)):
        log.record(step, {"loss": loss})
        log.flush()
    full = (src / METRICS_FILE).read_bytes()
    start = full.rindex(b"\n", 0, len(full) - 1) + 1  # where the last row (step 3) begins
    for cut in range(start + 1, len(full)):  # at least one byte of it, not its newline
        run = tmp_path / f"cut{cut}"
        run.mkdir()
        (run / METRICS_FILE).write_bytes(full[:cut])
        storage = LocalStorage(run)
        assert [r["step"] for r in read_metrics(storage)[1]] == [1, 2]  # readers skip it
        resumed = MetricsLog(storage)
        resumed.record(3, {"loss": 2.5})
        resumed.flush()
        text = (run / METRICS_FILE).read_text()
        assert text.endswith("\n") and full[start:cut].decode() + "\n" not in text.splitlines(keepends=True)[1:-1]
        rows = read_metrics(storage)[1]
        assert [(r["step"], r["loss"]) for r in rows] == [(1, 0.123456), (2, 0.654321), (3, 2.5)], cut
        assert len(text.splitlines()) == 4


@pytest.mark.parametrize("cut_in", ["header", "empty"])
def test_a_torn_or_empty_header_starts_a_clean_file(tmp_path: Path, cut_in: str) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / METRICS_FILE).write_bytes(b"step,wall_ti" if cut_in == "header" else b"")
    log = MetricsLog(LocalStorage(run))
    log.record(1, {"loss": 0.5})
    log.flush()
    lines = (run / METRICS_FILE).read_text().splitlines()
    assert lines[0] == "step,wall_time,loss" and lines[1].startswith("1,") and lines[1].endswith(",0.5")
    assert len(lines) == 2


def test_a_failing_periodic_flush_never_stops_training_and_loses_no_row(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """record() flushes every flush_seconds beside the loop; a storage error there (a full disk, a
    run directory not made yet) is logged, the rows stay pending and the next flush writes them."""
    (tmp_path / "run").mkdir()
    fs = FaultyStorage(LocalStorage(tmp_path / "run"), fail_at=1, ops={"create", "append", "replace"}, path="metrics.csv*", sticky=True)
    log_ = MetricsLog(fs, flush_seconds=0.0)
    with caplog.at_level("WARNING", logger="ckptguard.run.metrics_log"):
        for step in (1, 2, 3):
            log_.record(step, {"loss": 1.0 / step})  # each one tries to flush and fails: no exception
    assert "Could not append to" in caplog.text and "retried at the next save" in caplog.text
    fs.arm(None)  # the disk is back
    log_.flush()
    _, rows = read_metrics(LocalStorage(tmp_path / "run"))
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["loss"] == pytest.approx(1 / 3)
