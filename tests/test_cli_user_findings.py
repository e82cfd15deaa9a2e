"""The CLI from a new user's pass over the README: the command they type, the words they read.

Real subprocesses; ``python -P`` where it matters that the current directory is not on
``sys.path`` (as under the ``ckptguard`` console script).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ckptguard as cg
from ckptguard.storage.local import LocalStorage
from ckptguard.testing import FaultyStorage
from ckptguard.version import __version__


def cli(*args: str, cwd: Path | None = None, isolated_path: bool = False) -> subprocess.CompletedProcess[str]:
    flags = ["-P"] if isolated_path else []
    return subprocess.run([sys.executable, *flags, "-m", "ckptguard.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})


def _run(tmp: Path) -> Path:
    """Steps 10 and 20 with a provider's fields, a scheduler, extra=; step 10 then bit-rotted."""
    run = tmp / "run"
    m = nn.Linear(3, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 5)

    def position(step: int, state: cg.TrainState) -> dict[str, Any]:
        return {"data_position": {"epoch": 1, "batch": step * 2}, "dataset": "shards-v3"}

    with cg.CheckpointManager(run) as mgr:
        mgr.add_manifest_fields(position)
        for s in (10, 20):
            state = cg.TrainState(model=m, optimizer=opt, scheduler=sched, config={"lr": 0.1}, extra={"epoch": s // 10})
            mgr.save(s, state, metrics={"loss": 1.0 / s}, force=True)
    return run


def _rot(run: Path, step: int) -> None:
    f = run / f"step-{step:09d}" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))


def test_version() -> None:
    out = cli("--version")
    assert out.returncode == 0 and out.stdout == f"ckptguard {__version__}\n"


def test_inspect_shows_the_runs_own_fields_and_extra(tmp_path: Path) -> None:
    run = _run(tmp_path)
    out = cli("inspect", str(run / "step-000000010"))
    assert out.returncode == 0, out.stderr
    lines = {line.split(None, 1)[0]: line.split(None, 1)[1].strip() for line in out.stdout.splitlines()[:16] if line[:1].isalpha()}
    assert lines["data_position"] == '{"epoch": 1, "batch": 20}'
    assert lines["dataset"] == "shards-v3"
    assert "state extra    {\"epoch\": 1}" in out.stdout  # TrainState(extra=...), from state.json
    assert "newest" not in out.stdout and out.stderr == ""  # a checkpoint was named: nothing picked
    data = json.loads(cli("inspect", str(run / "step-000000010"), "--json").stdout)
    assert data["data_position"] == {"epoch": 1, "batch": 20} and data["state_extra"] == {"epoch": 1}


def test_inspect_of_a_run_says_which_checkpoint_it_picked(tmp_path: Path) -> None:
    run = _run(tmp_path)
    out = cli("inspect", str(run))
    assert out.returncode == 0, out.stderr
    note = (f"(the newest of 2 committed checkpoints of {run} ('ckptguard ls {run}' lists them; pass RUN/step-N for another))")
    head = " ".join(out.stdout.split())
    assert f"checkpoint {run / 'step-000000020'} {note}" in head
    js = cli("inspect", str(run), "--json")
    assert json.loads(js.stdout)["step"] == 20  # stdout stays JSON; the note goes to stderr
    assert " ".join(js.stderr.split()) == f"inspecting {run / 'step-000000020'}: {note[1:-1]}"


def test_diff_compares_the_runs_own_fields(tmp_path: Path) -> None:
    run = _run(tmp_path)
    a, b = str(run / "step-000000010"), str(run / "step-000000020")
    data = json.loads(cli("diff", a, b, "--metadata", "--json").stdout)
    assert data["fields"] == [
        {"key": "data_position.batch", "a": 20, "b": 40},
        {"key": "state_extra.epoch", "a": 1, "b": 2},
    ]
    out = cli("diff", a, b, "--metadata")
    assert out.returncode == 0, out.stderr
    assert "fields (add_manifest_fields, extra)" in out.stdout
    rows = [" ".join(line.replace("│", " ").split()) for line in out.stdout.splitlines()]
    assert "data_position.batch 20 40" in rows and "state_extra.epoch 1 2" in rows


def test_export_over_an_existing_file_says_what_to_type(tmp_path: Path) -> None:
    run = _run(tmp_path)
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"mine")
    out = cli("export", str(run), "-o", str(target))
    assert out.returncode == 2 and target.read_bytes() == b"mine"
    assert " ".join(out.stderr.split()) == f"error: {target} already exists; pass --force to replace it, or choose another -o."
    assert "overwrite=True" not in out.stderr
    assert cli("export", str(run), "-o", str(target), "--force").returncode == 0


