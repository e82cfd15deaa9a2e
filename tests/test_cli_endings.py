"""Every way each CLI command can end: exit code and the key words of the message, never a traceback.

The commands run in-process through ``ckptguard.cli.main`` (an exception escaping ``main`` fails
the test, which is what a traceback on a user's terminal would be); a sample runs as real
subprocesses at the end. Exit codes: 0 sound / done; 1 the command ran and found problems;
2 bad input (path, arguments, an unreadable checkpoint, a refused action).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import ckptguard as cg
from ckptguard.cli import main
from ckptguard.run.catalog import mark_status
from ckptguard.storage import open_storage

CONFIG = {"lr": 0.1, "model": {"dropout": 0.1, "widths": [8, 4]}}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one command, as the ``ckptguard`` entry point ends it."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own exit for bad arguments
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out, err
    return code, " ".join(out.split()), " ".join(err.split())  # rich may wrap; compare words


def _make_run(path: Path, *, incremental: bool = False, steps: tuple[int, ...] = (10, 20)) -> Path:
    m = nn.Linear(3, 2)
    with cg.CheckpointManager(path, incremental=incremental) as mgr:
        for s in steps:
            with torch.no_grad():
                m.weight.add_(0.5)
            mgr.save(s, cg.TrainState(model=m, config=CONFIG), metrics={"loss": 1.0 / s}, force=True)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("endings")
    return {"plain": _make_run(base / "plain"), "incremental": _make_run(base / "inc", incremental=True)}


@pytest.fixture
def run(runs: dict[str, Path], tmp_path: Path) -> Path:
    """A private copy of the plain run (tests damage it)."""
    dst = tmp_path / "run"
    shutil.copytree(runs["plain"], dst)
    return dst


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, Path]:
    """Paths that are not runs: missing, a regular file, an empty run, a debris-only run."""
    f = tmp_path / "notes.txt"
    f.write_text("hello\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    debris = tmp_path / "debris"
    (debris / "step-000000030").mkdir(parents=True)
    (debris / "step-000000030" / "model.safetensors").write_bytes(b"x" * 10)
    (debris / "step-000000030" / "UNCOMMITTED").write_bytes(b"")  # an interrupted save's marker
    (debris / ".tmp-abc").mkdir()
    return {"missing": tmp_path / "nope", "file": f, "empty": empty, "debris": debris}


def _corrupt_manifest(ckpt: Path) -> None:
    (ckpt / "MANIFEST.json").write_bytes(b"{ not json")


def _flip_data(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))


# ---- the ways a path can be wrong, for every command that takes one ------------------------------

PATH_COMMANDS = [
    ("ls", []), ("inspect", []), ("verify", []), ("prune", ["--dry-run"]), ("pin", ["10"]),
    ("unpin", ["10"]), ("plot", ["-o", "x.png"]), ("doctor", []), ("export", ["-o", "x.safetensors"]),
]


@pytest.mark.parametrize("cmd,extra", PATH_COMMANDS, ids=[c for c, _ in PATH_COMMANDS])
def test_missing_path(capsys: pytest.CaptureFixture[str], paths: dict[str, Path], cmd: str, extra: list[str]) -> None:
    code, out, err = run_cli(capsys, cmd, paths["missing"], *extra)
    assert code == 2, (out, err)
    assert f"{paths['missing']} does not exist" in err and "debris" not in err
    assert "Pass a run directory" in err or "Pass a checkpoint directory" in err


@pytest.mark.parametrize("cmd,extra", PATH_COMMANDS, ids=[c for c, _ in PATH_COMMANDS])
def test_regular_file(capsys: pytest.CaptureFixture[str], paths: dict[str, Path], cmd: str, extra: list[str]) -> None:
    code, out, err = run_cli(capsys, cmd, paths["file"], *extra)
    assert code == 2
    assert "is a regular file (6 bytes), not a directory" in err and "does not exist" not in err


@pytest.mark.parametrize("cmd", ["ls", "verify", "inspect"])
def test_a_manifest_file_names_its_folder(capsys: pytest.CaptureFixture[str], run: Path, cmd: str) -> None:
    code, _, err = run_cli(capsys, cmd, run / "step-000000010" / "MANIFEST.json")
    assert code == 2
    assert f"the manifest of the checkpoint {run / 'step-000000010'}" in err and f"pass its folder {run / 'step-000000010'}" in err


@pytest.mark.parametrize("cmd,extra", [("prune", ["--dry-run"]), ("pin", ["10"]), ("unpin", ["10"]), ("plot", ["-o", "x.png"])])
def test_checkpoint_given_where_a_run_is_expected(capsys: pytest.CaptureFixture[str], run: Path, cmd: str, extra: list[str]) -> None:
    code, _, err = run_cli(capsys, cmd, run / "step-000000010", *extra)
    assert code == 2
    assert "is a checkpoint directory" in err and f"Its run is {run}" in err and f"ckptguard {cmd} {run}" in err


# ---- ls ----------------------------------------------------------------------------------------


def test_ls_endings(capsys: pytest.CaptureFixture[str], run: Path, paths: dict[str, Path]) -> None:
    code, out, _ = run_cli(capsys, "ls", run)
    assert code == 0 and "2 checkpoint(s)" in out and "unverified" in out
    # a checkpoint directory: that checkpoint, and its run named
    code, out, _ = run_cli(capsys, "ls", run / "step-000000010")
    assert code == 0 and "1 checkpoint(s)" in out and "is one checkpoint of the run" in out and str(run) in out
    data = json.loads(run_cli(capsys, "ls", run / "step-000000010", "--json")[1])
    assert [c["step"] for c in data["checkpoints"]] == [10]
    # a step directory without a manifest: not a checkpoint it can show
    code, _, err = run_cli(capsys, "ls", paths["debris"] / "step-000000030")
    assert code == 2 and "not a committed checkpoint of its run" in err and "ckptguard verify" in err
    code, out, _ = run_cli(capsys, "ls", paths["empty"])
    assert code == 0 and "0 checkpoint(s)" in out and "no committed checkpoint in this directory" in out
    code, out, _ = run_cli(capsys, "ls", paths["debris"])
    assert code == 0 and "only leftovers of interrupted saves" in out and "2 leftover(s)" in out
    code, _, err = run_cli(capsys, "ls")
    assert code == 2 and "the following arguments are required: run" in err


def test_ls_and_inspect_and_verify_agree(capsys: pytest.CaptureFixture[str], run: Path) -> None:
    """One notion of a checkpoint's status: ls, inspect (table and JSON) say the same word."""
    mark_status(open_storage(str(run)), "step-000000020", "verified", "probe ok")
    ls = json.loads(run_cli(capsys, "ls", run, "--json")[1])
    insp = json.loads(run_cli(capsys, "inspect", run / "step-000000020", "--json")[1])
    assert ls["checkpoints"][1]["status"] == insp["status"] == "verified"
    code, out, _ = run_cli(capsys, "inspect", run / "step-000000020")
    assert code == 0 and "verified" in out and "unverified" not in out
    assert json.loads(run_cli(capsys, "inspect", run / "step-000000010", "--json")[1])["status"] == ls["checkpoints"][0]["status"] == "unverified"
    _flip_data(run / "step-000000010")
    (run / "step-000000010" / "model.safetensors").write_bytes(b"short")
    ls = json.loads(run_cli(capsys, "ls", run, "--json")[1])
    insp = json.loads(run_cli(capsys, "inspect", run / "step-000000010", "--json")[1])
    assert ls["checkpoints"][0]["status"] == insp["status"] == "invalid"
    assert insp["valid"] is False and "model.safetensors" in insp["problems"][0]
    code, _, _ = run_cli(capsys, "verify", run / "step-000000010")
    assert code == 1


