"""Sharded (FSDP2) state stored by ckptguard on any storage: an object store without a shared
filesystem, async and incremental saves, resharding, the CLI, faults in a shard upload, hostile
metadata, and checkpoints of the earlier (DCP-file) layout.

Real ``torchrun`` (gloo, 2 ranks) against the real S3-protocol server on 127.0.0.1 (and the fault
proxy in front of it). Runs are shared by the tests through module-scoped fixtures.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import ckptguard as cg
from ckptguard.cli import main as cli
from ckptguard.format.manifest import encode_manifest
from ckptguard.format.tensorfile import digest_bytes
from ckptguard.run.catalog import scan
from ckptguard.storage import FsspecStorage, LocalStorage
from fault_proxy import Fault, FaultProxy
from s3_fixture import make_bucket
from trainlib import Net

pytestmark = [pytest.mark.xdist_group("dist-store")]
SCRIPT = Path(__file__).parent / "dist_scripts" / "sharded_store.py"
FIXTURES = Path(__file__).parent / "fixtures"
TOTAL, STOP = 12, 7


def _torchrun(*args: str, env: dict[str, str] | None = None) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    p = subprocess.run(cmd, env=full_env, text=True, capture_output=True, timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    return p.stdout + p.stderr


def _result(out: Path, tag: str, rank: int) -> dict[str, Any]:
    return json.loads((out / f"{tag}-rank{rank}.json").read_text())


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# Faults injected in front of the store during the reference run: rank 1's shard upload of step 3
# is cut once (retried: the save commits); at step 6 it is cut on every attempt (nothing committed).
FAULTS = [("step-000000003/dcp/rank-00001.safetensors", 1), ("step-000000006/dcp/rank-00001.safetensors", 100)]


@pytest.fixture(scope="module")
def runs(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The reference run (uninterrupted, sync saves to S3 through the fault proxy, a save that
    fails at step 6) and the same training on S3 with async incremental saves, stopped at STOP and
    resumed by a new pair of processes. ``local``: the reference run downloaded to a directory."""
    import s3fs

    tmp = tmp_path_factory.mktemp("sharded")
    out = tmp / "out"
    out.mkdir()
    ref = f"s3://{make_bucket(s3_endpoint)}/run"
    faults = [Fault("reset_before", "PUT", path, times=n) for path, n in FAULTS]
    with FaultProxy(s3_endpoint, faults, max_seconds=280) as proxy:
        _torchrun(ref, str(out), str(TOTAL), str(TOTAL), "--attempts", "3", "--expect-failure", "6",
                  env={"AWS_ENDPOINT_URL": proxy.url})
    url = f"s3://{make_bucket(s3_endpoint)}/run"
    _torchrun(url, str(out), str(TOTAL), str(STOP), "--async", "--incremental")
    _torchrun(url, str(out), str(TOTAL), str(STOP), "--async", "--incremental", "--resume")
    local = tmp / "whole"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True).get(
        ref.removeprefix("s3://"), str(local), recursive=True
    )
    return {"local": local, "url": url, "ref": ref, "faults": faults, "out": out, "tmp": tmp}


def _plain() -> tuple[Net, cg.TrainState]:
    torch.manual_seed(123)  # other weights than the run's: the restore must overwrite them all
    net = Net(hidden=256)
    for p in net.body.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    return net, cg.TrainState(model=net, optimizer=opt)


def test_async_incremental_sharded_run_on_an_object_store_resumes_bit_exact(runs: dict[str, Any]) -> None:
    out = runs["out"]
    for r in (0, 1):
        resumed, whole = _result(out, "resumed", r), _result(out, f"to{TOTAL}", r)
        assert resumed["restored"] == STOP  # the newest checkpoint every rank agreed on
        assert (resumed["weights"], resumed["rng"]) == (whole["weights"], whole["rng"]), f"rank {r} differs"
    assert _same(load_file(out / "resumed.safetensors"), load_file(out / f"to{TOTAL}.safetensors"))


def test_shards_on_the_object_store_are_checksummed_and_the_frozen_body_is_stored_once(runs: dict[str, Any]) -> None:
    storage = FsspecStorage(runs["url"])
    ckpts = scan(storage)
    assert [c.step for c in ckpts] == [3, 6, 7, 9, 12]
    for c in ckpts:
        files = c.manifest["files"]
        assert {f for f in files if f.startswith("dcp/")} == {
            "dcp/rank-00000.safetensors", "dcp/rank-00001.safetensors", "dcp/metadata.json"
        }
        for r in (0, 1):
            entry = files[f"dcp/rank-0000{r}.safetensors"]
            assert entry["kind"] == "chunked" and all(
                len(ch["digest"]) == 32 for t in entry["tensors"].values() for ch in t["chunks"]
            )
        meta = json.loads(storage.read_bytes(f"{c.name}/dcp/metadata.json"))  # JSON, no pickle
        assert meta["format"] == "ckptguard-dcp-metadata" and "model.body.0.weight" in meta["state_dict"]
        assert c.manifest["distributed"] == {
            "world_size": 2, "mode": "dcp", "rank_files": ["rank-00000.json", "rank-00001.json"]
        }
    logical = sum(c.size_bytes for c in ckpts)
    stored = sum(storage.size(f"objects/{p}") for p in storage.listdir("objects") if p.endswith(".pack"))
    body = (256 * 8 + 256) * 4  # the frozen Linear(8, 256), referenced by every checkpoint
    assert logical > 4 * body and stored < logical / 2, (stored, logical)
    assert cg.verify(runs["url"]).ok


