"""The MLflow integration against a real local tracking store (SQLite file + artifact folder)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

import ckptguard as cg
from ckptguard.run.catalog import mark_status
from ckptguard.run.metrics_log import read_metrics
from ckptguard.storage import open_storage
from trainlib import make_setup, run_training, same_weights, train_step

pytest.importorskip("mlflow")
from mlflow import MlflowClient

from ckptguard.integrations.mlflow import MLflowLogger, flatten_params, resume_from_mlflow


@pytest.fixture(scope="module")
def tracking(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One store per module: creating the SQLite schema (alembic migrations) takes seconds."""
    root = tmp_path_factory.mktemp("mlflow")
    return {
        "tracking_uri": f"sqlite:///{root}/mlflow.db",
        "artifact_location": (root / "artifacts").as_uri(),
    }


def train(run: str, total: int, tracking: dict[str, str], *, run_id: str | None = None,
          stop_at: int | None = None, config: Any = None, keep_last: int | None = None) -> tuple[MLflowLogger, dict]:
    s = make_setup()
    state = s["state"]
    retention = cg.Retention(keep_last=keep_last) if keep_last else None
    mgr = cg.CheckpointManager(run, every_steps=5, retention=retention)
    logger = MLflowLogger(run_id, experiment="ckptguard-test", **tracking).attach(mgr, config=config)
    step = mgr.restore(state) or 0
    while step < total and step != stop_at:
        for xb, yb in s["loader"]:
            loss = train_step(s, xb, yb)
            step += 1
            state.extra["seen"] += len(xb)
            mgr.save(step, state, metrics={"loss": loss, "lr": s["sched"].get_last_lr()[0]})
            if step in (total, stop_at):
                break
        else:
            state.extra["epoch"] += 1
    mgr.wait()
    if mgr.last_saved_step != step:
        mgr.save(step, state, force=True)
    mgr.close()
    logger.finish("FINISHED" if step == total else "KILLED")
    return logger, {k: v.detach().clone() for k, v in s["model"].state_dict().items()}


def test_logs_params_metrics_manifests_and_checkpoint_tags(tmp_path: Path, tracking: dict[str, str]) -> None:
    run = str(tmp_path / "run")
    logger, _ = train(run, 15, tracking, keep_last=2)
    # a later verification finding reaches MLflow on sync
    mark_status(cg.CheckpointManager(run, lock=False).storage, "step-000000010", "verified", "probe ok")
    logger.sync_status()

    client = MlflowClient(tracking_uri=tracking["tracking_uri"])
    data = client.get_run(logger.run_id).data
    assert data.params["lr"] == "0.01" and data.params["hidden"] == "32"  # from config.yaml
    history = client.get_metric_history(logger.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 16))
    csv_losses = {r["step"]: r["loss"] for r in read_metrics(open_storage(run))[1]}
    assert all(m.value == pytest.approx(csv_losses[m.step]) for m in history)

    tags = data.tags
    assert tags["ckptguard.run_uri"] == str(Path(run).absolute())
    assert tags["ckptguard.latest_step"] == "15"
    assert tags["ckptguard.latest_uri"].endswith("run/step-000000015")
    assert tags["ckptguard.ckpt.5.status"] == "pruned"
    assert tags["ckptguard.ckpt.10.status"] == "verified"
    assert tags["ckptguard.ckpt.15.status"] == "committed"
    assert tags["ckptguard.ckpt.10.uri"].endswith("run/step-000000010")

    arts = [a.path for a in client.list_artifacts(logger.run_id, "checkpoints")]
    assert arts == ["checkpoints/step-000000005", "checkpoints/step-000000010", "checkpoints/step-000000015"]
    local = client.download_artifacts(logger.run_id, "checkpoints/step-000000010/MANIFEST.json", str(tmp_path / "dl"))
    manifest = json.loads(Path(local).read_text())
    assert manifest["step"] == 10 and "model.safetensors" in manifest["files"]
    assert client.get_run(logger.run_id).info.status == "FINISHED"


def test_resume_from_an_mlflow_run_is_exact(tmp_path: Path, tracking: dict[str, str]) -> None:
    run = f"memory://mlflow-{uuid.uuid4().hex[:8]}/run"
    cfg = {"lr": 1e-2, "model": {"hidden": 32, "layers": [8, 32, 2]}}
    first, _ = train(run, 15, tracking, stop_at=8, config=cfg)
    client = MlflowClient(tracking_uri=tracking["tracking_uri"])
    assert client.get_run(first.run_id).info.status == "KILLED"

    run_dir = resume_from_mlflow(first.run_id, tracking_uri=tracking["tracking_uri"])
    assert run_dir == run
    second, final = train(run_dir, 15, tracking, run_id=first.run_id)
    assert second.run_id == first.run_id
    assert same_weights(final, run_training(f"memory://ref-{uuid.uuid4().hex[:8]}/run", 15))

    data = client.get_run(first.run_id).data
    assert data.params["model.layers.2"] == "2" and data.params["model.hidden"] == "32"
    steps = sorted(m.step for m in client.get_metric_history(first.run_id, "loss"))
    assert steps == list(range(1, 16))  # each step once, across the two processes
    assert data.tags["ckptguard.latest_step"] == "15"
    assert data.tags["ckptguard.ckpt.8.status"] == "committed"


def test_resume_from_a_run_that_ckptguard_did_not_log(tracking: dict[str, str]) -> None:
    client = MlflowClient(tracking_uri=tracking["tracking_uri"])
    exp = client.create_experiment("other", artifact_location=tracking["artifact_location"])
    run_id = client.create_run(exp).info.run_id
    with pytest.raises(cg.errors.CheckpointNotFoundError, match="ckptguard.run_uri"):
        resume_from_mlflow(run_id, tracking_uri=tracking["tracking_uri"])


def test_flatten_params() -> None:
    assert flatten_params({"a": {"b": 1, "c": [2, {"d": 3}]}, "e": "x"}) == {
        "a.b": "1", "a.c.0": "2", "a.c.1.d": "3", "e": "x",
    }