def test_ls_corrupt_and_locked(capsys: pytest.CaptureFixture[str], run: Path) -> None:
    _corrupt_manifest(run / "step-000000010")
    code, out, _ = run_cli(capsys, "ls", run)
    assert code == 0 and "invalid" in out  # ls lists; verify judges
    _corrupt_manifest(run / "step-000000020")
    data = json.loads(run_cli(capsys, "ls", run, "--json")[1])
    assert [c["status"] for c in data["checkpoints"]] == ["invalid", "invalid"]


# ---- inspect -----------------------------------------------------------------------------------


def test_inspect_endings(capsys: pytest.CaptureFixture[str], run: Path, paths: dict[str, Path]) -> None:
    code, out, _ = run_cli(capsys, "inspect", run)
    assert code == 0 and "step" in out and "20" in out and "status" in out
    code, out, _ = run_cli(capsys, "inspect", run / "step-000000010", "--tensors")
    assert code == 0 and "weight" in out
    code, _, err = run_cli(capsys, "inspect", paths["empty"])
    assert code == 2 and "No committed checkpoint in" in err
    code, _, err = run_cli(capsys, "inspect", paths["debris"])
    assert code == 2 and "1 step directories without a manifest" in err
    code, _, err = run_cli(capsys, "inspect", paths["debris"] / "step-000000030")
    assert code == 2 and "has no MANIFEST.json: it is not a committed checkpoint" in err
    _corrupt_manifest(run / "step-000000020")
    code, _, err = run_cli(capsys, "inspect", run / "step-000000020")
    assert code == 2 and "cannot be inspected" in err and "ckptguard verify" in err


