"""Untrusted checkpoints: every hostile input is refused with a clear CheckpointError.

Each case damages step 2 of a run whose step 1 is sound, keeping the manifest's own checksum
valid where the attack needs it (so the check under test, not the checksum, is what refuses it).
For each: ``verify`` reports it, ``restore`` falls back to step 1 (or raises a CheckpointError),
nothing outside the checkpoint is read, no pickle is ever executed, and the CLI exits 1/2 with a
message and no traceback (the CLI runs as a real subprocess).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import ckptguard as cg
from ckptguard.errors import CheckpointError, FormatVersionError, UnsafeCheckpointError
from ckptguard.format.manifest import encode_manifest
from ckptguard.format.tensorfile import digest_bytes
from ckptguard.run.catalog import read_manifest
from ckptguard.storage import LocalStorage
from trainlib import make_setup, same_weights, two_step_run

STEP2 = "step-000000002"
PY = sys.executable


@pytest.fixture(scope="module")
def good_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run = tmp_path_factory.mktemp("hostile") / "run"
    w1 = two_step_run(run, metrics={"loss": 1.0})
    return {"run": run, "w1": w1}


@pytest.fixture
def run(good_run: dict[str, Any], tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(good_run["run"], dest)
    return dest


def load_manifest(ckpt: Path) -> dict[str, Any]:
    data = json.loads((ckpt / "MANIFEST.json").read_bytes())
    data.pop("manifest_xxh3_128")
    return data


def save_manifest(ckpt: Path, manifest: dict[str, Any]) -> None:
    """Write a manifest whose own checksum is valid (a consistent, hostile manifest)."""
    (ckpt / "MANIFEST.json").write_bytes(encode_manifest(manifest))


def reseal(ckpt: Path, fname: str, data: bytes) -> None:
    """Replace a blob and make the manifest agree with it (size and checksum)."""
    (ckpt / fname).write_bytes(data)
    m = load_manifest(ckpt)
    m["files"][fname].update(size=len(data), xxh3_128=digest_bytes(data))
    save_manifest(ckpt, m)


def rename_entry(new: str) -> Callable[[Path], None]:
    def attack(ckpt: Path) -> None:
        m = load_manifest(ckpt)
        m["files"] = {new if k == "model.safetensors" else k: v for k, v in m["files"].items()}
        save_manifest(ckpt, m)
    return attack


def assert_refused(run: Path, w1: dict[str, torch.Tensor], *, cli: bool = True) -> str:
    """verify reports step 2, restore falls back to step 1; returns verify's message."""
    report = cg.verify(run / STEP2)
    assert not report.ok
    text = "; ".join(str(p) for p in report.problems)
    assert STEP2 in text
    s = make_setup(hidden=4, seed=3)
    with cg.CheckpointManager(run) as mgr:
        assert mgr.restore(s["state"]) == 1
        assert [c.step for c in mgr.checkpoints() if c.valid] == [1]
    assert same_weights(s["model"].state_dict(), w1)
    return text


# ---- paths that leave the checkpoint -------------------------------------------------------


@pytest.mark.parametrize("name", ["../model.safetensors", "/etc/passwd", "a/../../x", "./model.safetensors", "model.safetensors\x00"])
def test_manifest_path_escaping_the_directory_is_refused(run: Path, good_run: dict[str, Any], name: str) -> None:
    rename_entry(name)(run / STEP2)
    with pytest.raises(UnsafeCheckpointError, match="refusing file path|not a valid name"):
        read_manifest(LocalStorage(run), STEP2)
    assert "refusing file path" in assert_refused(run, good_run["w1"])


def test_symlinked_data_file_is_refused(run: Path, good_run: dict[str, Any], tmp_path: Path) -> None:
    outside = tmp_path / "outside.safetensors"
    shutil.copy(run / STEP2 / "model.safetensors", outside)  # same bytes: only the link is wrong
    (run / STEP2 / "model.safetensors").unlink()
    (run / STEP2 / "model.safetensors").symlink_to(outside)
    assert "symbolic link" in assert_refused(run, good_run["w1"])


