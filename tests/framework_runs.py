"""What the framework integrations' tests share: running a training script in a child process
(the sampled kill cases, the environment, the exit code checked), the command line, and comparing
final weights bit for bit."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import FULL

SRC = Path(__file__).parents[1] / "src"


def sampled(values: list[Any]) -> list[Any]:
    """The first case always, the others under CKPTGUARD_TEST_FULL=1."""
    return [pytest.param(v, marks=[] if FULL or i == 0 else [pytest.mark.skip(reason="sampled out: CKPTGUARD_TEST_FULL=1 runs it")])
            for i, v in enumerate(values)]


def env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_script(script: Path, out: Path, result: Path, *args: str, expect: int | None = 0) -> dict[str, Any]:
    """Run ``script OUT RESULT ARGS``; check its exit code; return what it wrote to RESULT.json."""
    p = subprocess.run([sys.executable, str(script), str(out), str(result), *args], env=env(), capture_output=True,
                       text=True, timeout=240)
    assert expect is None or p.returncode == expect, f"exit {p.returncode}, expected {expect}:\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}"
    info = Path(f"{result}.json")
    return json.loads(info.read_text()) if info.exists() else {}


def cli(*args: str, expect: int | None = 0) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "ckptguard", *args], env=env(), capture_output=True, text=True, timeout=120)
    if expect is not None:
        assert p.returncode == expect, f"ckptguard {' '.join(args)}: exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def assert_identical(a: Path, b: Path) -> None:
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    diff = {k: (x[k] - y[k]).abs().max().item() for k in x if not torch.equal(x[k], y[k])}
    assert not diff, f"not bit-identical to the uninterrupted run: {diff}"


def max_diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a)), load_file(str(b))
    return max((x[k] - y[k]).abs().max().item() for k in x)


def steps(run: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in run.iterdir() if p.name.startswith("step-") and (p / "MANIFEST.json").exists())


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


class _Boom:
    """Unpickling this creates the file ``path``: proof that a pickle was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def hostile_pickle(marker: Path) -> bytes:
    """A pickle that creates ``marker`` when loaded (planted where a careless resume would load it)."""
    return pickle.dumps(_Boom(str(marker)))
