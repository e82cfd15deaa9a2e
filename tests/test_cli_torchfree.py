"""Metadata commands start without torch, on plain and incremental (chunked) runs alike.

Each command runs in a fresh interpreter through the real entry point; a wrapper reports whether
``torch`` was in ``sys.modules`` when the command ended. An incremental run's chunks are verified
byte for byte that way too (the ``chunked`` kind is wired explicitly, not registered by an import).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

import ckptguard as cg

WRAPPER = (
    "import sys\n"
    "from ckptguard.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print('TORCH-LOADED=' + str('torch' in sys.modules), file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def cli_no_torch(*argv: object) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-c", WRAPPER, *map(str, argv)], capture_output=True, text=True, timeout=300)
    assert "Traceback" not in p.stderr, p.stderr
    assert "TORCH-LOADED=False" in p.stderr, (argv, p.stderr)
    return p


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "incremental"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("torchfree") / "run"
    m = nn.Linear(4, 3)
    with cg.CheckpointManager(path, incremental=request.param) as mgr:
        for s in (10, 20, 30):
            mgr.save(s, cg.TrainState(model=m, config={"lr": 0.1 * s}), metrics={"loss": 1.0 / s}, force=True)
    return path


def test_metadata_commands_do_not_import_torch(run: Path, tmp_path: Path) -> None:
    p = cli_no_torch("ls", run, "--json")
    assert p.returncode == 0 and [c["step"] for c in json.loads(p.stdout)["checkpoints"]] == [10, 20, 30]
    p = cli_no_torch("verify", run, "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["ok"] is True
    p = cli_no_torch("inspect", run / "step-000000020", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["step"] == 20
    p = cli_no_torch("diff", run / "step-000000010", run / "step-000000030", "--metadata", "--json")
    assert p.returncode == 0 and [c["key"] for c in json.loads(p.stdout)["config"]] == ["lr"]
    assert cli_no_torch("pin", run, "20").returncode == 0
    assert cli_no_torch("unpin", run, "20").returncode == 0
    p = cli_no_torch("prune", run, "--keep-last", "2", "--dry-run", "--json")
    assert p.returncode == 0 and [d["keep"] for d in json.loads(p.stdout)["decisions"]] == [False, True, True]
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    p = cli_no_torch("prune", copy, "--keep-last", "2")
    assert p.returncode == 0 and sorted(x.name for x in copy.glob("step-*")) == ["step-000000020", "step-000000030"]
    assert cli_no_torch("verify", copy).returncode == 0


def test_verify_without_torch_still_finds_rot(run: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    incremental = (copy / "objects").is_dir()
    target = max((copy / "objects").iterdir(), key=lambda p: p.stat().st_size) if incremental else copy / "step-000000030" / "model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01
    target.write_bytes(bytes(data))
    p = cli_no_torch("verify", copy, "--json")
    report = json.loads(p.stdout)
    assert p.returncode == 1 and not report["ok"]
    assert any("does not match" in msg for msg in report["problems"]), report["problems"]


def test_import_ckptguard_is_lazy_and_complete() -> None:
    code = (
        "import sys, ckptguard as cg\n"
        "assert 'torch' not in sys.modules\n"
        "names = set(dir(cg))\n"
        "missing = [n for n in cg.__all__ if n not in names]\n"
        "assert not missing, missing\n"
        "assert callable(cg.verify) and cg.verify.__module__ == 'ckptguard.verification.verify'\n"
        "import ckptguard.verification.verify\n"
        "assert callable(cg.verify)\n"
        "assert cg.CheckpointError.__module__ == 'ckptguard.errors'\n"
        "assert 'torch' not in sys.modules\n"
        "from ckptguard import TrainState, CheckpointManager, Retention\n"
        "assert 'torch' in sys.modules and TrainState.__module__ == 'ckptguard.capture.state'\n"
        "try:\n    cg.NoSuchName\nexcept AttributeError as e:\n    assert 'NoSuchName' in str(e)\nelse:\n    raise SystemExit('no AttributeError')\n"
        "print('ok')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr
