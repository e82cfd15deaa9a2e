"""Promises 1 and 2 with the run directory on a real S3-protocol server (moto on 127.0.0.1).

Exact resume: stop and resume a training run stored at ``s3://``; the final weights are
bit-identical to an uninterrupted run. Crash safety: a child process training against the
bucket is SIGKILLed inside a save (data uploaded, manifest not); the parent restores a whole
checkpoint, the next save removes the debris, and the resumed run still ends bit-identical.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

import ckptguard as cg
from ckptguard.run.catalog import find_debris, scan
from ckptguard.storage import open_storage
from conftest import FULL
from trainlib import make_setup, run_training, same_weights

TESTS = Path(__file__).parent

CHILD = textwrap.dedent(
    """
    import sys, time
    import trainlib
    from ckptguard.storage import open_storage
    from ckptguard.testing import FaultyStorage

    url, hold_step, total = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

    class HoldBeforeManifest(FaultyStorage):
        def tick(self, call, path):
            if call == "create" and hold_step and path == f"step-{hold_step:09d}/MANIFEST.json":
                print("HOLD", flush=True)   # every data file of this step is uploaded
                time.sleep(600)
            super().tick(call, path)

    store = HoldBeforeManifest(open_storage(url))
    print("START", flush=True)
    trainlib.run_training(store, total, every_steps=1 if not hold_step else 5)
    print("DONE", flush=True)
    """
)


def _child(url: str, hold_step: int, total: int) -> subprocess.Popen[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, url, str(hold_step), str(total)],
        stdout=subprocess.PIPE, text=True, env=env,
    )


def _wait_for(proc: subprocess.Popen[str], word: str) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.strip() == word:
            return
    raise AssertionError(f"child exited ({proc.wait()}) before printing {word}")


def _reference(steps: int) -> dict:
    return run_training(f"memory://ref-{uuid.uuid4().hex[:10]}/run", steps)


def _restored_weights(url: str) -> tuple[int | None, dict]:
    s = make_setup()
    with cg.CheckpointManager(url) as mgr:
        step = mgr.restore(s["state"])
    return step, {k: v.detach().clone() for k, v in s["model"].state_dict().items()}


def test_exact_resume_on_s3(s3_url: str, async_save: bool) -> None:
    run_training(s3_url, 23, stop_at=9, async_save=async_save)
    assert [c.step for c in scan(open_storage(s3_url))] == [5, 9]
    resumed = run_training(s3_url, 23, async_save=async_save)
    assert [c.step for c in scan(open_storage(s3_url))] == [5, 9, 10, 15, 20]
    assert same_weights(resumed, _reference(23))  # the uninterrupted run


def test_sigkill_inside_an_s3_save_leaves_debris_never_a_torn_checkpoint(s3_url: str) -> None:
    proc = _child(s3_url, hold_step=10, total=40)
    try:
        _wait_for(proc, "HOLD")
        store = open_storage(s3_url)
        assert "step-000000010" in store.listdir("")  # its data is really up there
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [c.step for c in scan(store)] == [5]
    assert find_debris(store) == ["step-000000010"]
    assert "model.safetensors" in store.listdir("step-000000010")
    step, weights = _restored_weights(s3_url)
    assert step == 5
    assert same_weights(weights, _reference(5))
    final = run_training(s3_url, 15)  # resumes from 5; the next save cleans the debris
    assert find_debris(store) == []
    assert [c.step for c in scan(store)] == [5, 10, 15]
    assert cg.verify(s3_url).ok
    assert same_weights(final, _reference(15))


KILL_DELAYS = [0.3, 0.9, 1.6, 2.4, 3.3] if FULL else [1.2]


@pytest.mark.slow
@pytest.mark.parametrize("delay", KILL_DELAYS)
def test_sigkill_at_a_random_moment_on_s3(s3_url: str, delay: float) -> None:
    """Saving at every step, the kill lands wherever it lands: before, inside or between saves."""
    proc = _child(s3_url, hold_step=0, total=100_000)
    try:
        _wait_for(proc, "START")
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    store = open_storage(s3_url)
    committed = scan(store)
    assert all(c.valid for c in committed)
    step, weights = _restored_weights(s3_url)
    assert step == (committed[-1].step if committed else None)
    if step is not None:
        assert same_weights(weights, _reference(step))
    run_training(s3_url, (step or 0) + 2, every_steps=1)
    assert find_debris(store) == []