def test_symlinked_checkpoint_directory_is_refused(run: Path, good_run: dict[str, Any], tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    shutil.move(run / STEP2, real)
    (run / STEP2).symlink_to(real, target_is_directory=True)
    assert "symbolic link" in assert_refused(run, good_run["w1"])


def test_symlinked_manifest_is_refused(run: Path, good_run: dict[str, Any], tmp_path: Path) -> None:
    shutil.move(run / STEP2 / "MANIFEST.json", tmp_path / "m.json")
    (run / STEP2 / "MANIFEST.json").symlink_to(tmp_path / "m.json")
    assert "symbolic link" in assert_refused(run, good_run["w1"])


# ---- safetensors headers that lie -----------------------------------------------------------


def test_huge_header_length_in_the_file_is_refused(run: Path, good_run: dict[str, Any]) -> None:
    path = run / STEP2 / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", 2**63)
    path.write_bytes(bytes(data))
    assert "model.safetensors" in assert_refused(run, good_run["w1"])


def test_huge_header_size_in_the_manifest_is_refused(run: Path, good_run: dict[str, Any]) -> None:
    m = load_manifest(run / STEP2)
    m["files"]["model.safetensors"]["header_size"] = 2**40
    save_manifest(run / STEP2, m)
    assert "implausibly large" in assert_refused(run, good_run["w1"])


def test_offsets_past_the_end_are_refused(run: Path, good_run: dict[str, Any]) -> None:
    m = load_manifest(run / STEP2)
    e = m["files"]["model.safetensors"]
    last = max(e["tensors"].values(), key=lambda t: t["offsets"][1])
    n = 10**10  # 40 GB: must be refused before any allocation
    last["shape"] = [n]
    last["offsets"] = [last["offsets"][0], last["offsets"][0] + 4 * n]
    e["size"] = e["header_size"] + last["offsets"][1]
    save_manifest(run / STEP2, m)
    assert "the manifest recorded 40000000" in assert_refused(run, good_run["w1"])


def test_file_header_disagreeing_with_manifest_is_refused(run: Path, good_run: dict[str, Any]) -> None:
    """Same byte sizes, so only comparing the two headers can notice: dtype F32 -> I32, shape swapped."""
    m = load_manifest(run / STEP2)
    t = m["files"]["model.safetensors"]["tensors"]["body.0.weight"]
    t["dtype"] = "I32"
    t["shape"] = list(reversed(t["shape"]))
    save_manifest(run / STEP2, m)
    assert "disagrees with the manifest" in assert_refused(run, good_run["w1"])


def test_manifest_dtype_shape_inconsistent_with_byte_range_is_refused(run: Path, good_run: dict[str, Any]) -> None:
    m = load_manifest(run / STEP2)
    m["files"]["model.safetensors"]["tensors"]["body.0.weight"]["dtype"] = "F64"
    save_manifest(run / STEP2, m)
    assert "does not hold" in assert_refused(run, good_run["w1"])


# ---- malformed JSON, unknown versions ----------------------------------------------------


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b"\xff\xfe", b"[" * 100_000, b'{"format": "ckptguard"}'])
def test_malformed_manifest_is_refused(run: Path, good_run: dict[str, Any], raw: bytes) -> None:
    (run / STEP2 / "MANIFEST.json").write_bytes(raw)
    assert "malformed manifest" in assert_refused(run, good_run["w1"])


@pytest.mark.parametrize(
    "raw",
    [b"{not json", b"[]", b'{"optimizers": 1}', b'{"schedulers": 5}', b'{"rng": "x"}',
     b'{"dataloader": [1, 2]}', b'{"extra": {"__tensor__": "nope"}}', b"[" * 100_000],
    ids=["syntax", "list", "optimizers", "schedulers", "rng", "dataloader", "extra-ref", "deep"],
)
def test_malformed_state_json_is_refused(run: Path, good_run: dict[str, Any], raw: bytes) -> None:
    """A consistent manifest over a hostile state.json: restore must refuse, never crash."""
    reseal(run / STEP2, "state.json", raw)
    assert cg.verify(run / STEP2).ok  # the bytes are what the manifest says: only loading can tell
    s = make_setup(hidden=4, seed=3)
    with cg.CheckpointManager(run) as mgr:
        assert mgr.restore(s["state"]) == 1
        assert [c.step for c in mgr.checkpoints() if c.valid] == [1]
    assert same_weights(s["model"].state_dict(), good_run["w1"])


