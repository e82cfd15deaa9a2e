"""Tiered checkpoints (ckptguard.tiers): a spot-instance user's loop (tests/clients/spot_tiers.py)
with hot memory kept by a keeper process, a node-local directory and the durable run directory;
real processes, real SIGKILLs and SIGTERMs, real tmpfs (/dev/shm), a real S3-protocol server.

Every way a tiered run can end is pinned here: a kill at random moments (the restart restores from
memory, bit-exact), a kill inside a tier copy (no torn checkpoint anywhere), no restart at all (the
keeper persists the newest copy and frees the memory), SIGTERM to the node (persisted before exit),
the keeper killed (replaced), both killed (the next trainer restores from memory), a damaged hot
copy (the next tier), a clean end (no process, no memory left).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptguard as cg
from ckptguard.run.catalog import scan
from ckptguard.run.lockholder import pid_alive
from ckptguard.storage import open_storage
from ckptguard.tiers import Tiers
from ckptguard.tiers.options import hot_root
from conftest import FULL
from s3_fixture import s3_endpoint, s3_url  # noqa: F401 - fixtures

CLIENT = Path(__file__).parent / "clients" / "spot_tiers.py"


def child_env() -> dict[str, str]:
    """The environment now (the S3 fixture sets the server's address after import)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}


def hot_dir(run: str) -> str:
    return hot_root("/dev/shm", open_storage(run).url)


def keeper_pid(run: str) -> int | None:
    try:
        with open(os.path.join(hot_dir(run), ".keeper", "keeper.json")) as f:
            pid = json.load(f)["pid"]
    except (OSError, ValueError, KeyError):
        return None
    return pid if isinstance(pid, int) and pid_alive(pid) else None


class Client:
    """One run of the client, its output lines collected as they come."""

    def __init__(self, run: str, local: str, out: str, total: int, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(CLIENT), run, local, out, str(total), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env(),
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, prefix: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines:
                if line.startswith(prefix):
                    return line
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.02)
        raise AssertionError(f"no {prefix!r} line; output:\n" + "\n".join(self.lines[-40:]))

    def finish(self, timeout: float = 180.0) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def kill(self) -> None:
        self.proc.kill()
        self.finish()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


def restored(c: Client) -> tuple[int, str]:
    _, step, tier = c.wait_for("RESTORED").split()
    return int(step), tier


def final_state(path: str) -> dict[str, Any]:
    return torch.load(path, weights_only=True)


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    flat_a = {f"{k}.{n}": v for k, d in a.items() for n, v in _flatten(d)}
    flat_b = {f"{k}.{n}": v for k, d in b.items() for n, v in _flatten(d)}
    assert flat_a.keys() == flat_b.keys()
    different = [k for k in flat_a if not torch.equal(flat_a[k], flat_b[k])]
    assert not different, f"not bit-identical: {different[:5]}"


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    if isinstance(d, torch.Tensor):
        return [(prefix, d)]
    if isinstance(d, dict):
        return [x for k, v in d.items() for x in _flatten(v, f"{prefix}.{k}")]
    return [(prefix, torch.tensor(float(d)))]


def wait_until(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def keeper_debug(run: str) -> str:
    d = Path(hot_dir(run))
    parts = [str(sorted(os.listdir(d))) if d.is_dir() else "no hot dir"]
    for name in ("keeper.json", "trainer.json", "log"):
        f = d / ".keeper" / name
        parts.append(f"{name}: {f.read_text()[-800:] if f.exists() else '-'}")
    return "\n".join(parts)


def newest_hot(run: str) -> int:
    try:
        return max([x.step for x in scan(open_storage(hot_dir(run))) if x.valid], default=0)
    except cg.CheckpointError:
        return 0


def gone(run: str) -> bool:
    return not os.path.exists(hot_dir(run)) and keeper_pid(run) is None


@pytest.fixture
def paths(tmp_path: Path) -> Any:
    run, local = str(tmp_path / "run"), str(tmp_path / "local")
    yield run, local, tmp_path
    pid = keeper_pid(run)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    shutil.rmtree(hot_dir(run), ignore_errors=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Uninterrupted runs of the client, by model width (its final state)."""
    cache: dict[int, dict[str, Any]] = {}

    def get(total: int, hidden: int = 256) -> dict[str, Any]:
        if (total, hidden) not in cache:
            d = tmp_path_factory.mktemp(f"ref{total}-{hidden}")
            c = Client(str(d / "run"), str(d / "local"), str(d / "out.pt"), total, "--hidden", str(hidden))
            assert c.finish() == 0, c.output
            assert gone(str(d / "run"))
            cache[(total, hidden)] = final_state(str(d / "out.pt"))
        return cache[(total, hidden)]

    return get


def verify_ok(*dirs: str) -> None:
    for d in dirs:
        r = subprocess.run([sys.executable, "-m", "ckptguard", "verify", d], capture_output=True, text=True, env=child_env(), timeout=120)
        assert r.returncode == 0, (d, r.stdout, r.stderr)


# ---- the trainer killed at random moments ------------------------------------------------------


@pytest.mark.parametrize("seed", range(3 if FULL else 1))
def test_killed_at_random_moments_resumes_bit_exact_from_memory(paths: Any, reference: Any, seed: int) -> None:
    run, local, tmp = paths
    rng = random.Random(seed)
    total, kills, from_hot = 160, 0, 0
    while True:
        c = Client(run, local, str(tmp / "out.pt"), total)
        step, tier = restored(c)
        if step:
            # the hot tier holds the newest committed checkpoint: a restart restores from memory
            assert tier == "hot", c.output
            from_hot += 1
        if kills == (3 if FULL else 2):  # each kill a restart of Python + torch: 2 by default
            assert c.finish() == 0, c.output
            break
        wait_until(lambda c=c, step=step: c.proc.poll() is not None or newest_hot(run) > step, 120, "a hot save of this session")
        time.sleep(rng.uniform(0.0, 1.5))  # anywhere: mid-step, inside a hot save, inside a copy
        c.kill()
        if any(line.startswith("DONE") for line in c.lines):
            break  # it finished before the kill (a fast machine)
        kills += 1
        assert keeper_pid(run) is not None, ("the keeper died with the trainer", keeper_debug(run), c.output)
    assert from_hot >= 1
    assert kills >= 1
    assert_same(final_state(str(tmp / "out.pt")), reference(total))
    wait_until(lambda: gone(run), 15, "the keeper to exit and the memory to be freed after the clean end")
    verify_ok(run, local)
    newest = max(c.step for c in scan(open_storage(run)) if c.valid)
    assert newest == total  # close() copied the last checkpoint down


def test_kill_inside_a_tier_copy_leaves_no_torn_checkpoint(paths: Any, reference: Any) -> None:
    run, local, tmp = paths
    hidden, total = 20000, 24  # ~5 MB of weights: copies take long enough to be caught
    c = Client(run, local, str(tmp / "out.pt"), total, "--hidden", str(hidden), "--durable-every", "0.5")
    restored(c)
    caught = None
    deadline = time.monotonic() + 120
    while caught is None and time.monotonic() < deadline and c.proc.poll() is None:
        for d in (local, run):
            if os.path.isdir(d) and any(n.startswith(".tmp-step-") for n in os.listdir(d)):
                caught = d
                break
    c.kill()
    assert caught is not None, "never saw a tier copy in flight"
    for d in (local, run):  # no torn checkpoint: every committed copy verifies
        if os.path.isdir(d):
            assert all(x.valid for x in scan(open_storage(d))), d
    c = Client(run, local, str(tmp / "out.pt"), total, "--hidden", str(hidden), "--durable-every", "0.5")
    step, tier = restored(c)
    assert step == 0 or tier == "hot"
    assert c.finish() == 0, c.output
    assert_same(final_state(str(tmp / "out.pt")), reference(total, hidden))
    verify_ok(run, local)
    for d in (local, run):  # the debris of the cut copy was cleaned by the next copy there
        assert not [n for n in os.listdir(d) if n.startswith((".tmp-", ".trash-"))], os.listdir(d)


# ---- the keeper: persist at breakpoint, supervision, clean ends ---------------------------------


def test_no_restart_within_grace_persists_the_newest_hot_copy_and_frees_memory(paths: Any) -> None:
    run, local, tmp = paths
    c = Client(run, local, str(tmp / "out.pt"), 40, "--kill-at", "17", "--grace", "4", "--durable-every", "1000")
    assert c.proc.wait(timeout=120) == -signal.SIGKILL
    assert keeper_pid(run) is not None and os.path.isdir(hot_dir(run))  # the memory outlives the trainer
    durable = open_storage(run)
    assert all(x.step < 16 for x in scan(durable))  # the durable tier did not have it
    c.finish()
    wait_until(lambda: gone(run), 30, "the keeper to persist and exit")
    assert max(x.step for x in scan(durable) if x.valid) == 16  # the newest committed hot checkpoint
    events = [json.loads(line) for line in Path(run, "history.jsonl").read_text().splitlines()]
    assert {"event": "persisted", "step": 16} in [{k: e[k] for k in ("event", "step")} for e in events]
    verify_ok(run, local)


def test_sigterm_to_the_node_persists_the_newest_before_exit(paths: Any) -> None:
    run, local, tmp = paths
    c = Client(run, local, str(tmp / "out.pt"), 4000, "--durable-every", "1000")
    restored(c)
    wait_until(lambda: any(x.step >= 10 for x in scan(open_storage(hot_dir(run)))), 60, "a few hot saves")
    keeper = keeper_pid(run)
    assert keeper is not None
    c.proc.send_signal(signal.SIGTERM)  # a node shutdown signals every process
    os.kill(keeper, signal.SIGTERM)
    code = c.finish()
    assert code not in (0, -signal.SIGTERM), c.output  # the preemption guard saved, then exited
    wait_until(lambda: gone(run), 40, "the keeper to exit after the trainer")
    durable_steps = [x.step for x in scan(open_storage(run)) if x.valid]
    assert durable_steps and max(durable_steps) >= 10
    saved = [x for x in scan(open_storage(run)) if x.valid][-1]
    assert (saved.manifest or {}).get("reason") == "preemption", saved.manifest
    verify_ok(run, local)


@pytest.mark.skipif(not FULL, reason="sampled out: CKPTGUARD_TEST_FULL=1 runs it")
def test_a_killed_keeper_is_replaced_and_the_run_ends_clean(paths: Any, reference: Any) -> None:
    run, local, tmp = paths
    c = Client(run, local, str(tmp / "out.pt"), 160)
    restored(c)
    wait_until(lambda: keeper_pid(run) is not None, 60, "the keeper")
    first = keeper_pid(run)
    assert first is not None
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: keeper_pid(run) not in (None, first) or c.proc.poll() is not None, 60, "a new keeper")
    assert c.finish() == 0, c.output
    assert_same(final_state(str(tmp / "out.pt")), reference(160))  # the replacement changed nothing
    wait_until(lambda: gone(run), 15, "no keeper and no memory after the clean end")


@pytest.mark.skipif(not FULL, reason="sampled out: CKPTGUARD_TEST_FULL=1 runs it")
def test_keeper_and_trainer_both_killed_the_next_trainer_restores_from_memory(paths: Any, reference: Any) -> None:
    run, local, tmp = paths
    c = Client(run, local, str(tmp / "out.pt"), 160)
    restored(c)
    wait_until(lambda: keeper_pid(run) is not None and any(x.step >= 12 for x in scan(open_storage(hot_dir(run)))), 60, "saves")
    pid = keeper_pid(run)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    c.kill()
    newest = max(x.step for x in scan(open_storage(hot_dir(run))) if x.valid)
    c = Client(run, local, str(tmp / "out.pt"), 160)
    assert restored(c) == (newest, "hot")  # the memory outlived both; a new keeper owns it now
    assert c.finish() == 0, c.output
    assert_same(final_state(str(tmp / "out.pt")), reference(160))
    wait_until(lambda: gone(run), 15, "no keeper and no memory after the clean end")


def test_a_damaged_hot_copy_falls_back_to_the_next_tier(paths: Any) -> None:
    run, local, tmp = paths
    c = Client(run, local, str(tmp / "out.pt"), 40, "--kill-at", "21", "--durable-every", "0.2")
    assert c.finish() == -signal.SIGKILL
    hot = open_storage(hot_dir(run))
    newest = [x for x in scan(hot) if x.valid][-1]
    tensors = next(n for n, e in (newest.manifest or {})["files"].items() if e["kind"] == "tensors")
    path = Path(hot_dir(run), newest.name, tensors)
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the weights
    path.write_bytes(bytes(data))
    # the other sound copies, fastest tier first (a kill between a commit and the hot tier's trim
    # leaves an older hot copy too: a sound, older step from memory is a right answer)
    sound = [(x.step, "hot") for x in scan(hot) if x.valid and x.step != newest.step]
    sound += [(x.step, name) for name, d in (("local", local), ("durable", run)) for x in scan(open_storage(d)) if x.valid]
    want_step = newest.step if any(s == newest.step for s, _ in sound) else max(s for s, _ in sound)
    want_tier = next(name for s, name in sound if s == want_step)
    c = Client(run, local, str(tmp / "out.pt"), 24)
    assert restored(c) == (want_step, want_tier)  # never the damaged copy
    assert c.finish() == 0, c.output


# ---- listing, options, endings in one process ----------------------------------------------------


@pytest.mark.skipif(not FULL, reason="sampled out: CKPTGUARD_TEST_FULL=1 runs it")
def test_ls_shows_the_tiers_of_each_checkpoint(paths: Any) -> None:
    run, local, tmp = paths
    c = Client(run, local, str(tmp / "out.pt"), 40, "--kill-at", "25", "--durable-every", "1000")
    assert c.finish() == -signal.SIGKILL
    r = subprocess.run([sys.executable, "-m", "ckptguard", "ls", run, "--json"], capture_output=True, text=True, env=child_env(), timeout=60)
    assert r.returncode == 0, r.stderr
    rows = {x["step"]: x["tiers"] for x in json.loads(r.stdout)["checkpoints"]}
    assert rows[24] == ["hot"]  # only in memory: the durable tier's cadence had not come
    assert any(t == ["local"] for t in rows.values())
    r = subprocess.run([sys.executable, "-m", "ckptguard", "ls", run], capture_output=True, text=True, env=child_env(), timeout=60)
    assert "tiers" in r.stdout and "hot" in r.stdout


def test_tiers_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs local="):
        Tiers(hot=False)
    with pytest.raises(ValueError, match="seconds .* or 'auto'"):
        Tiers(durable_every_seconds="often")
    with pytest.raises(ValueError, match="local_every_seconds"):
        Tiers(local=str(tmp_path), local_every_seconds=0)
    with pytest.raises(ValueError, match="node-local directory"):
        Tiers(local="s3://bucket/x")
    with pytest.raises(ValueError, match="hot_keep"):
        Tiers(hot_keep=0)
    with pytest.raises(ValueError, match="memory_dir"):
        Tiers(memory_dir=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="incremental"):
        cg.CheckpointManager(tmp_path / "run", tiers=Tiers(), incremental=True)
    with pytest.raises(TypeError, match="Tiers"):
        cg.CheckpointManager(tmp_path / "run", tiers={"hot": True})  # type: ignore[arg-type]


@pytest.mark.skipif(not FULL, reason="sampled out: CKPTGUARD_TEST_FULL=1 runs it")
def test_durable_tier_on_an_object_store_and_the_keeper_persists_there(paths: Any, s3_url: str) -> None:  # noqa: F811
    _, local, tmp = paths
    run = s3_url
    try:
        c = Client(run, local, str(tmp / "out.pt"), 40, "--kill-at", "13", "--grace", "2", "--durable-every", "0.3")
        assert c.proc.wait(timeout=120) == -signal.SIGKILL, (c.finish(), c.output)
        wait_until(lambda: gone(run), 40, "the keeper to persist to the object store and exit")
        c.finish()
        durable = open_storage(run)
        steps = [x.step for x in scan(durable) if x.valid]
        assert max(steps) == 12, steps  # the newest hot checkpoint reached S3 through the keeper
        c = Client(run, local, str(tmp / "out.pt"), 20)
        assert restored(c) == (12, "local")  # the keeper copied it to the local tier as well
        assert c.finish() == 0, c.output
        assert max(x.step for x in scan(durable) if x.valid) == 20
        verify_ok(run)
    finally:
        pid = keeper_pid(run)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(hot_dir(run), ignore_errors=True)


@pytest.mark.skipif(not FULL, reason="sampled out: CKPTGUARD_TEST_FULL=1 runs it")
def test_every_auto_per_tier_follows_young_daly_from_the_measured_copy_cost(paths: Any) -> None:
    run, local, tmp = paths
    c = Client(run, local, str(tmp / "out.pt"), 40, "--durable-every", "auto")
    assert c.finish() == 0, c.output
    record = json.loads(Path(run, "ckptguard.json").read_text())
    durable = next(t for t in record["tiers"]["tiers"] if t["name"] == "durable")
    assert durable["mode"] == "auto"
    cost, mtbf = durable["save_cost_seconds"], 3600.0  # the client gives mtbf_seconds=3600
    assert cost is not None and cost > 0
    assert durable["auto_seconds"] == pytest.approx((2 * cost * mtbf) ** 0.5, rel=1e-3)  # sqrt(2 C M)
    assert [t["name"] for t in record["tiers"]["tiers"]] == ["hot", "local", "durable"]


@pytest.mark.skipif(not FULL, reason="sampled out: CKPTGUARD_TEST_FULL=1 runs it")
def test_a_second_process_on_a_live_tiered_run_reads_but_cannot_save_or_free_it(paths: Any, reference: Any) -> None:
    run, local, tmp = paths
    c = Client(run, local, str(tmp / "out.pt"), 160)
    restored(c)
    wait_until(lambda: keeper_pid(run) is not None and any(x.valid for x in scan(open_storage(hot_dir(run)))), 60, "hot saves")
    other = cg.CheckpointManager(run, tiers=Tiers(local=local))
    assert other.checkpoints()  # it can list (and restore) what the tiers hold
    state = cg.TrainState(model=torch.nn.Linear(2, 2))
    with pytest.raises(cg.RunLockedError, match=f"pid {c.proc.pid}"):
        other.save(1, state, force=True)
    other.close()  # a reader's clean close copies nothing and frees nothing
    assert os.path.isdir(hot_dir(run)) and keeper_pid(run) is not None
    assert c.finish() == 0, c.output
    assert_same(final_state(str(tmp / "out.pt")), reference(160))
    wait_until(lambda: gone(run), 15, "no keeper and no memory after the clean end")
