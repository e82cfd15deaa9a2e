"""Preemption with real child processes: signal at a known step, checkpoint, exit, exact resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ckptguard as cg
import trainlib
from conftest import FULL

CHILD = str(Path(__file__).parent / "policy_child.py")
TOTAL = 30


def start(run: Path, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ)
    return subprocess.Popen(
        [sys.executable, CHILD, str(run), "--total", str(TOTAL), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def wait_for(proc: subprocess.Popen[str], line: str, timeout: float = 120) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = proc.stdout.readline()
        if not got:
            raise AssertionError(f"child ended before printing {line!r}: {proc.stderr.read() if proc.stderr else ''}")
        if got.strip() == line:
            return
    raise AssertionError(f"child did not print {line!r} in {timeout}s")


def manifest(run: Path, step: int) -> dict:
    return json.loads((run / f"step-{step:09d}" / "MANIFEST.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    """An uninterrupted run of the same loop, in-process."""
    return trainlib.run_training(tmp_path_factory.mktemp("ref") / "run", TOTAL, every_steps=5)


@pytest.mark.parametrize("async_flag", [False, True], ids=["sync", "async"])
def test_sigterm_saves_step_reached_exits_and_resumes_bit_identical(
    tmp_path: Path, reference: dict[str, torch.Tensor], async_flag: bool
) -> None:
    run = tmp_path / "run"
    extra = ["--async-save"] if async_flag else []
    proc = start(run, "--pause-at", "13", *extra)
    wait_for(proc, "STEP 13")
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    exit_seconds = time.monotonic() - t0
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert exit_seconds < 30, f"exit took {exit_seconds:.1f}s, beyond a 30 s grace period"
    m = manifest(run, 13)
    assert m["reason"] == "preemption"
    assert "SIGTERM" in m["extra"]["preemption"]
    assert (run / "step-000000010" / "MANIFEST.json").exists()  # the periodic save before it, flushed
    assert not (run / "step-000000014").exists()
    record = json.loads((run / "ckptguard.json").read_text())
    assert record["sessions"][-1]["preempted"] is True
    resumed = trainlib.run_training(run, TOTAL, every_steps=5, async_save=async_flag)  # same loop, resumed
    assert trainlib.same_weights(resumed, reference)


def test_sigterm_to_the_whole_process_group_with_dataloader_workers_is_a_preemption(tmp_path: Path) -> None:
    """torchrun's agent, Slurm or a shutdown signal the whole process group: the DataLoader's
    workers get the SIGTERM too. They ignore it (ckptguard's worker init), so the loop is not
    killed by a dead worker; it saves the step reached and exits as preempted."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, CHILD, str(run), "--total", "400", "--workers", "2"],  # no pause: the loop fetches on
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        wait_for(proc, "STEP 13")
        os.killpg(proc.pid, signal.SIGTERM)  # the main process and its workers
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "is killed by signal" not in err
    newest = max(int(p.name.split("-")[1]) for p in run.glob("step-*"))
    m = manifest(run, newest)
    assert newest >= 13 and m["reason"] == "preemption" and "SIGTERM" in m["extra"]["preemption"]


def preempted_loop(run: Path, stop: int, **guard_kwargs: object) -> tuple[int, int]:
    """In-process: train, raise the flag at step ``stop`` (via a real signal or a poller)."""
    s = trainlib.make_setup()
    mgr = cg.CheckpointManager(run, every_steps=5)
    reached = [0]
    sig = guard_kwargs.pop("send", None)
    if "pollers" in guard_kwargs:
        guard_kwargs["pollers"] = (lambda: reached[0] >= stop,)
    with pytest.raises(SystemExit) as e, mgr.preemption_guard(**guard_kwargs):  # type: ignore[arg-type]
        for step, (xb, yb) in enumerate(s["loader"], start=1):
            loss = trainlib.train_step(s, xb, yb)
            reached[0] = step
            if step == stop and sig is not None:
                os.kill(os.getpid(), sig)  # type: ignore[arg-type]
            mgr.save(step, s["state"], metrics={"loss": loss})
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL or sig is None  # handlers restored
    return int(e.value.code or 0), reached[0]


def test_sigusr1_custom_signal_list_and_exit_code(run_dir: Path) -> None:
    code, reached = preempted_loop(run_dir, 7, signals=(signal.SIGUSR1,), exit_code=85, send=signal.SIGUSR1)
    assert (code, reached) == (85, 7)
    m = manifest(run_dir, 7)
    assert m["reason"] == "preemption" and "SIGUSR1" in m["extra"]["preemption"]


def test_poller_raises_the_same_flag(run_dir: Path) -> None:
    code, reached = preempted_loop(run_dir, 9, pollers=(), poll_seconds=0.0, exit_code=3)
    assert (code, reached) == (3, 9)
    m = manifest(run_dir, 9)
    assert m["reason"] == "preemption" and m["extra"]["preemption"].startswith("poller")


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="full sweep only (CKPTGUARD_TEST_FULL=1)")
def test_signal_outside_the_list_is_left_alone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = start(run, "--pause-at", "7", "--signals", "SIGUSR1")
    wait_for(proc, "STEP 7")
    proc.send_signal(signal.SIGTERM)  # not in the list: default action, no save
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM
    assert not (run / "step-000000007").exists()
    assert (run / "step-000000005" / "MANIFEST.json").exists()


def test_second_signal_ends_a_stuck_process(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = start(run, "--stuck-at", "6")
    wait_for(proc, "STEP 6")
    proc.send_signal(signal.SIGTERM)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=1.0)  # the first signal only raised the flag; the loop never saves
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGTERM
    assert not (run / "step-000000006").exists()
