"""``ckptguard plot``: a real run, real retention, a real corruption, and the PNG read back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import ckptguard as cg
from ckptguard.cli import main
from ckptguard.report.plotting import plot_run
from ckptguard.run.catalog import CheckpointInfo, mark_status
from ckptguard.run.history import read_history
from ckptguard.storage import open_storage
from trainlib import make_setup, run_training

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def plotted_run(tmp_path_factory: pytest.TempPathFactory) -> str:
    run = str(tmp_path_factory.mktemp("plot") / "run")
    run_training(run, 40, manager_kwargs={"retention": cg.Retention(keep_last=3, keep_best=1, metric="loss")})
    store = open_storage(run)
    present = [c.step for c in scan_steps(run)]
    # real corruption of the newest checkpoint, found by restore (which marks it corrupt)
    model = Path(run) / f"step-{present[-1]:09d}" / "model.safetensors"
    raw = bytearray(model.read_bytes())
    raw[-3] ^= 0xFF
    model.write_bytes(bytes(raw))
    with cg.CheckpointManager(run) as mgr:
        assert mgr.restore(make_setup()["state"]) == present[-2]
    valid = [c for c in scan_steps(run) if c.valid]
    best = min((c.metrics["loss"], c.step) for c in valid)[1]
    verified = next(c.step for c in valid if c.step != best)
    mark_status(store, f"step-{verified:09d}", "verified", "probe ok")
    return run


def scan_steps(run: str) -> list[CheckpointInfo]:
    return cg.CheckpointManager(run, lock=False).checkpoints()


def test_plot_marks_every_checkpoint_by_status(plotted_run: str, tmp_path: Path) -> None:
    import matplotlib.image

    out = tmp_path / "loss.png"
    summary = plot_run(plotted_run, out, log_scale=True, smooth=5)
    ckpts = scan_steps(plotted_run)
    pruned = sorted({e["step"] for e in read_history(open_storage(plotted_run)) if e["event"] == "pruned"})
    assert pruned and summary.marks["pruned"] == pruned
    assert summary.marks["failed"] == [ckpts[-1].step]
    assert summary.marks["verified"] == [c.step for c in ckpts if c.status == "verified"]
    assert len(summary.marks["verified"]) == 1
    best = min((c.metrics["loss"], c.step) for c in ckpts if c.valid)[1]
    assert summary.marks["best"] == [best]
    drawn = sorted(s for v in summary.marks.values() for s in v)
    assert drawn == sorted(pruned + [c.step for c in ckpts])
    assert summary.points == 40
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(out)
    assert img.shape[0] > 300 and img.shape[1] > 600
    assert img[..., :3].std() > 0.05  # not a blank canvas


def test_cli_plot(plotted_run: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.png"
    assert main(["plot", plotted_run, "-o", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["output"] == str(out) and out.stat().st_size > 10_000
    assert main(["plot", plotted_run, "-o", str(out), "--metric", "accuracy"]) == 2
    assert "no column 'accuracy'" in " ".join(capsys.readouterr().err.split())


def test_plot_from_an_s3_run(s3_url: str, tmp_path: Path) -> None:
    run_training(s3_url, 12)
    summary = plot_run(s3_url, tmp_path / "s3.png")
    assert sorted(summary.marks["kept"] + summary.marks["best"]) == [5, 10]
    assert (tmp_path / "s3.png").stat().st_size > 10_000