# ---- verify ------------------------------------------------------------------------------------


def test_verify_endings(capsys: pytest.CaptureFixture[str], run: Path, runs: dict[str, Path], paths: dict[str, Path]) -> None:
    code, out, _ = run_cli(capsys, "verify", run)
    assert code == 0 and "all 2 checkpoint(s) sound" in out
    code, out, _ = run_cli(capsys, "verify", runs["incremental"])
    assert code == 0 and "all 2 checkpoint(s) sound" in out
    code, out, _ = run_cli(capsys, "verify", run / "step-000000010")
    assert code == 0 and "all 1 checkpoint(s) sound" in out
    code, out, _ = run_cli(capsys, "verify", paths["empty"])
    assert code == 1 and "no checkpoints found" in out
    code, out, _ = run_cli(capsys, "verify", paths["debris"])
    assert code == 1 and "missing: not a committed checkpoint" in out
    _flip_data(run / "step-000000010")
    code, out, _ = run_cli(capsys, "verify", run, "--json")
    report = json.loads(out)
    assert code == 1 and [c["ok"] for c in report["checkpoints"]] == [False, True]
    assert "does not match its checksum" in report["problems"][0] and "model.safetensors" in report["problems"][0]
    _corrupt_manifest(run / "step-000000020")
    code, out, _ = run_cli(capsys, "verify", run, "--json")
    assert code == 1 and [c["ok"] for c in json.loads(out)["checkpoints"]] == [False, False]
    code, _, err = run_cli(capsys, "verify", run, "--bogus")
    assert code == 2 and "unrecognized arguments: --bogus" in err


# ---- diff --------------------------------------------------------------------------------------


def test_diff_endings(capsys: pytest.CaptureFixture[str], run: Path, paths: dict[str, Path]) -> None:
    a, b = run / "step-000000010", run / "step-000000020"
    code, out, _ = run_cli(capsys, "diff", a, b, "--json")
    d = json.loads(out)
    assert code == 0 and d["config"] == [] and {t["name"]: t["status"] for t in d["tensors"]} == {"bias": "same", "weight": "changed"}
    assert [t["max_abs"] for t in d["tensors"]] == [0.0, pytest.approx(0.5)]
    code, out, _ = run_cli(capsys, "diff", a, b, "--metadata", "--json")
    d = json.loads(out)
    assert code == 0 and [(t["status"], t["max_abs"]) for t in d["tensors"]] == [("same", 0.0), ("changed", None)]
    code, out, _ = run_cli(capsys, "diff", a, a)
    assert code == 0 and "2 tensor(s): 2 identical, 0 different" in out and "config: identical" in out
    code, _, err = run_cli(capsys, "diff", paths["missing"], b)
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(capsys, "diff", a, paths["file"])
    assert code == 2 and "is a regular file" in err
    code, _, err = run_cli(capsys, "diff", paths["empty"], b)
    assert code == 2 and "No committed checkpoint" in err
    code, _, err = run_cli(capsys, "diff", a)
    assert code == 2 and "the following arguments are required: b" in err


# ---- prune and pin -----------------------------------------------------------------------------


def test_prune_endings(capsys: pytest.CaptureFixture[str], run: Path, paths: dict[str, Path]) -> None:
    code, out, _ = run_cli(capsys, "prune", paths["empty"], "--dry-run")
    assert code == 0 and "keep 0" in out and "debris to remove: none" in out
    code, out, _ = run_cli(capsys, "prune", paths["debris"], "--dry-run")
    assert code == 0 and ".tmp-abc" in out and "step-000000030" in out
    code, out, _ = run_cli(capsys, "prune", paths["debris"])
    assert code == 0 and "debris removed" in out and sorted(os.listdir(paths["debris"])) == [".ckptguard.run.lock"]
    code, out, _ = run_cli(capsys, "prune", run, "--keep-last", "1", "--dry-run", "--json")
    assert code == 0 and [d["keep"] for d in json.loads(out)["decisions"]] == [False, True]
    _corrupt_manifest(run / "step-000000010")
    _corrupt_manifest(run / "step-000000020")
    code, out, _ = run_cli(capsys, "prune", run, "--dry-run")
    assert code == 0
    code, _, err = run_cli(capsys, "prune", run, "--keep-last", "x")
    assert code == 2 and "invalid int value: 'x'" in err