def test_export_of_a_damaged_checkpoint_says_to_export_another(tmp_path: Path) -> None:
    run = _run(tmp_path)
    _rot(run, 10)
    target = tmp_path / "model.safetensors"
    out = cli("export", str(run / "step-000000010"), "-o", str(target))
    assert out.returncode == 2 and not target.exists()
    err = " ".join(out.stderr.split())
    assert err.startswith(f"error: Cannot export {run / 'step-000000010'}: it is damaged. ")
    assert "tensor 'bias' does not match its checksum" in err
    assert err.endswith(
        f"Nothing was written. Export another checkpoint: 'ckptguard ls {run}' lists the run's checkpoints with their "
        "status; pass RUN/step-N of a sound one."
    )
    assert "restore falls back" not in err
    assert cli("export", str(run / "step-000000020"), "-o", str(target)).returncode == 0


def test_ls_says_a_problem_once_in_full(tmp_path: Path) -> None:
    run = _run(tmp_path)
    _rot(run, 10)
    assert cli("verify", str(run)).returncode == 1  # marks step 10 corrupt
    out = cli("ls", str(run))
    assert out.returncode == 0, out.stderr
    rows = [" ".join(line.replace("│", " ").split()) for line in out.stdout.splitlines()]
    row = next(r for r in rows if r.startswith("10 "))
    assert "corrupt (see below)" in row and "checksum" not in row
    text = " ".join(out.stdout.split())
    assert text.count("does not match its checksum") == 1 and text.count("corrupt") == 2  # the row and the note
    assert f"step 10 is corrupt: {run / 'step-000000010' / 'model.safetensors'}: tensor 'bias' does not match its checksum" in text
    assert "marked corrupt" not in text
    inspected = " ".join(cli("inspect", str(run / "step-000000010")).stdout.split())
    assert f"status corrupt: {run / 'step-000000010' / 'model.safetensors'}: tensor 'bias'" in inspected
    assert "marked corrupt" not in inspected


def test_doctor_without_a_model_reports_no_nameless_scheduler(tmp_path: Path) -> None:
    run = _run(tmp_path)
    out = cli("doctor", str(run), "--json")
    codes = [f["code"] for f in json.loads(out.stdout)["findings"]]
    assert "scheduler.unused" not in codes and out.returncode == 0
    assert "['']" not in cli("doctor", str(run)).stdout


def test_doctor_names_a_scheduler_the_current_code_does_not_restore(tmp_path: Path) -> None:
    run = _run(tmp_path)
    (tmp_path / "models.py").write_text("import torch\n\ndef make():\n    return torch.nn.Linear(3, 2)\n")
    out = cli("doctor", str(run), "--model", "models:make", "--json", cwd=tmp_path, isolated_path=True)
    assert out.returncode == 0, out.stderr
    unused = [f["message"] for f in json.loads(out.stdout)["findings"] if f["code"] == "scheduler.unused"]
    assert unused == ["scheduler state in the checkpoint that the current code does not restore: the scheduler (scheduler=)"]


def test_doctor_model_module_imports_from_the_current_directory(tmp_path: Path) -> None:
    run = _run(tmp_path)
    (tmp_path / "models.py").write_text("import torch\n\ndef make():\n    return torch.nn.Linear(3, 2)\n")
    out = cli("doctor", str(run), "--model", "models:make", cwd=tmp_path, isolated_path=True)
    assert out.returncode == 0, out.stderr
    missing = cli("doctor", str(run), "--model", "nosuch:make", cwd=tmp_path, isolated_path=True)
    assert missing.returncode == 2
    assert " ".join(missing.stderr.split()) == (
        "error: --model 'nosuch:make': cannot import 'nosuch' (ModuleNotFoundError: No module named 'nosuch'). Looked in "
        f"the current directory ({tmp_path}) and on sys.path; pass a file (path/to/train.py:factory) or set PYTHONPATH "
        "to the module's folder."
    )


@pytest.mark.parametrize(("op", "doing"), [("write", "writing"), ("rename", "renaming"), ("mkdir", "creating the directory")])
def test_faulty_storage_says_what_it_was_doing(tmp_path: Path, op: str, doing: str) -> None:
    storage = FaultyStorage(LocalStorage(tmp_path / "run"), fail_at=1, ops={op}, error=errno.ENOSPC)
    with pytest.raises(cg.DiskFullError) as ei, cg.CheckpointManager(storage) as mgr:
        mgr.save(1, cg.TrainState(model=nn.Linear(2, 2)), force=True)
    assert storage.failed is not None
    where = f"{LocalStorage(tmp_path / 'run').describe(storage.failed.path)} (injected fault #1)"
    assert str(ei.value).startswith(f"No space left while {doing} {where}: No space left on device.")
