"""Incremental saves in a DDP run (torchrun, gloo): a frozen body is stored once and referenced by
every later checkpoint; a kill-free stop/resume across the incremental checkpoints is bit-exact
per rank; the run verifies and its stored bytes are far below the checkpoints' logical size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import ckptguard as cg
from ckptguard.persist.incremental import OBJECTS
from ckptguard.run.catalog import scan
from ckptguard.storage import LocalStorage

pytestmark = [pytest.mark.xdist_group("dist-store")]
SCRIPT = Path(__file__).parent / "dist_scripts" / "incremental_ddp.py"
TOTAL, STOP = 15, 7


def _torchrun(*args: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=240)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]


def _result(out: Path, tag: str, rank: int) -> dict[str, object]:
    return json.loads((out / f"{tag}-rank{rank}.json").read_text())


def test_ddp_incremental_run_stores_the_frozen_body_once_and_resumes_bit_exact(tmp_path: Path) -> None:
    whole, out = tmp_path / "whole", tmp_path / "out"
    out.mkdir()
    stopped = tmp_path / "stopped"
    _torchrun(str(stopped), str(out), str(TOTAL), str(STOP), "--reference", str(whole))  # the uninterrupted reference first
    _torchrun(str(stopped), str(out), str(TOTAL), str(STOP), "--resume")
    for r in (0, 1):
        assert _result(out, "resumed", r) == _result(out, f"to{TOTAL}", r), f"rank {r} differs after the resume"
    ckpts = scan(LocalStorage(stopped))
    assert [c.step for c in ckpts] == [3, 6, 7, 9, 12, 15]
    for c in ckpts:
        kinds = {e.get("kind") for e in (c.manifest or {})["files"].values()}
        assert "chunked" in kinds, f"step {c.step} was not saved incrementally: {kinds}"
        assert c.manifest["distributed"]["world_size"] == 2
    logical = sum(c.size_bytes for c in ckpts)
    stored = sum(f.stat().st_size for f in (stopped / OBJECTS).iterdir() if f.suffix == ".pack")
    body = (256 * 8 + 256) * 4  # the frozen Linear(8, 256): stored once, not six times
    assert logical > 4 * body and stored < logical / 2, (stored, logical)
    assert cg.verify(str(stopped)).ok