def test_pin_endings(capsys: pytest.CaptureFixture[str], run: Path, paths: dict[str, Path]) -> None:
    code, out, _ = run_cli(capsys, "pin", run, "10", "--note", "best so far")
    assert code == 0 and "pinned step 10" in out
    code, out, _ = run_cli(capsys, "unpin", run, "10")
    assert code == 0 and "unpinned step 10" in out
    code, out, _ = run_cli(capsys, "unpin", run, "10")
    assert code == 0 and "step 10 was not pinned" in out
    code, _, err = run_cli(capsys, "pin", run, "999")
    assert code == 2 and "999" in err
    code, _, err = run_cli(capsys, "pin", paths["empty"], "10")
    assert code == 2 and "10" in err
    code, _, err = run_cli(capsys, "pin", run, "ten")
    assert code == 2 and "invalid int value: 'ten'" in err


@pytest.fixture
def live_writer(run: Path) -> Iterator[subprocess.Popen[str]]:
    """A real training process holding the run's writer lock (it saved, then waits)."""
    code = (
        "import sys, time, torch, ckptguard as cg\n"
        f"mgr = cg.CheckpointManager({str(run)!r})\n"
        "mgr.save(30, cg.TrainState(model=torch.nn.Linear(3, 2)), force=True)\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    assert proc.stdout is not None
    deadline = time.monotonic() + 120
    line = ""
    while time.monotonic() < deadline and line != "ready\n":
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    assert line == "ready\n", "the writer did not start"
    yield proc
    proc.kill()
    proc.wait(timeout=60)


def test_commands_beside_a_live_writer(capsys: pytest.CaptureFixture[str], run: Path, live_writer: subprocess.Popen[str]) -> None:
    """Readers work beside a live run; prune refuses and names the holder."""
    code, out, _ = run_cli(capsys, "ls", run, "--json")
    assert code == 0 and [c["step"] for c in json.loads(out)["checkpoints"]] == [10, 20, 30]
    assert run_cli(capsys, "verify", run)[0] == 0
    assert run_cli(capsys, "inspect", run)[0] == 0
    code, out, _ = run_cli(capsys, "prune", run, "--dry-run")
    assert code == 0
    code, out, _ = run_cli(capsys, "pin", run, "20")
    assert code == 0 and "pinned step 20" in out  # a marker file: safe beside the writer
    code, out, _ = run_cli(capsys, "export", run, "-o", run.parent / "live.safetensors")
    assert code == 0 and "of step 30" in out
    code, _, err = run_cli(capsys, "prune", run, "--keep-last", "1")
    assert code == 2 and str(live_writer.pid) in err
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000000010", "step-000000020", "step-000000030"]


# ---- plot --------------------------------------------------------------------------------------


def test_plot_endings(capsys: pytest.CaptureFixture[str], run: Path, paths: dict[str, Path], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    code, _, err = run_cli(capsys, "plot", paths["empty"], "-o", tmp_path / "a.png")
    assert code == 2 and "metrics.csv" in err
    code, _, err = run_cli(capsys, "plot", run, "--smooth", "x")
    assert code == 2 and "invalid int value" in err


# ---- doctor ------------------------------------------------------------------------------------


def test_doctor_endings(capsys: pytest.CaptureFixture[str], run: Path, paths: dict[str, Path], tmp_path: Path) -> None:
    same = tmp_path / "same.yaml"
    same.write_text(json.dumps(CONFIG))
    code, out, _ = run_cli(capsys, "doctor", run, "--config", same, "--strict", "--json")
    assert code == 0 and json.loads(out)["exit_code"] == 0 and "config.changed" not in out
    changed = tmp_path / "today.yaml"
    changed.write_text("lr: 0.1\nmodel:\n  dropout: 0.3\n  widths: [8, 4, 2]\nseed: 1\n")
    code, out, _ = run_cli(capsys, "doctor", run, "--config", changed)
    assert code == 0 and "config.changed" in out and "model.dropout: 0.1 -> 0.3" in out
    assert "model.widths.2: added, now 2" in out and "seed: added, now 1" in out
    code, out, _ = run_cli(capsys, "doctor", run, "--config", changed, "--strict")
    assert code == 1 and "warnings fail --strict" in out
    code, _, err = run_cli(capsys, "doctor", run, "--config", tmp_path / "absent.yaml")
    assert code == 2 and "absent.yaml: the file does not exist" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    code, _, err = run_cli(capsys, "doctor", run, "--config", bad)
    assert code == 2 and "is not valid YAML or JSON" in err
    code, _, err = run_cli(capsys, "doctor", run, "--model", "nocolon")
    assert code == 2 and "expected 'module:factory'" in err
    code, _, err = run_cli(capsys, "doctor", run, "--model", f"{tmp_path / 'nofile.py'}:make")
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(capsys, "doctor", paths["empty"])
    assert code == 2 and "No checkpoint in" in err
    _flip_data(run / "step-000000020")
    code, out, _ = run_cli(capsys, "doctor", run, "--json")
    assert code == 1 and "storage.corrupt" in out
    code, _, err = run_cli(capsys, "doctor")
    assert code == 2 and "the following arguments are required: ckpt" in err


def test_doctor_model_file_imports_its_siblings(capsys: pytest.CaptureFixture[str], run: Path, tmp_path: Path) -> None:
    """``--model proj/factory.py:make`` where factory.py does ``from helper import build``."""
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "helper_cli_endings.py").write_text("from torch import nn\n\ndef build():\n    return nn.Linear(3, 2)\n")
    (proj / "factory.py").write_text(
        "import ckptguard as cg\nfrom helper_cli_endings import build\n\n"
        "def make():\n    return cg.TrainState(model=build(), config={'lr': 0.2, 'model': {'dropout': 0.1, 'widths': [8, 4]}})\n"
        "def boom():\n    raise RuntimeError('no GPU here')\n"
    )
    code, out, _ = run_cli(capsys, "doctor", run, "--model", f"{proj / 'factory.py'}:make", "--json")
    report = json.loads(out)
    assert code == 0, out
    changed = [f for f in report["findings"] if f["code"] == "config.changed"]
    assert changed and changed[0]["details"] == ["lr: 0.1 -> 0.2"] and changed[0]["severity"] == "warning"
    code, _, err = run_cli(capsys, "doctor", run, "--model", f"{proj / 'factory.py'}:boom")
    assert code == 2 and "raised RuntimeError: no GPU here" in err
    code, _, err = run_cli(capsys, "doctor", run, "--model", f"{proj / 'factory.py'}:missing")
    assert code == 2 and "has no callable 'missing'" in err


# ---- export ------------------------------------------------------------------------------------


def test_export_endings(capsys: pytest.CaptureFixture[str], run: Path, paths: dict[str, Path], tmp_path: Path) -> None:
    out_file = tmp_path / "model.safetensors"
    code, out, _ = run_cli(capsys, "export", run, "-o", out_file)
    assert code == 0 and "exported" in out and out_file.is_file()
    first = out_file.read_bytes()
    code, _, err = run_cli(capsys, "export", run / "step-000000010", "-o", out_file)
    assert code == 2 and "already exists; pass --force" in err and out_file.read_bytes() == first
    code, out, _ = run_cli(capsys, "export", run / "step-000000010", "-o", out_file, "--force")
    assert code == 0 and out_file.read_bytes() != first
    code, _, err = run_cli(capsys, "export", run, "-o", tmp_path)
    assert code == 2 and "is a directory" in err
    code, _, err = run_cli(capsys, "export", paths["empty"], "-o", tmp_path / "e.safetensors")
    assert code == 2 and "holds no valid checkpoint" in err
    _corrupt_manifest(run / "step-000000010")
    _corrupt_manifest(run / "step-000000020")
    code, _, err = run_cli(capsys, "export", run, "-o", tmp_path / "c.safetensors")
    assert code == 2 and "holds no valid checkpoint" in err and not (tmp_path / "c.safetensors").exists()
    code, _, err = run_cli(capsys, "export", run)
    assert code == 2 and "the following arguments are required: -o/--output" in err


# ---- demo's arguments --------------------------------------------------------------------------


@pytest.mark.parametrize("argv,words", [
    (["--steps", "0"], "demo needs --every >= 1 and --steps >= 4 x --every (got --steps 0 --every 50)"),
    (["--every", "0"], "demo needs --every >= 1"),
    (["--steps", "100", "--every", "50"], "(got --steps 100 --every 50)"),
    (["--steps", "many"], "invalid int value: 'many'"),
])
def test_demo_argument_errors(capsys: pytest.CaptureFixture[str], argv: list[str], words: str) -> None:
    code, _, err = run_cli(capsys, "demo", *argv)
    assert code == 2 and words in err


# ---- as real processes -------------------------------------------------------------------------


def test_real_processes_end_without_traceback(run: Path, paths: dict[str, Path], tmp_path: Path) -> None:
    cases = [
        (["ls", str(paths["file"])], 2), (["inspect", str(paths["missing"])], 2), (["verify", str(run)], 0),
        (["ls", str(run / "step-000000010")], 0), (["export", str(run), "-o", str(paths["file"])], 2),
        (["nonsense"], 2),
    ]
    for argv, want in cases:
        p = subprocess.run([sys.executable, "-m", "ckptguard.cli", *argv], capture_output=True, text=True, timeout=300)
        assert p.returncode == want, (argv, p.stdout, p.stderr)
        assert "Traceback" not in p.stderr, p.stderr


# ---- the same situations across the commands that take a checkpoint or a run -------------------

CKPT_COMMANDS = {
    "verify": ([], 1, "no checkpoints found", "missing: not a committed checkpoint"),
    "inspect": ([], 2, "No committed checkpoint in", "step directories without a manifest"),
    "doctor": ([], 2, "No checkpoint in", "step-000000030"),
    "export": (["-o", "{tmp}/o.safetensors"], 2, "holds no valid checkpoint", "holds no valid checkpoint"),
}


@pytest.mark.parametrize("cmd", sorted(CKPT_COMMANDS))
def test_empty_and_debris_only_runs(capsys: pytest.CaptureFixture[str], paths: dict[str, Path], tmp_path: Path, cmd: str) -> None:
    extra, code_want, empty_words, debris_words = CKPT_COMMANDS[cmd]
    extra = [e.format(tmp=tmp_path) for e in extra]
    for which, words in (("empty", empty_words), ("debris", debris_words)):
        code, out, err = run_cli(capsys, cmd, paths[which], *extra)
        assert code == code_want, (which, out, err)
        assert words in out + err, (which, out, err)
    assert not (tmp_path / "o.safetensors").exists()


def test_diff_of_two_runs_and_of_a_damaged_one(capsys: pytest.CaptureFixture[str], run: Path, runs: dict[str, Path], paths: dict[str, Path]) -> None:
    code, out, _ = run_cli(capsys, "diff", run, runs["incremental"], "--json")
    d = json.loads(out)
    assert code == 0 and d["step_a"] == d["step_b"] == 20 and {t["status"] for t in d["tensors"]} <= {"same", "changed"}
    code, _, err = run_cli(capsys, "diff", paths["debris"], run)
    assert code == 2 and "No committed checkpoint" in err
    entry = json.loads((run / "step-000000020" / "MANIFEST.json").read_text())["files"]["model.safetensors"]
    f = run / "step-000000020" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[entry["header_size"] + entry["tensors"]["weight"]["offsets"][0]] ^= 0x01  # a tensor diff reads
    f.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "diff", run / "step-000000010", run / "step-000000020")
    assert code == 2 and "does not match its checksum" in err and "model.safetensors" in err


def test_export_of_a_run_whose_newest_is_rotten(capsys: pytest.CaptureFixture[str], run: Path, tmp_path: Path) -> None:
    _flip_data(run / "step-000000020")  # same size: listed valid until its bytes are read
    code, _, err = run_cli(capsys, "export", run, "-o", tmp_path / "m.safetensors")
    assert code == 2 and "does not match its checksum" in err and not (tmp_path / "m.safetensors").exists()
    code, out, _ = run_cli(capsys, "export", run / "step-000000010", "-o", tmp_path / "m.safetensors")
    assert code == 0 and "of step 10" in out


def test_plot_of_a_run(capsys: pytest.CaptureFixture[str], run: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    if not (run / "metrics.csv").exists():
        pytest.skip("the manager wrote no metrics.csv")
    code, out, _ = run_cli(capsys, "plot", run, "-o", tmp_path / "loss.png")
    assert code == 0 and "wrote" in out and (tmp_path / "loss.png").stat().st_size > 0
    code, _, err = run_cli(capsys, "plot", run, "-o", tmp_path / "x.png", "--metric", "nope")
    assert code == 2 and "nope" in err
