"""The on-disk format is the contract: golden bytes, the manifest schema, and an old fixture."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import ckptguard as cg
from ckptguard.format.manifest import FORMAT_VERSION
from ckptguard.format.tensorfile import write_tensor_file
from ckptguard.storage.local import LocalStorage

FIXTURE = Path(__file__).parent / "fixtures" / "v1-run"


def test_tensor_file_golden_bytes(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    w = storage.create("t.safetensors")
    entry = write_tensor_file(w, {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[7]], dtype=torch.int16)})
    w.close()
    raw = (tmp_path / "t.safetensors").read_bytes()
    header = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"I16","shape":[1,1],"data_offsets":[8,10]}}'
    header += b" " * (-len(header) % 8)
    assert raw == struct.pack("<Q", len(header)) + header + struct.pack("<2f", 1.0, 2.0) + struct.pack("<h", 7)
    assert entry["size"] == len(raw) and entry["header_size"] == 8 + len(header)
    assert entry["tensors"]["a"] == {
        "dtype": "F32", "shape": [2], "offsets": [0, 8], "xxh3_128": entry["tensors"]["a"]["xxh3_128"],
    }
    assert load_file(str(tmp_path / "t.safetensors"))["b"].tolist() == [[7]]


def test_every_supported_dtype_roundtrips_through_safetensors(tmp_path: Path) -> None:
    from ckptguard.format.tensorfile import DTYPE_TO_ST

    tensors = {str(dt): torch.ones(3, dtype=torch.float32).to(dt) for dt in DTYPE_TO_ST if dt not in (torch.uint16, torch.uint32, torch.uint64)}
    tensors["empty"] = torch.zeros(0, 4)
    tensors["scalar"] = torch.tensor(3.5, dtype=torch.float64)
    tensors["noncontig"] = torch.arange(12.0).reshape(3, 4).t()
    with cg.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, cg.TrainState(extra={"t": tensors}), force=True)
        st = cg.TrainState(extra={})
        mgr.restore(st)
    for k, v in tensors.items():
        assert st.extra["t"][k].dtype == v.dtype and torch.equal(st.extra["t"][k], v), k


def _manifest(run: Path, step: int) -> dict:
    return json.loads((run / f"step-{step:09d}" / "MANIFEST.json").read_text())


def test_manifest_schema(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    with cg.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(12, cg.TrainState(model=model, optimizer=opt, config={"lr": 0.1}), metrics={"loss": 0.5}, force=True)
    m = _manifest(tmp_path / "run", 12)
    assert set(m) >= {
        "format", "format_version", "step", "name", "created", "created_unix", "save_seconds", "reason",
        "checksum", "files", "metrics", "config_hash", "environment", "probe", "verification",
    }
    assert (m["format"], m["format_version"], m["step"], m["name"]) == ("ckptguard", FORMAT_VERSION, 12, "step-000000012")
    assert m["checksum"] == "xxh3-128" and m["metrics"] == {"loss": 0.5}
    assert set(m["files"]) == {"model.safetensors", "optimizer.safetensors", "state.json", "config.yaml"}
    assert m["files"]["state.json"]["kind"] == "blob"
    model_entry = m["files"]["model.safetensors"]
    assert model_entry["kind"] == "tensors" and set(model_entry["tensors"]) == {"weight", "bias"}
    env = m["environment"]
    assert {"git", "python", "torch", "numpy", "ckptguard", "host", "device"} <= set(env)
    for name, entry in m["files"].items():
        assert (tmp_path / "run" / "step-000000012" / name).stat().st_size == entry["size"]
    state = json.loads((tmp_path / "run" / "step-000000012" / "state.json").read_text())
    assert state["format_version"] == 1 and state["step"] == 12
    assert set(state["rng"]) >= {"python", "numpy", "torch_cpu"}
    assert state["optimizers"][""]["param_names"] == ["weight", "bias"]
    assert load_file(str(tmp_path / "run" / "step-000000012" / "optimizer.safetensors")).keys() == {
        "state.0.step", "state.0.exp_avg", "state.0.exp_avg_sq", "state.1.step", "state.1.exp_avg", "state.1.exp_avg_sq",
    }


def test_no_pickle_in_any_file(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    with cg.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, cg.TrainState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1)), force=True)
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            assert not data.startswith(b"\x80") and b"PK\x03\x04" not in data[:4], f


def test_committed_v1_fixture_still_restores() -> None:
    """A checkpoint written by format version 1 (kept in the repo) must stay readable."""
    report = cg.verify(FIXTURE)
    assert report.ok, report.problems
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    st = cg.TrainState(model=model, optimizer=opt, extra={})
    mgr = cg.CheckpointManager(FIXTURE, lock=False)
    assert mgr.restore(st) == 3
    expected = json.loads((FIXTURE.parent / "v1-run.expected.json").read_text())
    assert st.extra == expected["extra"]
    assert model[0].weight.sum().item() == pytest.approx(expected["weight0_sum"], abs=0)
