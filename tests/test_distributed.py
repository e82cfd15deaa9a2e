"""torch.distributed: real 2-process torchrun runs on gloo (CPU), DDP and FSDP2, resharding to 1.

Each torchrun start costs seconds, so each scenario runs one program (tests/dist_scripts/train.py)
that does several things, and the module-scoped fixtures share those runs between tests.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import ckptguard as cg
from ckptguard.distributed.dcp import DCP_METADATA, safe_load_metadata
from ckptguard.format.manifest import encode_manifest
from ckptguard.run.catalog import read_manifest
from trainlib import Net, NoisyDataset

pytestmark = [pytest.mark.xdist_group("dist")]
SCRIPT = Path(__file__).parent / "dist_scripts" / "train.py"
TOTAL, STOP = 14, 9


def _torchrun(*args: str, **popen: Any) -> subprocess.Popen[str]:
    cmd = [
        # --standalone: the rendezvous binds a free port itself (a port picked here could be
        # taken by a parallel test before torchrun binds it)
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT), *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def _run(*args: str, timeout: float = 240) -> str:
    p = _torchrun(*args)
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-4000:]
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


# ---- DDP ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    run, out = tmp_path_factory.mktemp("ddp-run"), tmp_path_factory.mktemp("ddp-out")
    _run("ddp-first", str(run), str(out), str(TOTAL), str(STOP))
    _run("ddp-resume", str(run), str(out), str(TOTAL), str(STOP))
    return run, out


def test_ddp_resume_is_bit_exact_per_rank(ddp: tuple[Path, Path]) -> None:
    run, out = ddp
    assert _same(load_file(out / "full.safetensors"), load_file(out / "resumed.safetensors"))
    for r in (0, 1):
        full, resumed = _json(out / f"full-rank{r}.json"), _json(out / f"resumed-rank{r}.json")
        stopped, restored = _json(out / f"stopped-rank{r}.json"), _json(out / f"restored-rank{r}.json")
        assert restored == stopped  # this rank's RNG and sampler position came back
        assert resumed == full
    # per-rank streams really differ, so restoring rank 0's RNG on rank 1 would have failed
    assert _json(out / "stopped-rank0.json")["rng"] != _json(out / "stopped-rank1.json")["rng"]


def test_ddp_checkpoint_layout(ddp: tuple[Path, Path]) -> None:
    run, _ = ddp
    storage_run = run / "stopped"
    names = sorted(p.name for p in storage_run.iterdir() if p.name.startswith("step-"))
    # 10: after the resume; 15 failed on rank 1 (nothing committed); 16 saved after it
    assert names == ["step-000000005", "step-000000009", "step-000000010", f"step-{TOTAL + 2:09d}"]
    assert not [p for p in storage_run.iterdir() if p.name.startswith(".tmp-")]
    ck = storage_run / "step-000000009"
    m = json.loads((ck / "MANIFEST.json").read_text())
    assert m["distributed"] == {"world_size": 2, "mode": "replicated", "rank_files": ["rank-00000.json", "rank-00001.json"]}
    assert {"model.safetensors", "optimizer.safetensors", "state.json", "rank-00000.json", "rank-00001.json"} <= set(m["files"])
    ranks = [json.loads((ck / f"rank-0000{r}.json").read_text()) for r in (0, 1)]
    assert [d["rank"] for d in ranks] == [0, 1] and ranks[0]["rng"] != ranks[1]["rng"]
    assert [d["dataloader"]["sampler"]["rank"] for d in ranks] == [0, 1]
    assert cg.verify(ck).ok
    # only rank 0 wrote metrics: one row per step, no duplicates
    rows = (storage_run / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, TOTAL + 1))


def test_ddp_failure_on_one_rank_commits_nothing_and_raises_everywhere(ddp: tuple[Path, Path]) -> None:
    run, out = ddp
    outcomes = [_json(out / f"failed-save-rank{r}.json")["outcome"] for r in (0, 1)]
    assert all(o.startswith("CheckpointError: Distributed save of step 15") for o in outcomes), outcomes
    assert all("rank 1: " in o and "injected fault" in o and "rank-00001.json" in o for o in outcomes), outcomes
    assert not (run / "stopped" / f"step-{TOTAL + 1:09d}").exists()
    assert (run / "stopped" / f"step-{TOTAL + 2:09d}" / "MANIFEST.json").exists()


def test_damage_seen_by_one_rank_makes_all_ranks_fall_back(ddp: tuple[Path, Path]) -> None:
    run, out = ddp
    newest = run / "stopped" / f"step-{TOTAL + 2:09d}"
    assert [_json(out / f"fallback-rank{r}.json")["step"] for r in (0, 1)] == [10, 10]
    report = cg.verify(newest)
    assert not report.ok and any("rank-00001.json" in str(p) for p in report.problems)
    assert json.loads((newest / "STATUS.json").read_text())["status"] == "corrupt"


def test_ddp_checkpoint_restores_on_one_rank_resharded(ddp: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    run, out = ddp
    torch.manual_seed(5)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ds = NoisyDataset(96)
    sampler = cg.ResumableSampler(ds, shuffle=True, seed=0)
    loader = DataLoader(ds, batch_size=8, sampler=sampler)
    state = cg.TrainState(model=model, optimizer=opt, dataloader=loader, extra={"seen": 0})
    with cg.CheckpointManager(run / "stopped", lock=False) as mgr:
        assert mgr.restore(state, step=STOP) == STOP
    assert _same(model.state_dict(), load_file(out / "stopped.safetensors"))
    assert "saved by 2 rank(s) and is restored on 1" in caplog.text
    # 2 ranks consumed 3 batches of 8 each in epoch 1: one rank resumes after 48 samples
    saved = _json(out / "stopped-rank0.json")["sampler"]
    assert (sampler.epoch, sampler.position) == (saved["epoch"], saved["global_consumed"])
    first = next(iter(loader))[0]
    order = torch.randperm(96, generator=torch.Generator().manual_seed(saved["epoch"]))
    assert torch.equal(first, ds.x[order[saved["global_consumed"]: saved["global_consumed"] + 8]])
    assert len(opt.state) == 4


# ---- FSDP2 --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    run, out = tmp_path_factory.mktemp("fsdp-run"), tmp_path_factory.mktemp("fsdp-out")
    _run("fsdp", str(run), str(out), str(TOTAL), str(STOP))
    return run, out


def test_fsdp_restores_on_two_ranks_exactly(fsdp: tuple[Path, Path]) -> None:
    _, out = fsdp
    assert _same(load_file(out / "saved.safetensors"), load_file(out / "restored.safetensors"))
    assert _same(load_file(out / "continued.safetensors"), load_file(out / "resumed.safetensors"))
    for r in (0, 1):
        assert _json(out / f"continued-rank{r}.json") == _json(out / f"resumed-rank{r}.json")


def test_fsdp_shards_are_in_the_manifest(fsdp: tuple[Path, Path]) -> None:
    run, _ = fsdp
    ck = run / f"step-{STOP:09d}"
    m = read_manifest(cg.CheckpointManager(run, lock=False).storage, ck.name)
    dcp_files = {f for f in m["files"] if f.startswith("dcp/")}
    assert dcp_files == {f"dcp/{p.name}" for p in (ck / "dcp").iterdir()}
    assert dcp_files == {"dcp/rank-00000.safetensors", "dcp/rank-00001.safetensors", "dcp/metadata.json"}
    assert all(m["files"][f]["kind"] == "tensors" for f in dcp_files if f.endswith(".safetensors"))
    assert "model.safetensors" not in m["files"] and m["distributed"]["mode"] == "dcp"
    assert cg.verify(ck).ok


def _plain() -> tuple[torch.nn.Module, torch.optim.Optimizer, cg.TrainState]:
    torch.manual_seed(11)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40)
    return model, opt, cg.TrainState(model=model, optimizer=opt, scheduler=sched, extra={"seen": 0})


def test_fsdp_checkpoint_restores_on_one_plain_process(fsdp: tuple[Path, Path]) -> None:
    run, out = fsdp
    model, opt, state = _plain()
    with cg.CheckpointManager(run, lock=False) as mgr:
        assert mgr.restore(state, step=STOP) == STOP
    assert _same(model.state_dict(), load_file(out / "saved.safetensors"))
    assert state.extra["seen"] == STOP * 8  # rank 0's count, from the shared state.json
    assert len(opt.state) == 4 and all(s["exp_avg"].shape == p.shape for p, s in opt.state.items())


def test_export_of_a_sharded_checkpoint_is_one_plain_file_of_the_full_weights(fsdp: tuple[Path, Path], tmp_path: Path) -> None:
    from ckptguard.cli import main

    run, out = fsdp
    dest = tmp_path / "model.safetensors"
    assert main(["export", str(run / f"step-{STOP:09d}"), "-o", str(dest)]) == 0
    assert _same(load_file(dest), load_file(out / "saved.safetensors"))  # consolidated from both ranks' shards
    assert main(["export", str(run / f"step-{STOP:09d}"), "-o", str(dest)]) != 0  # no overwrite without --force
    assert main(["export", str(run / f"step-{STOP:09d}"), "-o", str(tmp_path / "full.safetensors"), "--full"]) != 0
    assert not (tmp_path / "full.safetensors").exists()


def test_dcp_reads_only_files_the_manifest_lists(fsdp: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    run, _ = fsdp
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    mpath = copy / f"step-{STOP:09d}" / "MANIFEST.json"
    m = json.loads(mpath.read_text())
    del m["files"]["dcp/rank-00001.safetensors"]  # the metadata still points at it
    m.pop("manifest_xxh3_128", None)
    mpath.write_bytes(encode_manifest(m))  # a consistent, self-checksummed but lying manifest
    _, _, state = _plain()
    with cg.CheckpointManager(copy, lock=False) as mgr, pytest.raises(cg.CorruptCheckpointError, match="not a tensor the manifest vouches for"):
        mgr.restore(state)


def test_dcp_metadata_of_the_earlier_layout_cannot_run_code() -> None:
    import pickle

    legacy = Path(__file__).parent / "fixtures" / "fsdp-legacy-run" / "step-000000002"
    good = (legacy / "dcp" / DCP_METADATA).read_bytes()
    assert type(safe_load_metadata(good, "x")).__name__ == "Metadata"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("echo pwned",))

    with pytest.raises(cg.UnsafeCheckpointError, match="posix.system|os.system"):
        safe_load_metadata(pickle.dumps(Evil()), "x")


# ---- preemption ---------------------------------------------------------------------------------


def test_sigterm_on_one_rank_saves_the_same_step_on_all(tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "out"
    out.mkdir()
    p = _torchrun("preempt", str(run), str(out), "400", "0")
    assert p.stdout is not None
    pids: dict[int, int] = {}
    lines: list[str] = []
    deadline = time.monotonic() + 180
    sent = False
    while time.monotonic() < deadline:
        ready, _, _ = select.select([p.stdout], [], [], 1.0)
        if not ready:
            if p.poll() is not None:
                break
            continue
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line)
        # The ranks' lines may interleave within one line ("STEP 0 268STEP 1 268"): match anywhere.
        text = "".join(lines)
        pids.update((int(r), int(pid)) for r, pid in re.findall(r"PID (\d) (\d+)", text))
        rank1_steps = [int(n) for n in re.findall(r"STEP 1 (\d+)", text)]
        if not sent and 1 in pids and rank1_steps and max(rank1_steps) >= 4:
            # (rank 1's PID line may come after its first STEP lines: torchrun interleaves outputs)
            os.kill(pids[1], signal.SIGTERM)  # only rank 1 gets the signal
            sent = True
    p.wait(timeout=60)
    text = "".join(lines)
    assert sent, text[-3000:]
    assert "FINISHED" not in text
    ckpts = sorted(d.name for d in run.iterdir() if d.name.startswith("step-"))
    assert len(ckpts) == 1, text[-3000:]
    ck = run / ckpts[0]
    m = json.loads((ck / "MANIFEST.json").read_text())
    assert m["reason"] == "preemption" and m["extra"]["preemption"]
    steps = {json.loads((ck / f"rank-0000{r}.json").read_text())["step"] for r in (0, 1)}
    assert steps == {m["step"]} and 4 <= m["step"] < 400
    assert cg.verify(ck).ok
