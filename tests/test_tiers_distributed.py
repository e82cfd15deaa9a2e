"""Tiers in a torch.distributed run: every node keeps the whole checkpoint in its own memory.

Two "nodes" on one machine (two ``torchrun`` agents, ``--nnodes=2``, c10d rendezvous on
127.0.0.1), each with its own ``memory_dir`` (a directory of /dev/shm) and local directory, as two
machines would have; the durable tier is the run directory and gets no copy during the run
(``durable_every_seconds=3600``). The program is the user-shaped tests/dist_scripts/elastic_train.py
with ``--tiers``.

- A node is lost as a preempted machine is (one rank per node): its agent, worker and keeper
  SIGKILLed, its memory and local directory gone, a fresh node in its place. Only the surviving
  node's memory holds the newest checkpoint; the fresh node receives it, and the run ends bit-exact
  with an uninterrupted one.
- Two ranks per node (a node's leader and a member sharing its memory): the whole job dies, one
  node's hot copy is damaged before the restart; the ranks fall back together to the other node's
  copy of the same step (sent over), and the run ends bit-exact with an uninterrupted one (DDP with
  ``find_unused_parameters=True``, as the README says 3+ ranks need; make test-full).
- Every ending of a distributed tiered restore, on two nodes of two ranks (one program, a phase per
  ending): fresh, from memory, a model today's code changed (StateMismatchError), a step no tier holds, a copy damaged on one node, a copy only on the
  other node, the newest damaged everywhere, everything damaged, only the durable tier after a clean end.
- SIGTERM to one node's worker (make test-full): the preemption save reaches the durable tier.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from conftest import FULL
from test_elastic import EVERY, _assert_same_as_reference, _attempts, _env, _finish, _free_port, _max_step, _torchrun

pytestmark = [pytest.mark.xdist_group("dist")]


def _two_nodes(nproc: int, restarts: int = 2) -> list[str]:
    port, rdzv = _free_port(), f"tiers-{uuid.uuid4().hex[:8]}"
    return ["--nnodes=2", f"--nproc-per-node={nproc}", f"--max-restarts={restarts}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id={rdzv}"]


@pytest.fixture(scope="module")
def reference2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-rank run (DDP, synchronous saves, no tiers)."""
    base = tmp_path_factory.mktemp("tiers-dist-ref2")
    code, text = _finish(_torchrun(["--standalone", "--nproc-per-node=2"], base / "run", base / "out"))
    assert code == 0, text[-4000:]
    return base / "out"


@pytest.fixture(scope="module")
def reference2_fsdp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-rank FSDP2 run (synchronous saves, no tiers)."""
    base = tmp_path_factory.mktemp("tiers-dist-ref2-fsdp")
    code, text = _finish(_torchrun(["--standalone", "--nproc-per-node=2"], base / "run", base / "out", "--fsdp"))
    assert code == 0, text[-4000:]
    return base / "out"


@pytest.fixture(scope="module")
def reference4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run on two "nodes" of two ranks without tiers, DDP with
    ``find_unused_parameters=True`` (what a bit-exact resume on 3+ ranks needs: see the README)."""
    base = tmp_path_factory.mktemp("tiers-dist-ref4")
    launch = _two_nodes(2)
    agents = [_torchrun(launch, base / "run", base / "out", "--find-unused") for _ in range(2)]
    results = [_finish(a) for a in agents]
    assert [code for code, _ in results] == [0, 0], "\n".join(text[-3000:] for _, text in results)
    return base / "out"


@pytest.fixture
def shm() -> Iterator[Path]:
    """The "nodes'" memory: a directory of /dev/shm, removed (with any keeper left) afterwards."""
    root = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="cg-dist-tiers-"))
    yield root
    for p in psutil.process_iter(["cmdline"]):
        if any(str(root) in arg for arg in p.info["cmdline"] or []):
            p.kill()
    shutil.rmtree(root, ignore_errors=True)