def test_a_checkpoint_on_the_object_store_restores_in_one_plain_process(runs: dict[str, Any]) -> None:
    net, state = _plain()
    with cg.CheckpointManager(runs["url"], lock=False) as mgr:  # 2 ranks -> 1 process, resharded
        assert mgr.restore(state, step=STOP) == STOP
    assert _same(net.state_dict(), load_file(runs["out"] / f"to{STOP}.safetensors"))


def test_ls_verify_inspect_and_export_work_on_sharded_checkpoints_in_the_object_store(
    runs: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = runs["url"]
    assert cli(["ls", url]) == 0
    assert "5 checkpoint(s)" in capsys.readouterr().out
    assert cli(["verify", url]) == 0
    assert cli(["inspect", f"{url}/step-{STOP:09d}"]) == 0
    assert "dcp/rank-00001.safetensors" in capsys.readouterr().out
    dest = tmp_path / "model.safetensors"
    assert cli(["export", f"{url}/step-{STOP:09d}", "-o", str(dest)]) == 0
    assert _same(load_file(dest), load_file(runs["out"] / f"to{STOP}.safetensors"))  # both ranks' shards, consolidated


def _copy(runs: dict[str, Any], tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(runs["local"], copy)
    return copy


def test_a_damaged_shard_is_found_and_restore_falls_back(runs: dict[str, Any], tmp_path: Path) -> None:
    copy = _copy(runs, tmp_path)
    shard = copy / f"step-{TOTAL:09d}" / "dcp" / "rank-00001.safetensors"
    data = bytearray(shard.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    header = json.loads(data[8:start])
    begin, end = header["model.body.0.weight|128,0"]["data_offsets"]  # rank 1's shard of the frozen body
    data[start + (begin + end) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    report = cg.verify(copy / f"step-{TOTAL:09d}")
    assert not report.ok and "rank-00001.safetensors" in str(report)
    assert cli(["export", str(copy / f"step-{TOTAL:09d}"), "-o", str(tmp_path / "m.safetensors")]) != 0
    assert not (tmp_path / "m.safetensors").exists()
    _, state = _plain()
    with cg.CheckpointManager(copy, lock=False) as mgr:
        assert mgr.restore(state) == 9  # the damaged newest is skipped
        assert [c.status for c in mgr.checkpoints() if c.step == TOTAL] == ["corrupt"]


def _rewrite_metadata(ckpt: Path, edit: Any) -> None:
    """Replace dcp/metadata.json by ``edit(doc)`` and re-checksum the manifest (a consistent lie)."""
    path = ckpt / "dcp" / "metadata.json"
    doc = json.loads(path.read_text())
    raw = json.dumps(edit(doc)).encode()
    path.write_bytes(raw)
    mpath = ckpt / "MANIFEST.json"
    m = json.loads(mpath.read_text())
    m["files"]["dcp/metadata.json"].update(size=len(raw), xxh3_128=digest_bytes(raw))
    m.pop("manifest_xxh3_128", None)
    mpath.write_bytes(encode_manifest(m))


def _point_outside(doc: dict[str, Any]) -> dict[str, Any]:
    doc["storage"][0]["file"] = "../../../etc/passwd"
    return doc


def _bad_dtype(doc: dict[str, Any]) -> dict[str, Any]:
    doc["state_dict"]["model.head.weight"]["dtype"] = "system"
    return doc


def _chunk_outside(doc: dict[str, Any]) -> dict[str, Any]:
    doc["state_dict"]["model.head.weight"]["chunks"][0]["offsets"] = [5, 0]
    return doc


def _other_format(doc: dict[str, Any]) -> dict[str, Any]:
    return {**doc, "version": 99}


@pytest.mark.parametrize("edit", [_point_outside, _bad_dtype, _chunk_outside, _other_format])
def test_hostile_metadata_is_refused_and_restore_falls_back(runs: dict[str, Any], tmp_path: Path, edit: Any) -> None:
    copy = _copy(runs, tmp_path)
    _rewrite_metadata(copy / f"step-{TOTAL:09d}", edit)
    _, state = _plain()
    with cg.CheckpointManager(copy, lock=False) as mgr:
        with pytest.raises(cg.CorruptCheckpointError, match="metadata.json is not valid sharded-state metadata"):
            mgr.restore(state, step=TOTAL)
        assert mgr.restore(state) == 9


def test_a_fault_in_a_shard_upload_is_retried_or_commits_nothing(runs: dict[str, Any]) -> None:
    """Rank 1's shard upload: cut once at step 3 (retried: the save commits), cut on every attempt
    at step 6 (nothing committed, a CheckpointError on both ranks naming rank 1's shard; the next
    save commits)."""
    once, always = runs["faults"]
    assert once.hits == 1 and always.hits >= 3  # retried once; every attempt at step 6 cut
    for r in (0, 1):
        outcomes = _result(runs["out"], f"to{TOTAL}", r)["outcomes"]
        assert list(outcomes) == ["6"] and "rank 1" in outcomes["6"] and "rank-00001.safetensors" in outcomes["6"]
    assert [c.step for c in scan(FsspecStorage(runs["ref"]))] == [3, 9, 12]
    assert cg.verify(runs["ref"]).ok


def test_a_checkpoint_of_the_earlier_dcp_layout_still_restores_and_exports(tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "fsdp-legacy-run", run)
    expected = load_file(FIXTURES / "fsdp-legacy-run.saved.safetensors")
    torch.manual_seed(5)
    net = Net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    state = cg.TrainState(model=net, optimizer=opt, scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=40),
                          extra={"seen": 0})
    with cg.CheckpointManager(run, lock=False) as mgr:
        assert mgr.restore(state) == 2
    assert _same(net.state_dict(), expected)
    dest = tmp_path / "m.safetensors"
    assert cli(["export", str(run / "step-000000002"), "-o", str(dest)]) == 0
    assert _same(load_file(dest), expected)
    assert cg.verify(run).ok
    assert LocalStorage(run).exists("step-000000002/dcp/dcp.metadata")


def test_a_failed_incremental_save_on_one_rank_leaves_no_pack_behind_once_the_next_commits(tmp_path: Path) -> None:
    """Several writers share the run's chunk store: when rank 1's part of a save fails, rank 0's
    pack of that save is already durable but referenced by nothing; the garbage collection after
    the next commits removes it and never a referenced one."""
    out, run = tmp_path / "out", tmp_path / "run"
    out.mkdir()
    _torchrun(str(run), str(out), "10", "10", "--incremental", "--fail-rank1-at", "6")
    for r in (0, 1):
        outcomes = _result(out, "to10", r)["outcomes"]
        assert list(outcomes) == ["6"] and "rank 1" in outcomes["6"], outcomes
    storage = LocalStorage(run)
    ckpts = scan(storage)
    assert [c.step for c in ckpts] == [3, 9, 10]
    referenced = {p for c in ckpts for e in c.manifest["files"].values() for p in e.get("packs", {})}
    on_disk = {p for p in storage.listdir("objects") if p.endswith(".pack")}
    assert on_disk == referenced  # the failed save's pack was collected
    assert cg.verify(str(run)).ok


def test_a_model_that_changed_shape_is_a_mismatch_not_damage(runs: dict[str, Any]) -> None:
    """The user's model differs from the saved one (hidden 128, not 256): a StateMismatchError
    that names the tensor and both shapes; no checkpoint is marked corrupt, none is skipped."""
    net = Net(hidden=128)
    state = cg.TrainState(model=net, optimizer=torch.optim.AdamW(net.parameters(), lr=1e-2))
    with cg.CheckpointManager(runs["local"], lock=False) as mgr:
        with pytest.raises(cg.StateMismatchError, match=r"model\.body\.0\.weight.*Was the model or optimizer changed"):
            mgr.restore(state)
        assert {c.status for c in mgr.checkpoints()} == {"unverified"}


def test_diff_compares_the_assembled_weights_of_sharded_checkpoints(runs: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from ckptguard.report.diffing import diff

    url = runs["url"]
    d = diff(f"{url}/step-000000006", f"{url}/step-{STOP:09d}")
    by_name = {t.name: t for t in d.tensors}
    assert set(by_name) == set(load_file(runs["out"] / f"to{STOP}.safetensors"))
    assert by_name["body.0.weight"].max_abs == 0.0  # frozen
    assert by_name["head.weight"].max_abs is not None and by_name["head.weight"].max_abs > 0  # trained
    assert cli(["diff", f"{url}/step-000000006", f"{url}/step-{STOP:09d}"]) == 0
    assert "head.weight" in capsys.readouterr().out


def test_doctor_says_it_does_not_check_sharded_checkpoints_yet(runs: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from ckptguard.verification.doctor import doctor

    report = doctor(f"{runs['url']}/step-{STOP:09d}", Net(hidden=256), environment={})
    codes = {f.code for f in report.findings}
    assert "sharded.unchecked" in codes and not codes & {"keys.missing", "keys.unexpected", "keys.reshaped"}