@pytest.mark.parametrize("version", [2, 99, 0, "1", None, True])
def test_unknown_format_version(run: Path, good_run: dict[str, Any], version: object) -> None:
    m = load_manifest(run / STEP2)
    m["format_version"] = version
    save_manifest(run / STEP2, m)
    if not isinstance(version, int) or isinstance(version, bool):
        assert "format_version must be an integer" in assert_refused(run, good_run["w1"])
        return
    upgrade = rf"version {version}; this ckptguard reads up to version 1. Upgrade ckptguard \('pip install -U ckptguard'\)"
    with pytest.raises(FormatVersionError, match=upgrade):
        read_manifest(LocalStorage(run), STEP2)
    assert "format version" in "; ".join(str(p) for p in cg.verify(run / STEP2).problems)
    # The newest checkpoint is from a newer ckptguard: restore says so instead of resuming older state.
    with cg.CheckpointManager(run) as mgr, pytest.raises(FormatVersionError, match=upgrade):
        mgr.restore(make_setup(hidden=4)["state"])
    assert not (run / STEP2 / "STATUS.json").exists()  # not marked corrupt: it is not


# ---- pickle payloads never run ------------------------------------------------------------


class Evil:
    """Unpickling this touches the sentinel file named in the environment variable."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = str(sentinel)

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.sentinel}",))


def payloads(sentinel: Path) -> dict[str, bytes]:
    buf = io.BytesIO()
    torch.save({"x": Evil(sentinel)}, buf)  # a torch zip whose data.pkl runs code
    return {"pickle": pickle.dumps(Evil(sentinel)), "torch": buf.getvalue()}


def test_pickle_payload_works_when_unpickled(tmp_path: Path) -> None:
    """The control: these payloads do run code when something unpickles them."""
    sentinel = tmp_path / "ran"
    pickle.loads(payloads(sentinel)["pickle"])
    assert sentinel.exists()


INSIDE = ["MANIFEST.json", "model.safetensors", "optimizer.safetensors", "state.json", "config.yaml", "STATUS.json"]
RUN_FILES = ["ckptguard.json", "metrics.csv", "probe.safetensors", ".ckptguard.run.lock", "step-000000003/MANIFEST.json"]


@pytest.mark.parametrize("kind", ["pickle", "torch"])
def test_pickle_payload_anywhere_is_never_executed(good_run: dict[str, Any], tmp_path: Path, kind: str) -> None:
    sentinel = tmp_path / "ran"
    payload = payloads(sentinel)[kind]
    targets: list[Path] = []
    damaged: list[bool] = []
    for where in INSIDE + RUN_FILES:
        for resealed in (False, True):
            if resealed and where not in ("state.json", "config.yaml", "model.safetensors"):
                continue
            run = tmp_path / f"{where.replace('/', '_')}-{resealed}"
            shutil.copytree(good_run["run"], run)
            target = run / (f"{STEP2}/{where}" if where in INSIDE else where)
            target.parent.mkdir(exist_ok=True)
            if resealed and where == "model.safetensors":
                (run / STEP2 / where).write_bytes(payload)
                m = load_manifest(run / STEP2)
                m["files"][where]["size"] = len(payload)  # size agrees: the reader itself is reached
                save_manifest(run / STEP2, m)
            elif resealed:
                reseal(run / STEP2, where, payload)
            else:
                target.write_bytes(payload)
            targets.append(run)
            # verify (checksums) must fail step 2, except for a resealed blob: its bytes are what
            # the manifest says, and only restore, which parses it, can refuse it (it does)
            damaged.append(where in INSIDE and where != "STATUS.json" and not (resealed and where != "model.safetensors"))
            cg.verify(run)
            cg.verify(run / STEP2)
            s = make_setup(hidden=4, seed=3)
            try:
                with cg.CheckpointManager(run, lock=where != ".ckptguard.run.lock") as mgr:
                    mgr.checkpoints()
                    mgr.restore(s["state"])
            except CheckpointError:
                pass
            assert not sentinel.exists(), f"pickle in {where} was executed"
    # The CLI too, in one real subprocess over every hostile run and command.
    argvs = [[cmd, str(t)] for cmd in ("ls", "inspect", "verify") for r in targets for t in (r, r / STEP2)]
    result = run_cli_many(argvs)
    assert all(code in (0, 1, 2) for code in result["codes"]), result
    assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
    verify_step2 = result["codes"][-2 * len(targets) + 1 :: 2]
    assert [code for code, bad in zip(verify_step2, damaged) if bad] == [1] * sum(damaged)
    assert not sentinel.exists()


# ---- the CLI on hostile input: exit 1/2, a message, never a traceback ---------------------

DRIVER = r"""
import contextlib, io, json, sys, traceback
from ckptguard.cli import main
codes, errors = [], []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except SystemExit as e:
        code = e.code
    except BaseException:
        code = "crash"
        errors.append(traceback.format_exc())
    codes.append(code)
