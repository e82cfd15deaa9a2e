"""One writer per run on object stores, in one process (issue 13 item 3; promise 8).

- The conditional-write primitive (``read_versioned`` / ``write_if`` / ``remove_if``) against a
  five-line reference of its meaning, on memory:// and the loopback S3 server.
- A second manager in the same process is refused on local disk, memory:// and S3, naming this
  process; it may restore meanwhile, and writes once the first one closed.
- A writer whose lock was taken over stops before its commit (sync and async saves), commits
  nothing, writes nothing more, and leaves the new holder's lock alone.
- Stores without conditional writes: the record is read back before the lock counts as taken.
- When a record may be taken over (stale, exited holder, reused pid, unreadable), against a
  reference of that rule.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ckptguard as cg
from ckptguard.run.lock import LOCK_NAME, LockPolicy, RunLock
from ckptguard.storage import FsspecStorage, open_storage
from lock_child import build

# ---- the primitive against its meaning ------------------------------------------------------------

OPS = st.lists(
    st.tuples(
        st.sampled_from(["read", "write", "remove"]),
        st.sampled_from(["lock", "d/lock"]),
        st.binary(min_size=0, max_size=12),
        st.sampled_from(["none", "current", "older", "bogus"]),
    ),
    min_size=1, max_size=14,
)


def _check_against_reference(store: Any, ops: list[tuple[str, str, bytes, str]]) -> None:
    """Reference: a dict of path -> (bytes, version); a write or remove happens iff ``expect`` is
    the current version (None: only when absent). Versions are the store's opaque tokens."""
    ref: dict[str, tuple[bytes, str]] = {}
    seen: dict[str, list[str]] = {}
    for op, path, data, pick in ops:
        cur = ref.get(path)
        older = [v for v in seen.get(path, []) if cur is None or v != cur[1]]
        expect = {"none": None, "current": cur[1] if cur else None, "older": older[0] if older else "x",
                  "bogus": '"0123456789abcdef"'}[pick]
        if op == "read":
            got = store.read_versioned(path)
            assert got == cur
        elif op == "write":
            version = store.write_if(path, data, expect=expect)
            should = (expect is None and cur is None) or (cur is not None and expect == cur[1])
            assert (version is not None) == should, (op, path, pick, cur, expect)
            if version is not None:
                ref[path] = (data, version)
                seen.setdefault(path, []).append(version)
        else:
            if expect is None:
                continue
            removed = store.remove_if(path, expect=expect)
            assert removed == (cur is not None and expect == cur[1])
            if removed:
                del ref[path]
        got = store.read_versioned(path)
        assert (got is None) == (path not in ref) and (got is None or got == ref[path])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_conditional_writes_match_their_meaning_on_memory(ops: list[tuple[str, str, bytes, str]]) -> None:
    store = FsspecStorage(f"memory://cas-{uuid.uuid4().hex}")
    assert store.conditional_writes_atomic
    _check_against_reference(store, ops)


def test_conditional_writes_match_their_meaning_on_s3(s3_url: str) -> None:
    runs = iter(range(10**6))

    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(OPS)
    def check(ops: list[tuple[str, str, bytes, str]]) -> None:
        store = FsspecStorage(f"{s3_url}-{next(runs)}")
        assert store.conditional_writes_atomic
        _check_against_reference(store, ops)

    check()


# ---- two managers in one process ----------------------------------------------------------------------


@pytest.fixture(params=["local", "memory", "s3"])
def run_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    if request.param == "memory":
        return f"memory://lock-{uuid.uuid4().hex}/run"
    return str(request.getfixturevalue("s3_url"))


def _lock_record(url: str) -> dict[str, Any]:
    return json.loads(open_storage(url).read_bytes(LOCK_NAME))


def test_second_manager_in_one_process_is_refused(run_url: str) -> None:
    _, state = build()
    first, second = cg.CheckpointManager(run_url), cg.CheckpointManager(run_url)
    first.save(1, state, force=True)
    assert second.restore(state) == 1  # restoring takes no lock
    with pytest.raises(cg.RunLockedError) as info:
        second.save(2, state, force=True)
    msg = str(info.value)
    holder = _lock_record(run_url)
    assert f"is locked by another writer: pid {os.getpid()} on host {socket.gethostname()}" in msg
    assert f"(session {holder['session'][:12]})" in msg and "this very process" in msg
    with pytest.raises(cg.RunLockedError):
        second.pin(1)  # every write is refused, not only save
    first.close()
    second.save(2, state, force=True)
    assert _lock_record(run_url)["session"] != holder["session"]  # the second one's own session
    second.close()
    assert [c.step for c in cg.CheckpointManager(run_url).checkpoints()] == [1, 2]
    if not run_url.startswith("/"):
        assert not open_storage(run_url).exists(LOCK_NAME)  # close() removed its record


# ---- a writer that lost the run --------------------------------------------------------------------------


