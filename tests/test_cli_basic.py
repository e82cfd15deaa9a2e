"""The CLI as a user runs it: real subprocesses, tables by default, --json, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from torch import nn

import ckptguard as cg


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ckptguard.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def _run(tmp: Path) -> Path:
    run = tmp / "run"
    m = nn.Linear(3, 2)
    with cg.CheckpointManager(run) as mgr:
        for s in (10, 20):
            mgr.save(s, cg.TrainState(model=m, config={"lr": 0.1}), metrics={"loss": 1.0 / s}, force=True)
    return run


def test_ls_table_and_json(tmp_path: Path) -> None:
    run = _run(tmp_path)
    out = cli("ls", str(run))
    assert out.returncode == 0, out.stderr
    assert "step" in out.stdout and "20" in out.stdout and "loss" in out.stdout
    data = json.loads(cli("ls", str(run), "--json").stdout)
    assert [c["step"] for c in data["checkpoints"]] == [10, 20]
    assert data["checkpoints"][1]["metrics"] == {"loss": 0.05} and data["checkpoints"][1]["valid"]


def test_inspect(tmp_path: Path) -> None:
    run = _run(tmp_path)
    out = cli("inspect", str(run / "step-000000010"), "--tensors")
    assert out.returncode == 0, out.stderr
    assert "model.safetensors" in out.stdout and "weight" in out.stdout and "xxh3-128" in out.stdout
    data = json.loads(cli("inspect", str(run), "--json").stdout)
    assert data["step"] == 20


def test_verify_exit_codes(tmp_path: Path) -> None:
    run = _run(tmp_path)
    ok = cli("verify", str(run))
    assert ok.returncode == 0 and "sound" in ok.stdout
    f = run / "step-000000010" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    bad = cli("verify", str(run), "--json")
    assert bad.returncode == 1
    report = json.loads(bad.stdout)
    assert not report["ok"] and any("model.safetensors" in p for p in report["problems"])
    assert cli("verify", str(run / "step-000000020")).returncode == 0


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    for cmd in ("ls", "inspect", "verify"):
        out = cli(cmd, str(tmp_path / "nope"))
        assert out.returncode == 2, (cmd, out.stdout, out.stderr)
        assert "does not exist" in out.stderr or "No such" in out.stderr
        assert "Traceback" not in out.stderr


def test_demo_kills_resumes_and_proves_bit_identical(tmp_path: Path) -> None:
    """The main job: real child processes, two SIGKILLs (one inside a save), bit-identical."""
    out = subprocess.run(
        [sys.executable, "-m", "ckptguard.cli", "demo", "--steps", "160", "--every", "20", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SIGKILL inside the save of step" in out.stdout
    assert "YES" in out.stdout
    report = cg.verify(tmp_path / "preempted")
    assert report.ok
