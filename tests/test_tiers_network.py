"""Tiered runs when the network to the durable tier (an object store) is cut: every ending.

The durable tier is a real S3-protocol server (moto) on 127.0.0.1 reached through the
:class:`~fault_proxy.FaultProxy` (no mocks); the test's own view of the bucket goes straight to
the server, around the proxy. The hot tier is real shared memory (/dev/shm) owned by a real
keeper process; the trainer that gets SIGKILLed is a real child process.

1. The connection is cut during a background copy: training goes on (hot saves are not blocked
   by the network), the cut copy commits nothing (verify and ls show complete checkpoints only),
   the error is logged, not raised, and once the network is back the next copy lands the newest.
2. ``close()`` while the network is cut: a clear ``CheckpointError`` naming the durable URL and
   what happens next (the hot memory is kept), never a botocore error, never a hang; a restarted
   trainer restores the newest step from the hot tier.
3. The keeper's "persist at breakpoint" while the network is cut (trainer SIGKILLed, short
   grace): the hot copy must not be lost; the keeper keeps it and persists it once it can.

Each of these was once broken and is pinned here: the keeper freed the memory after a cut copy
(the newest step lost) or died when the store was unreachable; a heartbeat of the run lock
blocked hot saves; a restart could not restore from memory while the store was unreachable; a
flaky read made a copy uncommit a checkpoint the bucket had; a cut copy's debris outlived a clean
close(); a failed read of the run record erased its sessions; close() waited out every request's
retries (minutes with the client's default retries).

The S3 client's own retries are set to one try (``total_max_attempts``) so that the library's
``RetryPolicy`` is the layer under test and a cut costs seconds, not minutes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptguard as cg
from ckptguard.cli import main
from ckptguard.run.catalog import find_debris, scan
from ckptguard.storage import LocalStorage, Storage, open_storage
from ckptguard.tiers import Tiers
from conftest import FULL
from fault_proxy import Fault, FaultProxy
from s3_fixture import s3_endpoint, s3_url  # noqa: F401 - fixtures
from test_tiers import hot_dir, keeper_pid  # the hot tier's directory and its keeper, as test_tiers finds them

NEVER = 1e9
CLOSE_LIMIT = 90.0  # seconds: close() with the network cut must end well within this (no hang)
full_only = pytest.mark.skipif(not FULL, reason="sampled out: CKPTGUARD_TEST_FULL=1 runs it")


# ---- helpers --------------------------------------------------------------------------------------


def via(proxy: FaultProxy) -> dict[str, Any]:
    """storage_options that reach the bucket through the proxy (JSON: the keeper gets them too)."""
    return {
        "client_kwargs": {"endpoint_url": proxy.url},
        "config_kwargs": {"retries": {"total_max_attempts": 1}, "connect_timeout": 2, "read_timeout": 20},
    }


def keeper_log(url: str) -> str:
    try:
        return Path(hot_dir(url), ".keeper", "log").read_text(errors="replace")
    except OSError:
        return "(no keeper log: the hot directory is gone)"


def hot_steps(url: str) -> list[int]:
    if not os.path.isdir(hot_dir(url)):
        return []
    return [c.step for c in scan(LocalStorage(hot_dir(url))) if c.valid]


def committed(store: Storage) -> list[int]:
    """The bucket's committed (valid) checkpoints, read around the proxy."""
    return [c.step for c in scan(store) if c.valid]


