"""Property: any flipped, truncated or extended byte in any file of a checkpoint is detected.

One small run (step 1 and step 2) is built once. Each example damages one file of step 2 (the
manifest, state.json, config.yaml, a safetensors header or its data), then checks that
``verify`` reports it, that ``restore`` falls back to step 1 with a warning naming the checkpoint
and the file, and that nothing but a CheckpointError ever escapes. The file is put back after.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptguard as cg
from ckptguard.errors import CheckpointError, CorruptCheckpointError
from ckptguard.format.manifest import STATUS
from conftest import FULL
from trainlib import make_setup, same_weights, two_step_run

EXAMPLES = 3000 if FULL else 1000
STEP2 = "step-000000002"
COUNTS = {"cases": 0, "verify_detected": 0, "restore_detected": 0}


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def fuzz_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run = tmp_path_factory.mktemp("fuzz") / "run"
    w1 = two_step_run(run)
    files = sorted(p.name for p in (run / STEP2).iterdir())
    assert {"MANIFEST.json", "model.safetensors", "optimizer.safetensors", "state.json", "config.yaml"} <= set(files)
    originals = {f: (run / STEP2 / f).read_bytes() for f in files}
    target = make_setup(hidden=4, seed=5)
    mgr = cg.CheckpointManager(run, lock=False)
    handler = _Capture()
    logging.getLogger("ckptguard").addHandler(handler)
    yield {"run": run, "files": files, "originals": originals, "w1": w1, "target": target, "mgr": mgr, "log": handler}
    logging.getLogger("ckptguard").removeHandler(handler)
    mgr.close()


@st.composite
def damage(draw: st.DrawFn, files: list[str], originals: dict[str, bytes]) -> tuple[str, str, bytes]:
    fname = draw(st.sampled_from(files))
    data = originals[fname]
    kind = draw(st.sampled_from(["flip", "flip", "truncate", "extend"]))
    if kind == "flip":
        # bias towards the start of the file, where headers and manifests' structure live
        pos = draw(st.one_of(st.integers(0, min(len(data) - 1, 255)), st.integers(0, len(data) - 1)))
        mask = draw(st.integers(1, 255))
        out = data[:pos] + bytes([data[pos] ^ mask]) + data[pos + 1 :]
        return fname, f"flip byte {pos} ^ {mask:#04x}", out
    if kind == "truncate":
        n = draw(st.integers(0, len(data) - 1))
        return fname, f"truncate to {n} bytes", data[:n]
    extra = draw(st.binary(min_size=1, max_size=16))
    return fname, f"extend by {extra!r}", data + extra


def test_every_damaged_byte_is_detected(fuzz_run: dict[str, Any]) -> None:
    run: Path = fuzz_run["run"]
    ckpt = run / STEP2

    @settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=damage(fuzz_run["files"], fuzz_run["originals"]))
    def check(case: tuple[str, str, bytes]) -> None:
        fname, how, data = case
        (ckpt / fname).write_bytes(data)
        fuzz_run["log"].messages.clear()
        try:
            COUNTS["cases"] += 1
            try:
                report = cg.verify(ckpt)
            except CheckpointError:
                report = None  # refusing the whole checkpoint also counts as detection
            assert report is None or not report.ok, f"verify missed: {fname} {how}"
            COUNTS["verify_detected"] += 1
            target = fuzz_run["target"]
            try:
                got = fuzz_run["mgr"].restore(target["state"])
            except CorruptCheckpointError:
                got = None  # nothing valid left would also be a detection; here step 1 exists
            assert got == 1, f"restore did not fall back for {fname} {how}: got {got}"
            assert same_weights(target["model"].state_dict(), fuzz_run["w1"])
            text = "\n".join(fuzz_run["log"].messages)
            assert STEP2 in text and fname in text, f"warning must name {STEP2} and {fname}: {text}"
            if fname != "MANIFEST.json":  # a bad manifest is unlisted; a bad file gets a mark
                assert '"corrupt"' in (ckpt / STATUS).read_text()
            assert [c.step for c in fuzz_run["mgr"].checkpoints() if c.valid] == [1]
            COUNTS["restore_detected"] += 1
        finally:
            (ckpt / fname).write_bytes(fuzz_run["originals"][fname])
            (ckpt / STATUS).unlink(missing_ok=True)

    check()
    assert COUNTS["cases"] >= EXAMPLES
    assert COUNTS["verify_detected"] == COUNTS["restore_detected"] == COUNTS["cases"]
    # Undamaged again: sound, and restore picks step 2.
    assert cg.verify(run).ok
    assert fuzz_run["mgr"].restore(fuzz_run["target"]["state"]) == 2
    print(f"\nfuzz: {COUNTS['cases']} cases, verify detected {COUNTS['verify_detected']}, "
          f"restore detected {COUNTS['restore_detected']}")


def test_restore_of_a_named_corrupt_step_raises(fuzz_run: dict[str, Any], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(fuzz_run["run"], run)
    data = bytearray((run / STEP2 / "model.safetensors").read_bytes())
    data[-1] ^= 0x10
    (run / STEP2 / "model.safetensors").write_bytes(bytes(data))
    with cg.CheckpointManager(run) as mgr:
        with pytest.raises(CorruptCheckpointError) as info:
            mgr.restore(make_setup(hidden=4)["state"], step=2)
        assert STEP2 in str(info.value) and "model.safetensors" in str(info.value)
        assert "ckptguard verify" in str(info.value)
        assert mgr.restore(make_setup(hidden=4)["state"]) == 1  # marked, skipped from now on
    assert '"corrupt"' in (run / STEP2 / STATUS).read_text()
    report = cg.verify(run)
    assert not report.ok and [p.file for p in report.problems] == ["model.safetensors"]