def test_writer_that_lost_the_run_commits_nothing(async_save: bool) -> None:
    url = f"memory://lost-{uuid.uuid4().hex}/run"
    storage = open_storage(url)
    _, state = build()
    a = cg.CheckpointManager(url, async_save=async_save, lock=LockPolicy(stale_after=600))
    a.save(1, state, metrics={"loss": 1.0}, force=True)
    a.wait()
    a_session = _lock_record(url)["session"]
    storage.remove_file(LOCK_NAME)  # removed by hand; another writer starts
    b = cg.CheckpointManager(url)
    b.save(2, state, force=True)
    b_session = _lock_record(url)["session"]
    if async_save:
        a.save(3, state, force=True)
        with pytest.raises(cg.AsyncSaveError) as failed:
            a.wait()
        err: BaseException = failed.value.__cause__  # type: ignore[assignment]
    else:
        with pytest.raises(cg.RunLockLostError) as lost:
            a.save(3, state, force=True)
        err = lost.value
    assert isinstance(err, cg.RunLockLostError) and isinstance(err, cg.RunLockedError)
    msg = str(err)
    assert f"this writer (session {a_session[:12]}, pid {os.getpid()}) lost the run to session {b_session[:12]}" in msg
    assert "nothing was committed" in msg and "Stop this process" in msg
    with pytest.raises(cg.RunLockLostError):
        a.save(4, state, metrics={"loss": 4.0}, force=True)  # stops before touching metrics.csv
    a.close()  # neither the run record nor metrics.csv nor b's lock is touched
    assert _lock_record(url)["session"] == b_session
    assert [c.step for c in cg.CheckpointManager(url).checkpoints()] == [1, 2]
    assert b"4.0" not in storage.read_bytes("metrics.csv")
    b.close()
    assert not storage.exists(LOCK_NAME)


# ---- stores without conditional writes -----------------------------------------------------------------


def test_store_without_conditional_writes_reads_its_record_back(tmp_path: Path) -> None:
    store = FsspecStorage(f"file://{tmp_path}/run")
    store.makedirs("")
    assert not store.conditional_writes_atomic
    policy = LockPolicy(settle_seconds=0.05)
    with RunLock(store, policy=policy) as first:
        record = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
        assert record["session"] == first.session and record["pid"] == os.getpid()
        assert set(record) == {"session", "pid", "host", "boot_id", "pidns", "since", "refreshed", "stale_after"}
        with pytest.raises(cg.RunLockedError, match="this very process"):
            RunLock(store, policy=policy).acquire()
        first.check()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_stale_or_unreadable_record_is_taken_over(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = f"memory://stale-{uuid.uuid4().hex}/run"
    storage = open_storage(url)
    storage.makedirs("")
    elsewhere = {"session": "f" * 32, "pid": 4242, "host": "elsewhere", "since": 1.0, "refreshed": 1.0, "stale_after": 600}
    storage.replace_file(LOCK_NAME, json.dumps(elsewhere).encode())
    with RunLock(storage) as lock:
        assert _lock_record(url)["session"] == lock.session
    assert "Taking over the stale run lock" in caplog.text and "pid 4242 on host elsewhere" in caplog.text
    fresh = dict(elsewhere, refreshed=time.time())
    storage.replace_file(LOCK_NAME, json.dumps(fresh).encode())
    with pytest.raises(cg.RunLockedError) as info:
        RunLock(storage).acquire()
    assert "pid 4242 on host elsewhere (session ffffffffffff)" in str(info.value)
    assert "whether it is alive cannot be checked from here" in str(info.value)
    assert "goes stale 600s after its last refresh" in str(info.value)
    storage.replace_file(LOCK_NAME, b"\x00not json")
    with RunLock(storage) as lock:
        assert _lock_record(url)["session"] == lock.session


# ---- when a record may be taken over, against its meaning --------------------------------------------

_DEAD_PID: list[int] = []


def _dead_pid() -> int:
    if not _DEAD_PID:
        proc = subprocess.Popen(["true"])
        proc.wait()
        _DEAD_PID.append(proc.pid)
    return _DEAD_PID[0]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    same_host=st.booleans(), same_boot=st.booleans(), same_ns=st.booleans(),
    who=st.sampled_from(["me", "dead", "init"]), old_since=st.booleans(),
    age=st.floats(0, 3000), theirs=st.sampled_from([None, 60.0, 600.0, 1800.0]), session_ok=st.booleans(),
)
def test_takeover_decision_matches_its_meaning(
    same_host: bool, same_boot: bool, same_ns: bool, who: str, old_since: bool, age: float,
    theirs: float | None, session_ok: bool,
) -> None:
    """Reference: a record may be taken over iff it is unreadable, or its holder is a process this
    machine can see (same host, boot and pid namespace) that has exited or whose pid now belongs to
    a younger process, or it was not refreshed for max(our, its) stale time."""
    import psutil

    limit = max(600.0, theirs if theirs is not None else 600.0)
    assume(abs(age - limit) > 30)  # the clock moves while the test runs
    me = {"host": socket.gethostname(), "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
          "pidns": os.readlink("/proc/self/ns/pid")}
    pid = {"me": os.getpid(), "dead": _dead_pid(), "init": 1}[who]
    now = time.time()
    since = 1.0 if old_since else now - age
    record: dict[str, Any] = {
        "session": "e" * 32, "pid": pid, "host": me["host"] if same_host else "elsewhere",
        "boot_id": me["boot_id"] if same_boot else "another-boot", "pidns": me["pidns"] if same_ns else "pid:[1]",
        "since": since, "refreshed": now - age,
    }
    if theirs is not None:
        record["stale_after"] = theirs
    visible = same_host and same_boot and same_ns
    gone = not psutil.pid_exists(pid) or psutil.Process(pid).create_time() > since + 5
    expected = (visible and gone) or age > limit
    storage = open_storage(f"memory://decide-{uuid.uuid4().hex}/run")
    storage.makedirs("")
    storage.replace_file(LOCK_NAME, json.dumps(record).encode() if session_ok else b"{broken")
    lock = RunLock(storage, policy=LockPolicy(stale_after=600.0))
    try:
        lock.acquire()
        took = True
    except cg.RunLockedError:
        took = False
    finally:
        lock.release()
    assert took == (expected or not session_ok)