print(json.dumps({"codes": codes}))
sys.stderr.write("\n".join(errors))
"""


def run_cli_many(argvs: list[list[str]]) -> dict[str, Any]:
    """Run many CLI invocations in one real subprocess (python start-up with torch is slow)."""
    proc = subprocess.run([PY, "-c", DRIVER, json.dumps(argvs)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"codes": json.loads(proc.stdout.strip().splitlines()[-1])["codes"], "stderr": proc.stderr}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "ckptguard.cli", *args], capture_output=True, text=True, timeout=300, check=False)


HOSTILE: dict[str, Callable[[Path], None]] = {
    "dotdot": rename_entry("../model.safetensors"),
    "absolute": rename_entry("/etc/passwd"),
    "newer-version": lambda c: save_manifest(c, {**load_manifest(c), "format_version": 7}),
    "bad-json": lambda c: (c / "MANIFEST.json").write_bytes(b'{"format": '),
    "lying-header": lambda c: (c / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}"),
    "pickle-manifest": lambda c: (c / "MANIFEST.json").write_bytes(pickle.dumps({"a": 1})),
    "empty-dir": lambda c: [p.unlink() for p in c.iterdir()],
}


def test_cli_on_hostile_checkpoints(good_run: dict[str, Any], tmp_path: Path) -> None:
    runs = {}
    for name, attack in HOSTILE.items():
        run = tmp_path / name
        shutil.copytree(good_run["run"], run)
        attack(run / STEP2)
        runs[name] = run
    argvs = []
    for run in runs.values():
        argvs += [["verify", str(run / STEP2)], ["verify", "--json", str(run)], ["inspect", str(run / STEP2)],
                  ["ls", str(run)], ["ls", "--json", str(run)]]
    result = run_cli_many(argvs)
    assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
    codes = iter(result["codes"])
    for name in runs:
        verify_one, verify_run, inspect, ls, ls_json = (next(codes) for _ in range(5))
        assert verify_one == 1 and verify_run == 1, name
        manifest_hostile = name not in ("lying-header",)
        assert inspect == (2 if manifest_hostile else 0), (name, inspect)
        assert ls == 0 and ls_json == 0, name  # listing a run with a bad checkpoint is not an error


def test_cli_subprocess_messages(good_run: dict[str, Any], tmp_path: Path) -> None:
    """The real `python -m ckptguard.cli`: exit codes and the message a user reads."""
    run = tmp_path / "run"
    shutil.copytree(good_run["run"], run)
    HOSTILE["dotdot"](run / STEP2)
    p = cli("inspect", str(run / STEP2))
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "refusing file path '../model.safetensors'" in p.stderr and "MANIFEST.json" in p.stderr
    p = cli("verify", str(run))
    assert p.returncode == 1 and "Traceback" not in p.stderr + p.stdout
    assert "step-000000001" in p.stdout and "ok" in p.stdout and "refusing file path" in p.stdout
    p = cli("verify", "--json", str(run))
    report = json.loads(p.stdout)
    assert p.returncode == 1 and report["ok"] is False
    assert [c["ok"] for c in report["checkpoints"]] == [True, False]
    assert "refusing file path" in report["problems"][0]
    p = cli("verify", str(tmp_path / "missing"))
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr
