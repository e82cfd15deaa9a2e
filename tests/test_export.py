"""``ckptguard export`` (plain and incremental checkpoints) and the logical/physical sizes of ``ls``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import ckptguard as cg
from ckptguard.cli import main
from trainlib import make_setup, run_training


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "incremental"])
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    run = tmp_path_factory.mktemp("export") / "run"
    weights = run_training(run, 10, every_steps=5, manager_kwargs={"incremental": request.param})
    return run, weights


def test_export_weights_loads_with_safetensors(trained: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    run, weights = trained
    out = tmp_path / "out" / "model.safetensors"
    assert main(["export", str(run / "step-000000010"), "-o", str(out)]) == 0
    loaded = load_file(str(out))
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    assert not [p for p in out.parent.iterdir() if p.name != "model.safetensors"]  # no temp left
    # the exported weights load into a fresh model
    model = make_setup(seed=3)["model"]
    model.load_state_dict(loaded)


def test_export_full_state(trained: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, weights = trained
    out = tmp_path / "full.safetensors"
    assert main(["export", str(run), "-o", str(out), "--full", "--json"]) == 0  # a run: its newest
    assert json.loads(capsys.readouterr().out)["step"] == 10
    loaded = load_file(str(out))
    assert {k.split("/")[0] for k in loaded} >= {"model", "optimizer"}
    assert all(torch.equal(loaded["model/" + k], v) for k, v in weights.items())
    assert any(k.endswith("exp_avg_sq") for k in loaded if k.startswith("optimizer/"))
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    state = json.loads(meta["ckptguard.state_json"])
    assert state["step"] == 10 and meta["ckptguard.step"] == "10"
    assert "hidden" in meta["ckptguard.config_yaml"]


def test_export_refuses_a_corrupt_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_training(run, 5, every_steps=5, manager_kwargs={"incremental": True})
    pack = max((run / "objects").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 1
    pack.write_bytes(bytes(data))
    out = tmp_path / "model.safetensors"
    with pytest.raises(cg.CorruptCheckpointError, match=pack.name):
        from ckptguard.report.export import export_checkpoint

        export_checkpoint(run / "step-000000005", out, full=True)
    assert not out.exists() and not list(tmp_path.glob(".model.safetensors.tmp-*"))
    assert main(["export", str(run / "step-000000005"), "-o", str(out), "--full"]) == 2


def test_ls_shows_logical_and_physical_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run_training(run, 20, every_steps=5, manager_kwargs={"incremental": True})
    assert main(["ls", str(run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    ckpts = data["checkpoints"]
    assert len(ckpts) == 4
    assert data["logical_bytes"] == sum(c["logical_bytes"] for c in ckpts) == sum(c["size_bytes"] for c in ckpts)
    # everything trains here, so each checkpoint adds about its logical size; the run's physical
    # size is what the checkpoints added (no garbage left)
    assert data["physical_bytes"] == sum(c["physical_bytes"] for c in ckpts)
    assert main(["ls", str(run)]) == 0
    text = capsys.readouterr().out
    assert "logical" in text and "physical" in text and "run total" in text


def _declare_huge_tensor(ckpt: Path, nbytes: int, *, sparse: bool) -> None:
    """Rewrite ``model.safetensors`` and the manifest, self-consistently (every checksum right),
    to declare one F32 tensor of ``nbytes``; the data is a sparse hole or simply absent."""
    import struct

    from ckptguard.format.manifest import encode_manifest
    from ckptguard.format.tensorfile import digest_bytes, merkle_root

    header = json.dumps({"w": {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [0, nbytes]}}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    head = struct.pack("<Q", len(header)) + header
    f = ckpt / "model.safetensors"
    f.write_bytes(head)
    if sparse:
        with open(f, "r+b") as fh:
            fh.truncate(len(head) + nbytes)  # a hole: no block allocated
    tensor_digest = "0" * 32
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    manifest.pop("manifest_xxh3_128", None)
    manifest["files"]["model.safetensors"] = {
        "kind": "tensors", "size": len(head) + nbytes, "header_size": len(head),
        "header_xxh3_128": digest_bytes(head), "xxh3_128": merkle_root(digest_bytes(head), [tensor_digest]),
        "tensors": {"w": {"dtype": "F32", "shape": [nbytes // 4], "offsets": [0, nbytes], "xxh3_128": tensor_digest}},
    }
    (ckpt / "MANIFEST.json").write_bytes(encode_manifest(manifest))


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse-1TiB", "missing-data-1TiB"])
def test_export_refuses_a_huge_declared_tensor_before_allocating(tmp_path: Path, sparse: bool) -> None:
    """Issue 13 item 5: a self-consistent manifest declaring a 1 TiB tensor is refused at once."""
    import time

    from ckptguard.report.export import export_checkpoint
    from ckptguard.run.catalog import read_manifest
    from ckptguard.storage import open_storage

    run = tmp_path / "run"
    run_training(run, 5, every_steps=5)
    ckpt = run / "step-000000005"
    _declare_huge_tensor(ckpt, 1 << 40, sparse=sparse)
    read_manifest(open_storage(str(run)), "step-000000005")  # the manifest itself is valid
    out = tmp_path / "model.safetensors"
    t0 = time.monotonic()
    with pytest.raises(cg.CheckpointError) as info:
        export_checkpoint(ckpt, out)
    assert time.monotonic() - t0 < 60
    msg = str(info.value)
    assert f"model.safetensors declares {1 << 40} bytes of tensors but only" in msg and "Nothing was allocated" in msg
    assert str(ckpt) in msg and "ckptguard verify" in msg
    assert not out.exists()
    assert main(["export", str(ckpt), "-o", str(out)]) == 2


def test_export_refuses_what_this_machine_cannot_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sizes really stored but over the memory available are refused before allocating. A machine
    with less memory than a test checkpoint cannot be arranged here, so available memory is set
    below the checkpoint's real size (the only stand-in in this file)."""
    import math

    from ckptguard.report import export as export_mod
    from ckptguard.run.catalog import read_manifest
    from ckptguard.storage import open_storage

    run = tmp_path / "run"
    run_training(run, 5, every_steps=5)
    storage = open_storage(str(run))
    manifest = read_manifest(storage, "step-000000005")
    real = sum(4 * math.prod(i["shape"]) for i in manifest["files"]["model.safetensors"]["tensors"].values())
    assert export_mod.check_declared_sizes(storage, "step-000000005", manifest, ["model.safetensors"]) == real
    monkeypatch.setattr(export_mod, "available_memory", lambda: real - 1)
    out = tmp_path / "model.safetensors"
    with pytest.raises(cg.CheckpointError, match=f"exporting needs {real} bytes of memory for its tensors, this machine has {real - 1} available"):
        export_mod.export_checkpoint(run / "step-000000005", out)
    assert not out.exists()
