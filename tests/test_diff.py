"""``diff A B``: config, environment, metrics, probe and per-tensor changes of two checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ckptguard.cli import main
from ckptguard.report.diffing import diff
from trainlib import run_training


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("diff")
    run_training(root / "a", 10, every_steps=5, manager_kwargs={"probe": torch.ones(4, 8)})
    run_training(root / "b", 5, every_steps=5, setup_kwargs={"hidden": 48})
    return root / "a", root / "b"


def test_tensor_changes_match_torch(runs: tuple[Path, Path]) -> None:
    a, b = runs[0] / "step-000000005", runs[0] / "step-000000010"
    d = diff(a, b)
    ta, tb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert [t.name for t in d.tensors] == sorted(ta)
    for t in d.tensors:
        delta = tb[t.name].double() - ta[t.name].double()
        assert t.status == "changed"
        assert t.max_abs == pytest.approx(float(delta.abs().max()))
        assert t.rel == pytest.approx(float(delta.norm() / ta[t.name].double().norm()))
    assert d.config == [] and d.environment == []
    assert d.metrics["loss"][0] != d.metrics["loss"][1]
    assert d.probe[0]["hash"] != d.probe[1]["hash"]
    same = diff(a, a)
    assert {t.status for t in same.tensors} == {"same"}


def test_config_and_shape_diff_across_runs(runs: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["diff", str(runs[0] / "step-000000005"), str(runs[1]), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert {"key": "hidden", "a": 32, "b": 48} in out["config"]
    status = {t["name"]: t["status"] for t in out["tensors"]}
    assert status["body.0.weight"] == "reshaped" and status["head.weight"] == "reshaped"
    assert out["probe"]["b"] is None and {c["key"] for c in out["environment"]} >= {"config_hash"}
    code = main(["diff", str(runs[0] / "step-000000005"), str(runs[1])])
    text = capsys.readouterr().out
    assert code == 0 and "reshaped" in text and "hidden" in text