def history(store: Storage) -> list[dict[str, Any]]:
    try:
        raw = store.read_bytes("history.jsonl").decode()
    except cg.CheckpointError:
        return []
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def wait_until(cond: Callable[[], bool], timeout: float, what: str, tick: Callable[[], None] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        if tick is not None:
            tick()
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def settle(cond: Callable[[], bool], timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``cond``; whether it came (no error either way)."""
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return cond()


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """A ckptguard command against the bucket, in this process (the environment points it at the
    server itself, around the proxy): (exit code, its output)."""
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}


class Trainer:
    """A tiny in-process training loop on a tiered run (one Linear layer; each step changes it)."""

    def __init__(
        self, url: str, proxy: FaultProxy, *, durable_every: float, grace: float = 600.0, lock: bool | cg.LockPolicy = True
    ) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(256, 256)
        self.state = cg.TrainState(model=self.model, optimizer=None, extra={"step": 0})
        self.mgr = cg.CheckpointManager(url, storage_options=via(proxy), every_steps=1, async_save=True, lock=lock,
                                        tiers=Tiers(durable_every_seconds=durable_every, grace_seconds=grace))
        self.step = 0
        self.blocked: list[float] = []  # wall seconds of each save() call

    def train(self, n: int = 1) -> None:
        for _ in range(n):
            self.step += 1
            with torch.no_grad():
                self.model.weight.add_(0.01)
            self.state.extra["step"] = self.step
            t0 = time.perf_counter()
            assert self.mgr.save(self.step, self.state)  # never raises: a copy's failure is not the loop's
            self.blocked.append(time.perf_counter() - t0)


def assert_only_debris(report: Any, steps: list[int], debris: list[str]) -> None:
    """``report`` (cg.verify of the bucket): the sound checkpoints are exactly ``steps``, and the
    only problems (if any) are the leftovers ``debris``, named as such."""
    assert [c.step for c in report.checkpoints if c.ok] == steps, report
    assert {p.checkpoint for p in report.problems} <= set(debris), report.problems
    assert all("debris of an interrupted save" in p.message for p in report.problems), report.problems


def close_bounded(mgr: cg.CheckpointManager, limit: float) -> tuple[BaseException | None, float]:
    """``mgr.close()`` in a thread, bounded: (what it raised, seconds); fails if it hangs."""
    out: list[BaseException | None] = [None]

    def run() -> None:
        try:
            mgr.close()
        except BaseException as e:
            out[0] = e

    t0 = time.monotonic()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    seconds = time.monotonic() - t0
    assert not t.is_alive(), f"close() with the network cut still runs after {limit:g}s (a hang)"
    return out[0], seconds


# ---- fixtures -------------------------------------------------------------------------------------


@pytest.fixture
def proxy(s3_endpoint: str) -> Iterator[FaultProxy]:  # noqa: F811
    with FaultProxy(s3_endpoint, max_seconds=300, max_requests=50000) as p:
        yield p


@pytest.fixture
def run(s3_url: str) -> Iterator[str]:  # noqa: F811
    """The run's URL; afterwards no keeper and no hot memory are left behind."""
    yield s3_url
    pid = keeper_pid(s3_url)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(hot_dir(s3_url), ignore_errors=True)


# ---- 1. the connection cut during a background copy -----------------------------------------------


def test_a_cut_during_a_background_copy_leaves_training_running_and_nothing_torn(
    run: str, proxy: FaultProxy, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    bucket = open_storage(run)  # around the proxy
    t = Trainer(run, proxy, durable_every=0.3)
    try:
        t.train(2)
        wait_until(lambda: t.step in committed(bucket), 30, "the newest step copied down", tick=lambda: time.sleep(0.1))
        before = committed(bucket)
        # The next copy's model upload reaches the server, then hangs (the response is held back)...
        proxy.add(Fault("delay", "PUT", "model.safetensors", seconds=30))
        wait_until(lambda: bool(proxy.actions("delay")), 30, "a copy in flight", tick=lambda: t.train())
        cut = proxy.actions("delay")[0][1]  # .../step-NNNNNNNNN/model.safetensors
        cut_name = cut.split("/")[-2]
        # ...and the network goes: the open connection is reset, new ones are refused.
        proxy.down(NEVER)
        caplog.set_level(logging.INFO, logger="ckptguard")
        cut_at = len(t.blocked)
        wait_until(lambda: "to the durable tier" in caplog.text and "Could not copy" in caplog.text, 60,
                   "the copier to log the failed copy", tick=lambda: t.train())
        t.train(5)
        during = t.blocked[cut_at:]
        assert len(during) >= 5
        assert max(during) < 1.5, f"hot saves blocked by the network: {[round(x, 3) for x in during]}"
        t.mgr.wait()
        assert hot_steps(run)[-1] == t.step  # training went on: the hot tier has the newest step
        # Nothing torn: the bucket's committed checkpoints are the complete ones from before the cut;
        # the cut copy is debris (its data file landed, its manifest never did), which verify and ls
        # name as such, never as a checkpoint.
        assert committed(bucket) == before
        assert cut_name in find_debris(bucket), (cut_name, bucket.listdir(""))
        assert_only_debris(cg.verify(run), before, [cut_name])
        code, out = cli(capsys, "verify", run)
        assert code == 1 and "debris of an interrupted save" in out, out  # exit 0 only if all is sound
        code, out = cli(capsys, "ls", run, "--json")
        assert code == 0, out
        listing = json.loads(out[out.index("{"):])
        assert [r["step"] for r in listing["checkpoints"] if "durable" in r["tiers"]] == before, listing
        assert t.step in [r["step"] for r in listing["checkpoints"] if "hot" in r["tiers"]], listing
        assert cut_name in listing["debris"], listing
        # The network comes back: the next due copy lands the newest checkpoint.
        proxy.clear()
        proxy.up()
        back = t.step
        wait_until(lambda: max(committed(bucket)) > back, 60, "a copy after the network came back",
                   tick=lambda: t.train())
    finally:
        proxy.up()
        t.mgr.close()  # safe to call twice
    assert committed(bucket)[-1] == t.step  # close() copied the newest down
    assert_only_debris(cg.verify(run), committed(bucket), [cut_name])
    assert not os.path.exists(hot_dir(run))  # a clean end frees the memory




@full_only
def test_hot_saves_are_not_blocked_by_the_run_lock_heartbeat_while_the_network_is_cut(run: str, proxy: FaultProxy) -> None:
    """Every save() calls RunLock.acquire(), which returns at once while the lock is held: it never waits
    on a heartbeat that is waiting on the store (those round trips run outside the lock's mutex)."""
    t = Trainer(run, proxy, durable_every=NEVER, lock=cg.LockPolicy(stale_after=60.0, heartbeat_seconds=0.5))
    try:
        t.train(2)
        t.mgr.wait()
        # A cut that drops packets: every request for the run lock hangs (until the client's timeout).
        proxy.add(Fault("delay", None, ".ckptguard.run.lock", seconds=4.0, times=10**6))
        cut_at = len(t.blocked)
        deadline = time.monotonic() + 6.0  # a heartbeat or two
        while time.monotonic() < deadline:
            t.train()
            time.sleep(0.05)
        during = t.blocked[cut_at:]
        assert max(during) < 1.5, f"hot saves blocked by the network: max {max(during):.2f}s of {len(during)} saves"
    finally:
        proxy.clear()
        t.mgr.close()




@full_only
def test_the_debris_of_a_cut_copy_goes_with_the_next_copy_there(
    run: str, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """A failed copy leaves its tier to be cleaned again (Tier.cleaned): the next copy there removes the
    cut copy's leftovers, not only the first copy of the process."""
    bucket = open_storage(run)
    t = Trainer(run, proxy, durable_every=0.3)
    try:
        t.train(2)
        wait_until(lambda: t.step in committed(bucket), 30, "the newest step copied down", tick=lambda: time.sleep(0.1))
        cut = Fault("reset_before", "PUT", "model.safetensors", times=10**6)  # every upload of the weights cut
        proxy.add(cut)
        wait_until(lambda: "Could not copy" in caplog.text and bool(find_debris(bucket)), 60, "a cut copy",
                   tick=lambda: t.train())
        t.train(3)  # the newest moves on: the next copy is another step
        proxy.clear()
        back = t.step
        wait_until(lambda: max(committed(bucket)) >= back, 60, "a copy after the network came back",
                   tick=lambda: time.sleep(0.1))
    finally:
        proxy.clear()
        t.mgr.close()
    assert committed(bucket)[-1] == t.step
    assert find_debris(bucket) == []  # the next copy there cleaned what the cut one left
    assert cg.verify(run).ok




@full_only
def test_a_flaky_network_never_uncommits_a_checkpoint_the_durable_tier_holds(run: str, proxy: FaultProxy) -> None:
    """A manifest read that fails is no answer to "the same checkpoint?" (same_checkpoint raises), and a
    copy never begins a step again (which deletes its committed MANIFEST.json first on an object
    store) over a manifest it could not read."""
    bucket = open_storage(run)
    t = Trainer(run, proxy, durable_every=0.3)
    t.train(3)
    t.mgr.wait()
    wait_until(lambda: 3 in committed(bucket), 30, "step 3 in the durable tier", tick=lambda: time.sleep(0.1))
    with pytest.raises(RuntimeError), t.mgr:  # the user's code fails; the memory stays for a restart
        raise RuntimeError("the user's code fails")
    t2 = Trainer(run, proxy, durable_every=NEVER)
    assert t2.mgr.restore(t2.state) == 3  # from memory; the durable tier has the same checkpoint
    # The network turns flaky: reads of that manifest fail, and so does every upload of the weights.
    proxy.add(Fault("reset_before", "GET", "step-000000003/MANIFEST.json", times=10**6),
              Fault("reset_before", "PUT", "model.safetensors", times=10**6))
    err, _ = close_bounded(t2.mgr, CLOSE_LIMIT)  # the copy down at close() fails...
    proxy.clear()
    assert 3 in committed(bucket), f"the durable tier lost step 3 (close() raised {err!r})"  # ...and uncommits nothing




@full_only
def test_a_failed_read_of_the_run_record_never_erases_its_sessions(run: str, proxy: FaultProxy) -> None:
    """A run record the store failed to read is not an absent one: RunRecord.write skips that write
    (and merges its fields into the next) instead of replacing ckptguard.json with this session alone."""
    bucket = open_storage(run)

    def sessions() -> int:
        return len(json.loads(bucket.read_bytes("ckptguard.json"))["sessions"])

    t = Trainer(run, proxy, durable_every=NEVER)
    t.train(2)
    t.mgr.close()
    assert sessions() == 1
    t2 = Trainer(run, proxy, durable_every=NEVER)
    assert t2.mgr.restore(t2.state) == 2
    proxy.add(Fault("reset_before", "HEAD", "ckptguard.json", times=10**6))  # reads of the record fail, writes pass
    t2.train(1)  # its first save records this session in the durable tier
    proxy.clear()
    t2.mgr.close()
    assert sessions() == 2


# ---- 2. close() while the network is cut ----------------------------------------------------------


def test_close_while_cut_raises_a_clear_error_keeps_the_memory_and_a_restart_restores_it(
    run: str, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = open_storage(run)
    t = Trainer(run, proxy, durable_every=NEVER)
    t.train(5)
    t.mgr.wait()
    weights = t.model.weight.detach().clone()
    proxy.down(NEVER)
    err, seconds = close_bounded(t.mgr, CLOSE_LIMIT)
    assert isinstance(err, cg.CheckpointError), f"close() raised {err!r} after {seconds:.1f}s, not a CheckpointError"
    assert type(err).__module__.startswith("ckptguard."), repr(err)  # never botocore's own
    message = str(err)
    assert bucket.url in message, message  # the durable tier's URL
    assert "durable tier" in message and "hot memory is kept" in message, message  # and what happens next
    assert hot_steps(run) == [5]  # the hot memory is kept...
    assert keeper_pid(run) is not None  # ...with its keeper (it persists it if nobody restores)
    assert 5 not in committed(bucket)
    # The trainer restarts (the network is back): the newest step comes from memory.
    proxy.up()
    caplog.set_level(logging.INFO, logger="ckptguard")
    t2 = Trainer(run, proxy, durable_every=NEVER)
    assert t2.mgr.restore(t2.state) == 5
    assert "Restored step 5 from the hot tier" in caplog.text
    assert torch.equal(t2.model.weight, weights)
    t2.mgr.close()
    assert committed(bucket)[-1] == 5


def test_close_while_cut_tries_the_durable_tier_once_and_skips_its_bookkeeping(
    run: str, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """With the S3 client's default retries one unreachable request costs ~30 s: close() tries the
    durable tier once (the copy down), then skips metrics.csv, the run record and the lock's
    removal, saying so, instead of waiting out four requests (175 s before the fix)."""
    bucket = open_storage(run)
    t = Trainer(run, proxy, durable_every=NEVER)
    t.train(3)
    t.mgr.wait()
    proxy.add(Fault("reset_before", None, "", times=10**6))  # every request to the store is cut
    caplog.set_level(logging.INFO, logger="ckptguard")
    err, _ = close_bounded(t.mgr, CLOSE_LIMIT)
    tried = proxy.actions("reset_before")
    proxy.clear()
    assert isinstance(err, cg.CheckpointError) and "hot memory is kept" in str(err), repr(err)
    assert len(set(tried)) == 1, f"close() tried {len(set(tried))} requests with the store unreachable: {sorted(set(tried))}"
    assert "close() skipped metrics.csv, the run record and the run lock's removal" in caplog.text
    assert hot_steps(run) == [3]
    # The lock left in the bucket does not stand in the way of the next writer (here: this process).
    t2 = Trainer(run, proxy, durable_every=NEVER)
    assert t2.mgr.restore(t2.state) == 3
    t2.step = 3
    t2.train(1)
    t2.mgr.close()
    assert committed(bucket)[-1] == 4


# ---- 3. the keeper's "persist at breakpoint" while the network is cut ----------------------------

CHILD = r"""
import json, sys, time
import torch
import ckptguard as cg
from ckptguard.tiers import Tiers

url, options, grace = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
torch.manual_seed(0)
model = torch.nn.Linear(256, 256)
state = cg.TrainState(model=model, optimizer=None, extra={"step": 0})
mgr = cg.CheckpointManager(url, storage_options=options, every_steps=1,
                           tiers=Tiers(durable_every_seconds=1e9, grace_seconds=grace))
step = mgr.restore(state) or 0
while True:
    step += 1
    with torch.no_grad():
        model.weight.add_(0.01)
    state.extra["step"] = step
    mgr.save(step, state)
    print("SAVED", step, flush=True)
    time.sleep(0.05)
"""


class Child:
    """The trainer in a process of its own (SIGKILLed by the test), its SAVED lines collected."""

    def __init__(self, url: str, proxy: FaultProxy, grace: float) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, url, json.dumps(via(proxy)), str(grace)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env())
        self.lines: list[str] = []
        self.saved = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("SAVED"):
                self.saved = int(line.split()[1])

    def wait_saved(self, step: int, timeout: float = 120.0) -> None:
        wait_until(lambda: self.saved >= step or self.proc.poll() is not None, timeout, f"step {step} saved")
        assert self.saved >= step, "\n".join(self.lines[-30:])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=10)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


GRACE = 1.0


def killed_while_cut(run: str, proxy: FaultProxy, cut: Callable[[], None]) -> int:
    """A child trainer saves a few steps (network up), the network is cut (``cut``), it saves a
    few more (training goes on), then it is SIGKILLed; return the newest step in memory."""
    c = Child(run, proxy, GRACE)
    try:
        c.wait_saved(3)
        cut()
        at = c.saved
        c.wait_saved(at + 3)  # hot saves go on with the durable tier cut off
    finally:
        c.kill()
    newest = hot_steps(run)[-1]
    assert newest >= at + 3
    return newest




@full_only
def test_the_keeper_keeps_the_memory_while_the_network_is_down_and_persists_when_it_is_back(
    run: str, proxy: FaultProxy
) -> None:
    """The store unreachable at the breakpoint (scan, run lock): the keeper says so in a sentence, keeps
    the memory, tries again with a growing pause (no spinning) and persists once it can."""
    bucket = open_storage(run)
    newest = killed_while_cut(run, proxy, lambda: proxy.down(NEVER))
    # Past the grace the keeper tries the durable tier (retries: seconds) and cannot reach it.
    wait_until(lambda: keeper_pid(run) is None or "persist" in keeper_log(run).lower(), 40,
               "the keeper's try at the breakpoint")
    settle(lambda: keeper_pid(run) is None, 3.0)  # a keeper that failed exits
    log = keeper_log(run)
    assert newest in hot_steps(run), log  # the hot copy is not lost...
    assert newest not in committed(bucket)
    pid = keeper_pid(run)
    assert pid is not None, f"the keeper is gone and nobody will persist step {newest}:\n{log[-2000:]}"
    assert "Traceback" not in log, log[-2000:]  # ...it says why, in a sentence, and keeps trying
    cpu = cpu_seconds(pid)
    time.sleep(2.0)
    assert cpu_seconds(pid) - cpu < 1.0, "the keeper spins while it waits for the network"
    proxy.up()  # the network is back: the keeper's next try persists the newest step
    wait_until(lambda: not os.path.exists(hot_dir(run)) and keeper_pid(run) is None, 60,
               "the keeper to persist and free the memory")
    assert committed(bucket)[-1] == newest
    assert {"event": "persisted", "step": newest} in [{k: e.get(k) for k in ("event", "step")} for e in history(bucket)]




def test_a_copy_cut_at_the_breakpoint_never_frees_the_memory(run: str, proxy: FaultProxy) -> None:
    """Only a hot copy that fails its own checksums gives way to an older one: a durable copy that failed
    means "not persisted now", and the keeper keeps the memory."""
    bucket = open_storage(run)
    # Listings and the run lock still get through; every upload of the weights is cut.
    newest = killed_while_cut(run, proxy, lambda: proxy.add(Fault("reset_before", "PUT", "model.safetensors", times=10**6)))
    wait_until(lambda: keeper_pid(run) is None or "could not persist" in keeper_log(run).lower(), 60,
               "the keeper's try at the breakpoint")
    settle(lambda: keeper_pid(run) is None or not os.path.exists(hot_dir(run)), 5.0)  # what it does next
    assert newest in hot_steps(run) or newest in committed(bucket), (
        f"step {newest} is lost: not in memory ({hot_steps(run)}), not in the bucket ({committed(bucket)})"
    )




@full_only
def test_a_restart_while_the_network_is_still_cut_restores_from_memory(run: str, proxy: FaultProxy) -> None:
    """TierSet.listing() lists the faster tiers when the durable tier cannot be read (none of their
    copies taken for another run's on that evidence), so a restart during an outage restores from memory."""
    t = Trainer(run, proxy, durable_every=NEVER)
    t.train(5)
    t.mgr.wait()
    weights = t.model.weight.detach().clone()
    proxy.down(NEVER)
    with pytest.raises(RuntimeError), t.mgr:  # the user's code fails; the memory stays for a restart
        raise RuntimeError("the user's code fails")
    assert hot_steps(run) == [5]
    t2 = Trainer(run, proxy, durable_every=NEVER)  # the restart, the object store still unreachable
    try:
        assert t2.mgr.restore(t2.state) == 5
        assert torch.equal(t2.model.weight, weights)
    finally:
        proxy.up()
        t2.mgr.close()