def _keepers(root: Path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if "ckptguard.tiers.keeper" in cmd and any(str(root) in arg for arg in cmd):
            out.append(p)
    return out


class Nodes:
    """Two-node launches of the training program, each "node" with its own memory and disk."""

    def __init__(self, tmp: Path, shm: Path, *args: str, nproc: int, restarts: int = 2) -> None:
        self.tmp, self.shm, self.args, self.nproc = tmp, shm, args, nproc
        self.run, self.out = tmp / "run", tmp / "out"
        self.launch = _two_nodes(nproc, restarts)

    def start(self, i: int, *, local: bool = True) -> subprocess.Popen[str]:
        memory = self.shm / f"node{i}"
        memory.mkdir(exist_ok=True)
        env = _env(NODE_SHM=str(memory), NODE_LOCAL=str(self.tmp / f"local{i}") if local else "", DURABLE_EVERY="3600",
                   TMPDIR=str(self.tmp))
        return _torchrun(self.launch, self.run, self.out, "--tiers", *self.args, env=env)

    def lose(self, i: int, agent: subprocess.Popen[str]) -> None:
        """Node ``i`` is gone: its agent, workers and keeper SIGKILLed, its memory and disk wiped."""
        procs = [psutil.Process(agent.pid), *psutil.Process(agent.pid).children(recursive=True)]
        procs += _keepers(self.shm / f"node{i}")
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        agent.communicate(timeout=30)
        shutil.rmtree(self.shm / f"node{i}")
        shutil.rmtree(self.tmp / f"local{i}", ignore_errors=True)


def _restored(out: Path, ranks: int) -> set[int]:
    return {_attempts(out, r)[-1][2] for r in range(ranks)}


@pytest.mark.parametrize("model", ["ddp", pytest.param("fsdp", marks=[pytest.mark.slow, pytest.mark.skipif(
    not FULL, reason="sampled out (DDP by default): CKPTGUARD_TEST_FULL=1 runs it")])])
def test_a_lost_node_resumes_from_the_peer_replica_bit_exact(
    model: str, request: pytest.FixtureRequest, tmp_path: Path, shm: Path
) -> None:
    """(FSDP2: every node holds every rank's shard files, sent at each save.)"""
    reference2: Path = request.getfixturevalue("reference2_fsdp" if model == "fsdp" else "reference2")
    nodes = Nodes(tmp_path, shm, "--step-sleep", "0.3", *(["--fsdp"] if model == "fsdp" else []), nproc=1)
    first = nodes.start(0)  # started first: it hosts the rendezvous store (the node that stays)
    time.sleep(3)
    doomed = nodes.start(1)
    deadline = time.monotonic() + 180
    while _max_step(nodes.out) < 10:
        assert time.monotonic() < deadline and first.poll() is None and doomed.poll() is None
        time.sleep(0.1)
    nodes.lose(1, doomed)
    killed_at = _max_step(nodes.out)
    durable_then = sorted(p.name for p in nodes.run.glob("step-*"))
    fresh = nodes.start(2)
    results = [_finish(first), _finish(fresh)]
    assert [code for code, _ in results] == [0, 0], "\n".join(text[-3000:] for _, text in results)
    assert durable_then == []  # the durable tier had nothing: the resume came from memory
    # every rank, the fresh node's too (no memory, no disk of its own, nothing durable), resumed the
    # newest step committed before the loss: the surviving node sent it
    (restored,) = _restored(nodes.out, 2)
    assert killed_at - EVERY <= restored <= killed_at and restored >= 8
    _assert_same_as_reference(nodes.out, reference2)
    # a clean end: the newest checkpoint reached the durable tier, no keeper and no memory left
    assert sorted(p.name for p in nodes.run.glob("step-*")) == ["step-000000016"]
    assert _keepers(shm) == [] and not any(shm.rglob("MANIFEST.json"))
    p = subprocess.run([sys.executable, "-m", "ckptguard", "verify", str(nodes.run)], env=_env(), text=True,
                       capture_output=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="sampled out (tiers_endings.py damages one node's copy by default): CKPTGUARD_TEST_FULL=1 runs it")
def test_a_damaged_copy_in_one_nodes_memory_is_replaced_by_the_other_nodes(
    reference4: Path, tmp_path: Path, shm: Path
) -> None:
    """The whole job dies (rank 0 SIGKILLed after step 10, no restarts); both keepers keep their
    node's memory. Before the job is started again, a byte of one node's hot copy is flipped: the
    restore finds it damaged (checksums), marks it, and the ranks agree again: the other node sends
    its sound copy of the same step, and every rank resumes from it, bit-exact."""
    nodes = Nodes(tmp_path, shm, "--kill-rank", "0", "--kill-step", "10", "--find-unused", nproc=2, restarts=0)  # sync: step 8 committed
    agents = [nodes.start(0, local=False), nodes.start(1, local=False)]
    for agent in agents:
        code, _ = _finish(agent)
        assert code != 0  # rank 0 died; no restart
    copies = sorted(shm.glob("node*/ckptguard-*/*/step-*"))
    assert [(c.parent.parent.parent.name, c.name) for c in copies] == [("node0", "step-000000008"), ("node1", "step-000000008")]
    blob = copies[0] / "model.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    nodes.launch = _two_nodes(2)
    nodes.args = ("--async", "--find-unused")  # the resumed job saves in the background (the exchanges on their own group)
    results = [_finish(a) for a in [nodes.start(0, local=False), nodes.start(1, local=False)]]
    assert [code for code, _ in results] == [0, 0], "\n".join(text[-3000:] for _, text in results)
    assert "fails its checksums" in results[0][1] or "is corrupt" in results[0][1], results[0][1][-3000:]
    assert _restored(nodes.out, 4) == {8}
    _assert_same_as_reference(nodes.out, reference4, ranks=4)
    assert _keepers(shm) == []


ENDINGS = Path(__file__).parent / "dist_scripts" / "tiers_endings.py"


def test_every_ending_of_a_distributed_tiered_restore(tmp_path: Path, shm: Path) -> None:
    """Two nodes of two ranks (tests/dist_scripts/tiers_endings.py): every rank ends the same way,
    with the same step or the same error, whatever its node holds."""
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", str(ENDINGS),
           str(tmp_path / "run"), str(out)]
    p = subprocess.run(cmd, env=_env(NODE_SHM=str(shm)), text=True, capture_output=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    ranks = [json.loads((out / f"endings-rank{r}.json").read_text()) for r in range(4)]
    for got in ranks:
        assert got["fresh"] == {"step": None, "weight": got["fresh"]["weight"]}  # nothing anywhere: a fresh run
        assert got["saved"]["node_has"] == ["step-000000002", "step-000000003"]  # each node: the whole checkpoint
        assert got["from_memory"] == {"step": 3, "weight": 3.0 * 32}
        assert got["user_code_mismatch"]["error"] == "StateMismatchError"  # on every rank, nothing marked
        assert got["after_mismatch"] == {"step": 3, "weight": 3.0 * 32}
        assert got["step_not_held"]["error"] == "CheckpointNotFoundError"
        assert "No checkpoint for step 1 in any tier of any node" in got["step_not_held"]["message"]
        assert "steps available: 2, 3" in got["step_not_held"]["message"]
        assert got["damaged_on_one_node"] == {"step": 3, "weight": 3.0 * 32}  # the same step, from node 1
        assert got["only_on_the_other_node"] == {"step": 3, "weight": 3.0 * 32}  # node 1 sent it to node 0
        assert got["newest_damaged_everywhere"] == {"step": 2, "weight": 2.0 * 32}
        assert got["all_damaged"]["error"] == "NoValidCheckpointError"
        assert "No usable checkpoint in any tier of any node" in got["all_damaged"]["message"]
        assert "ckptguard verify" in got["all_damaged"]["message"]
        assert got["after_close"]["node_has"] == []  # a clean end frees every node's memory
        assert got["from_durable"] == {"step": 4, "weight": 4.0 * 32}  # no node holds it: the durable tier's
    assert ranks[0]["all_damaged"]["message"].count("step-000000002") >= 1


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="sampled out: CKPTGUARD_TEST_FULL=1 runs it")
def test_sigterm_on_one_node_reaches_the_durable_tier_before_every_rank_exits(tmp_path: Path, shm: Path) -> None:
    """A preemption notice (SIGTERM) to one node's worker: every rank saves the same step (into
    every node's memory), rank 0 copies it to the durable tier, the memory is freed, all exit."""
    nodes = Nodes(tmp_path, shm, "--step-sleep", "0.3", "--total", "400", nproc=1, restarts=0)
    agents = [nodes.start(0), nodes.start(1)]
    deadline = time.monotonic() + 180
    while _max_step(nodes.out) < 6:
        assert time.monotonic() < deadline and all(a.poll() is None for a in agents)
        time.sleep(0.1)
    worker = next(p for p in psutil.Process(agents[1].pid).children(recursive=True)
                  if any("elastic_train.py" in arg for arg in p.cmdline()))
    worker.send_signal(signal.SIGTERM)
    results = [_finish(a) for a in agents]
    assert all(code != 0 for code, _ in results)  # preempted: the agents report the workers' exit
    ckpts = sorted(nodes.run.glob("step-*"))
    assert ckpts, "\n".join(text[-3000:] for _, text in results)
    manifest = json.loads((ckpts[-1] / "MANIFEST.json").read_text())
    assert manifest["reason"] == "preemption" and manifest["step"] >= 6
    assert manifest["step"] == _max_step(nodes.out)  # the step every rank had reached: nothing lost
    assert _keepers(shm) == [] and not any(shm.rglob("MANIFEST.json"))  # the memory went with the clean end
