"""``ckptguard export`` (plain and incremental checkpoints) and the logical/physical sizes of ``ls``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from trainlib import make_setup, run_training

import ckptguard as cg
from ckptguard.cli import main


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
        from ckptguard.export import export_checkpoint

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
