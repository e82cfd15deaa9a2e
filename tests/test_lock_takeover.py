"""Two live writers never both commit (issue 13 item 3; promise 8), with real processes.

- S3 (the loopback server): a training process saves less often than ``stale_after``; its
  heartbeat keeps the lock fresh, so another writer is refused the whole time. Then it is
  SIGSTOPped; once its lock is stale a second writer takes the run over, restores and commits.
  Resumed with SIGCONT, the first writer stops before its next commit with RunLockLostError
  naming the new session, commits nothing, and leaves the new holder's lock and checkpoints intact.
- Local disk: a SIGSTOPped holder keeps its flock; a second writer is refused (naming it as
  alive) for as long as it lives, and the holder commits again once resumed.
- S3: N processes start at once, many times, on fresh runs and on runs holding a stale lock:
  exactly one wins each time, and every loser's message names the winner's session.
- S3: a holder SIGKILLed on this machine is taken over at once (its pid is dead).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import ckptguard as cg
from ckptguard.run.lock import LOCK_NAME, LockPolicy, RunLock
from ckptguard.storage import FsspecStorage, open_storage
from conftest import FULL
from lock_child import build, train

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"
STALE, BEAT, EVERY = 3.0, 0.3, 6.0  # the holder saves every 6 s: twice the stale time


def _child(run: str, out: Path, *args: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), str(TESTS), env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, str(TESTS / "lock_child.py"), run, str(out), *args], env=env)


def _wait(what: str, cond: Any, proc: subprocess.Popen[bytes] | None = None, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the child exited ({proc.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _progress(out: Path) -> list[int]:
    try:
        return [int(x) for x in (out / "progress").read_text().split()]
    except FileNotFoundError:
        return []


def _record(url: str) -> dict[str, Any]:
    return json.loads(open_storage(url).read_bytes(LOCK_NAME))


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
    proc.wait(60)


def test_stopped_s3_writer_is_taken_over_and_commits_nothing_after(s3_url: str, tmp_path: Path) -> None:
    out = tmp_path / "a"
    a = _child(s3_url, out, "--total", "1000000", "--workers", "0", "--every-seconds", str(EVERY),
               "--stale-after", str(STALE), "--heartbeat", str(BEAT), "--step-seconds", "0.02")
    policy = LockPolicy(stale_after=STALE, heartbeat_seconds=BEAT)
    try:
        _wait("the first commit", lambda: len(_progress(out)) >= 1, a)
        a_session = _record(s3_url)["session"]

        # Saves are rarer than the stale time, yet the heartbeat keeps the lock: refused throughout.
        _, probe_state = build()
        probe = cg.CheckpointManager(s3_url, lock=policy)
        assert probe.restore(probe_state) is not None
        refusals = 0
        until = time.monotonic() + EVERY + 1
        while time.monotonic() < until:
            with pytest.raises(cg.RunLockedError) as info:
                probe.save(10**6, probe_state, force=True)
            refusals += 1
            time.sleep(0.25)
        msg = str(info.value)
        assert f"pid {a.pid} on host {socket.gethostname()} (session {a_session[:12]})" in msg and ": alive." in msg
        assert refusals >= 8 and a.poll() is None and _record(s3_url)["session"] == a_session
        probe.close()

        # Stop A right after a commit (not inside a save), and wait until its lock is stale.
        n = len(_progress(out))
        _wait("a commit", lambda: len(_progress(out)) > n, a)
        a.send_signal(signal.SIGSTOP)
        committed_by_a = _progress(out)
        _wait("A's lock to go stale", lambda: time.time() - _record(s3_url)["refreshed"] > STALE + 0.5)

        # B takes the run over, resumes from A's newest checkpoint and commits.
        s, state = build(writer="B")
        b = cg.CheckpointManager(s3_url, every_steps=1, lock=policy)
        resumed = b.restore(state)
        assert resumed == committed_by_a[-1]
        state.extra["writer"] = "B"
        train(b, s, state, resumed, resumed + 3)
        b_session = _record(s3_url)["session"]
        assert b_session != a_session

        # A wakes up: it notices at once and stops before committing anything.
        a.send_signal(signal.SIGCONT)
        assert a.wait(300) == 3
        lost = (out / "lost.txt").read_text()
        assert lost.startswith("RunLockLostError: ")
        assert f"lost the run to session {b_session[:12]}" in lost and "nothing was committed" in lost
        assert f"did not refresh the lock for more than {STALE:.0f}s" in lost
        assert _progress(out) == committed_by_a
        assert _record(s3_url)["session"] == b_session  # A's exit left B's lock alone

        steps = [c.step for c in b.checkpoints()]
        assert steps == sorted(set(committed_by_a)) + [resumed + 1, resumed + 2, resumed + 3]
        with cg.CheckpointManager(s3_url) as reader:  # one reader (each new client costs seconds)
            for step in steps[-3:]:
                _, check = build()
                assert reader.restore(check, step=step) == step and check.extra["writer"] == "B"
        assert cg.verify(s3_url).ok
        b.close()
        assert not open_storage(s3_url).exists(LOCK_NAME)
    finally:
        _kill(a)


def test_stopped_local_writer_keeps_the_run(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "a"
    a = _child(str(run), out, "--total", "1000000", "--workers", "0", "--every-seconds", "2", "--step-seconds", "0.02")
    try:
        _wait("the first commit", lambda: len(_progress(out)) >= 1, a)
        a.send_signal(signal.SIGSTOP)
        _, state = build()
        b = cg.CheckpointManager(run, lock=LockPolicy(stale_after=1.0, orphan_wait=0.0))
        assert b.restore(state) is not None
        until = time.monotonic() + 2
        while time.monotonic() < until:  # a flock never goes stale while its holder lives
            with pytest.raises(cg.RunLockedError) as info:
                b.save(10**6, state, force=True)
            time.sleep(0.25)
        assert f"pid {a.pid} on host {socket.gethostname()}" in str(info.value) and ": alive." in str(info.value)
        n = len(_progress(out))
        a.send_signal(signal.SIGCONT)
        _wait("a commit after SIGCONT", lambda: len(_progress(out)) > n, a)
        a.kill()
        a.wait(60)
        b.save(10**6, state, force=True)  # free once it is gone
        b.close()
        assert 10**6 in [c.step for c in cg.CheckpointManager(run).checkpoints()]
    finally:
        _kill(a)


# ---- simultaneous starts ----------------------------------------------------------------------------

RACERS = 4
TRIALS = 60 if FULL else 12


def _racer(base: str, trials: int, barrier: Any, results: Any, env: dict[str, str]) -> None:
    from ckptguard.errors import RunLockedError

    # A forkserver started by an earlier test has that test's environment: the S3 endpoint and
    # credentials of this session's server come along explicitly.
    os.environ.update(env)
    FsspecStorage(base).exists("warm-up")  # the client is built before the race starts
    for t in range(trials):
        lock = RunLock(FsspecStorage(f"{base}/trial-{t}"), policy=LockPolicy(stale_after=600))
        barrier.wait(timeout=300)
        try:
            lock.acquire()
            results.put((t, "won", lock.session))
        except RunLockedError as e:
            results.put((t, "refused", str(e)))
        except Exception as e:
            results.put((t, "error", repr(e)))
        barrier.wait(timeout=300)  # every racer has decided before the winner lets go
        lock.release()


def test_simultaneous_starts_on_s3_have_exactly_one_winner(s3_url: str) -> None:
    stale = {"session": "0" * 32, "pid": 1, "host": "gone", "since": 1.0, "refreshed": 1.0, "stale_after": 600}
    for t in range(1, TRIALS, 2):  # odd trials race to take over a stale lock (If-Match)
        FsspecStorage(f"{s3_url}/trial-{t}").replace_file(LOCK_NAME, json.dumps(stale).encode())
    ctx = mp.get_context("forkserver")
    barrier, results = ctx.Barrier(RACERS), ctx.Queue()
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    procs = [ctx.Process(target=_racer, args=(s3_url, TRIALS, barrier, results, env), daemon=True) for _ in range(RACERS)]
    for p in procs:
        p.start()
    try:
        outcomes: list[tuple[int, str, str]] = []
        deadline = time.monotonic() + 600
        while len(outcomes) < RACERS * TRIALS:
            try:
                outcomes.append(results.get(timeout=2))
            except queue.Empty:
                ended = [p.exitcode for p in procs if not p.is_alive()]
                if len(ended) == RACERS or time.monotonic() > deadline:
                    pytest.fail(f"racers ended (exit codes {ended}) after {len(outcomes)} outcomes")
    finally:
        for p in procs:
            p.join(120)
            if p.is_alive():
                p.kill()
    assert [o for o in outcomes if o[1] == "error"] == []
    wins = Counter(t for t, kind, _ in outcomes if kind == "won")
    assert wins == Counter(range(TRIALS))  # exactly one winner in every trial
    winner = {t: session for t, kind, session in outcomes if kind == "won"}
    for t, kind, text in outcomes:
        if kind == "refused":
            assert f"(session {winner[t][:12]})" in text and "is locked by another writer" in text


def test_s3_holder_killed_on_this_machine_is_taken_over_at_once(
    s3_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "a"
    a = _child(s3_url, out, "--total", "1000000", "--workers", "0", "--every-steps", "2", "--step-seconds", "0.02")
    try:
        _wait("the first commit", lambda: len(_progress(out)) >= 1, a)
        holder = _record(s3_url)
        assert holder["pid"] == a.pid and holder["stale_after"] == 600.0
        a.kill()
        a.wait(60)
    finally:
        _kill(a)
    s, state = build()
    with cg.CheckpointManager(s3_url, every_steps=1) as b:  # default stale_after: 600 s
        step = b.restore(state)
        assert step is not None
        train(b, s, state, step, step + 1)  # its first save takes the run over at once
        assert _record(s3_url)["session"] != holder["session"] and _record(s3_url)["pid"] == os.getpid()
    assert f"Taking over the stale run lock of {s3_url} from pid {a.pid}" in caplog.text
    assert "that process has exited" in caplog.text
