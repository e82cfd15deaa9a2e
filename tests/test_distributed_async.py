"""Async saves in distributed (DDP and FSDP2, gloo, CPU, 2 ranks under torchrun): tests/dist_scripts/async_train.py.

Two torchrun programs, shared by the tests through module-scoped fixtures: ``async`` (a sync and an
async run of the same training, a resume from the async checkpoint, a background failure on rank 1;
the same with FSDP2)
and ``slow`` (rank 1's checkpoint write is slower than the training group's timeout).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file

import ckptguard as cg

pytestmark = [pytest.mark.xdist_group("dist")]  # every torchrun test on one worker: two at once overload 2 cores
SCRIPT = Path(__file__).parent / "dist_scripts" / "async_train.py"
TOTAL = 14  # async_train.TOTAL
TRAIN_TIMEOUT, DELAY, STEPS = 2.0, 3.0, 20  # the training group's timeout; one rank's slow checkpoint part; steps trained meanwhile


def _run(*args: str, timeout: float = 240) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    assert p.returncode == 0, p.stdout[-4000:]
    return p.stdout


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _steps(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith("step-"))


@pytest.fixture(scope="module")
def async_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    run, out = tmp_path_factory.mktemp("async-run"), tmp_path_factory.mktemp("async-out")
    _run("async", str(run), str(out))
    return run, out


@pytest.fixture(scope="module")
def slow_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    run, out = tmp_path_factory.mktemp("slow-run"), tmp_path_factory.mktemp("slow-out")
    _run("slow", str(run), str(out), "--timeout", str(TRAIN_TIMEOUT), "--delay", str(DELAY), "--steps", str(STEPS))
    return run, out


def test_async_checkpoints_equal_sync_ones_and_resume_bit_exact(async_run: tuple[Path, Path]) -> None:
    run, out = async_run
    sync, asyn = run / "sync" / "step-000000010", run / "async" / "step-000000010"
    for name in ("model.safetensors", "optimizer.safetensors", "state.json", "rank-00000.json", "rank-00001.json"):
        assert (sync / name).read_bytes() == (asyn / name).read_bytes(), name
    assert cg.verify(asyn).ok
    m = _json(asyn / "MANIFEST.json")
    assert m["distributed"]["mode"] == "replicated" and m["distributed"]["world_size"] == 2
    assert 0 <= m["blocked_seconds"] <= m["save_seconds"]
    final = load_file(out / "sync.safetensors")
    for tag in ("async", "resumed"):
        other = load_file(out / f"{tag}.safetensors")
        assert other.keys() == final.keys() and all(other[k].equal(final[k]) for k in final), tag
    for r in (0, 1):
        assert _json(out / f"restored-rank{r}.json") == {"step": 10}
        assert _json(out / f"resumed-rank{r}.json") == _json(out / f"sync-rank{r}.json")


def test_background_failure_on_one_rank_commits_nothing_and_raises_on_every_rank(async_run: tuple[Path, Path]) -> None:
    run, out = async_run
    docs = [_json(out / f"failed-rank{r}.json") for r in (0, 1)]
    assert all(d["returned"] for d in docs)  # save() itself returned: the failure was in the background
    for d in docs:
        for surface, step in (("wait", TOTAL + 1), ("save", TOTAL + 2)):
            assert d[surface].startswith("AsyncSaveError: "), d
            assert f"step {step}" in d[surface] and "rank 1: " in d[surface] and "injected fault" in d[surface], d
    assert _steps(run / "async") == ["step-000000005", "step-000000010", f"step-{TOTAL + 4:09d}"]
    assert not [p for p in (run / "async").iterdir() if p.name.startswith(".tmp-")]
    assert cg.verify(run / "async" / f"step-{TOTAL + 4:09d}").ok  # the save after the failures worked


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_save_returns_before_the_commit_and_saves_the_state_it_was_given(slow_run: tuple[Path, Path], kind: str) -> None:
    run, out = slow_run
    for r in (0, 1):
        doc = _json(out / f"{kind}-slow-rank{r}.json")
        assert doc["pending_after_save"], doc  # one rank's part was still being written
    m = _json(run / kind / "step-000000003" / "MANIFEST.json")
    assert m["blocked_seconds"] < DELAY <= m["save_seconds"]  # blocked: the host copy; committed after the slow part
    # training changed the weights while the save was in flight: the checkpoint has step 3's
    saved, restored = load_file(out / f"{kind}-at-save.safetensors"), load_file(out / f"{kind}-restored.safetensors")
    assert saved.keys() == restored.keys() and all(saved[k].equal(restored[k]) for k in saved)
    for r in (0, 1):
        assert _json(out / f"{kind}-restored-rank{r}.json") == _json(out / f"{kind}-at-save-rank{r}.json")


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_checkpoint_collectives_do_not_use_the_training_group(slow_run: tuple[Path, Path], kind: str) -> None:
    # One rank waited DELAY s for the other's part, longer than the training group's timeout,
    # while both trained on (a collective per step): on the training group it would have timed out.
    run, out = slow_run
    docs = [_json(out / f"{kind}-slow-rank{r}.json") for r in (0, 1)]
    assert all(d["steps_while_pending"] * 0.2 > TRAIN_TIMEOUT for d in docs), docs
    assert docs[0]["final"] == docs[1]["final"] == 3 + STEPS
    assert _steps(run / kind) == ["step-000000003", f"step-{3 + STEPS:09d}"]
    assert all(cg.verify(run / kind / name).ok for name in _steps(run / kind))


def test_fsdp_async_checkpoint_resumes_like_a_sync_run(async_run: tuple[Path, Path]) -> None:
    run, out = async_run
    sync, asyn = run / "fsdp-sync" / "step-000000010", run / "fsdp-async" / "step-000000010"
    m = _json(asyn / "MANIFEST.json")
    assert m["distributed"]["mode"] == "dcp" and 0 <= m["blocked_seconds"] <= m["save_seconds"]
    shards = sorted(p.name for p in (asyn / "dcp").iterdir() if p.suffix == ".safetensors")
    assert shards == ["rank-00000.safetensors", "rank-00001.safetensors"]
    for name in shards:  # the host copy wrote the same shard bytes as the live model
        assert (sync / "dcp" / name).read_bytes() == (asyn / "dcp" / name).read_bytes(), name
    assert cg.verify(asyn).ok
    final = load_file(out / "fsdp-sync.safetensors")
    for tag in ("fsdp-async", "fsdp-resumed"):
        other = load_file(out / f"{tag}.safetensors")
        assert other.keys() == final.keys() and all(other[k].equal(final[k]) for k in final), tag
    for r in (0, 1):
        assert _json(out / f"fsdp-restored-rank{r}.json") == {"step": 10}
        assert _json(out / f"fsdp-resumed-rank{r}.json") == _json(out / f"fsdp-sync-rank{r}.json")
