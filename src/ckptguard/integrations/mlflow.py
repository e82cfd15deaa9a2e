"""MLflow integration: every committed checkpoint is visible (and resumable) from the MLflow run.

>>> logger = MLflowLogger(experiment="exp1", tracking_uri="sqlite:///mlflow.db")
>>> mgr = cg.CheckpointManager("s3://bucket/exp1", every_steps=500)
>>> logger.attach(mgr, config=cfg)           # config -> params (flattened: "optim.lr")
>>> ...training with mgr.save(step, state, metrics={"loss": loss})...
>>> logger.finish()
>>> # later, maybe elsewhere:
>>> run_dir = resume_from_mlflow(logger.run_id, tracking_uri="sqlite:///mlflow.db")
>>> step = cg.CheckpointManager(run_dir).restore(state)

After each commit the logger sends, in the saving thread:

- the metrics given to ``save()`` since the last commit (read back from ``RUN/metrics.csv``, so
  steps that did not save are logged too), as MLflow metrics at their steps;
- the checkpoint's ``MANIFEST.json`` as an artifact ``checkpoints/step-NNNNNNNNN/MANIFEST.json``;
- tags ``ckptguard.run_uri``, ``ckptguard.latest_step``, ``ckptguard.latest_uri`` and, per
  checkpoint, ``ckptguard.ckpt.<step>.uri`` / ``ckptguard.ckpt.<step>.status``: committed,
  verified, failed, corrupt, or pruned once retention removed it.

A failure to reach MLflow is logged as a warning and never fails a save. Requires the ``mlflow``
extra (``pip install ckptguard[mlflow]``; ``mlflow-skinny`` suffices).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from ckptguard.errors import CheckpointError, CheckpointNotFoundError
from ckptguard.format.manifest import checkpoint_name
from ckptguard.run.catalog import scan
from ckptguard.run.metrics_log import read_metrics

__all__ = ["MLflowLogger", "flatten_params", "resume_from_mlflow"]

log = logging.getLogger(__name__)

TAG_RUN_URI = "ckptguard.run_uri"
TAG_LATEST_STEP = "ckptguard.latest_step"
TAG_LATEST_URI = "ckptguard.latest_uri"
TAG_LOGGED_THROUGH = "ckptguard.metrics_logged_through"
_BATCH = 900  # MLflow accepts at most 1000 metrics per log_batch


def _client(tracking_uri: str | None) -> Any:
    try:
        from mlflow import MlflowClient
    except ImportError as e:
        raise CheckpointError(
            "The MLflow integration needs mlflow: run 'pip install ckptguard[mlflow]' "
            "(mlflow-skinny with sqlalchemy and alembic is enough for a SQLite store)."
        ) from e
    return MlflowClient(tracking_uri=tracking_uri)


def flatten_params(config: Any, prefix: str = "") -> dict[str, str]:
    """Nested dicts / dataclasses / lists -> ``{"optim.lr": "0.001", "layers.0": "64"}``."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    out: dict[str, str] = {}
    if isinstance(config, Mapping):
        items: Iterable[tuple[Any, Any]] = config.items()
    elif isinstance(config, (list, tuple)):
        items = enumerate(config)
    else:
        return {prefix or "value": str(config)[:6000]}
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, (Mapping, list, tuple)) or (dataclasses.is_dataclass(v) and not isinstance(v, type)):
            out.update(flatten_params(v, key))
        else:
            out[key] = str(v)[:6000]
    return out


class MLflowLogger:
    """Logs a CheckpointManager's config, metrics and checkpoints to one MLflow run.

    Args:
        run_id: log into this existing run (e.g. when resuming); a new run is created when None.
        experiment: experiment name for a new run (created if missing).
        tracking_uri: MLflow tracking URI (``sqlite:///mlflow.db``, ``http://host:5000``...);
            None uses MLflow's own default (``MLFLOW_TRACKING_URI``).
        artifact_location: artifact root for a newly created experiment.
        run_name: name of a newly created run.
    """

    def __init__(
        self,
        run_id: str | None = None,
        *,
        experiment: str = "ckptguard",
        tracking_uri: str | None = None,
        artifact_location: str | None = None,
        run_name: str | None = None,
    ) -> None:
        self.client = _client(tracking_uri)
        if run_id is None:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(
                experiment, artifact_location=artifact_location
            )
            # MLflow draws a random run name from Python's global RNG when none is given: that
            # would shift the training's random stream, so name the run without touching it.
            name = run_name or f"ckptguard-{uuid.uuid4().hex[:8]}"
            run_id = self.client.create_run(exp_id, run_name=name).info.run_id
        self.run_id: str = run_id
        tags = self.client.get_run(run_id).data.tags
        self._logged_through = int(tags.get(TAG_LOGGED_THROUGH, -1))
        self._known: dict[int, str] = {
            int(k.split(".")[2]): v for k, v in tags.items()
            if k.startswith("ckptguard.ckpt.") and k.endswith(".status")
        }
        self._storage: Any = None
        self._config_logged = "ckptguard.config_logged" in tags

    # ---- wiring -------------------------------------------------------------------------------

    def attach(self, manager: Any, config: Any = None) -> MLflowLogger:
        """Log after every commit of ``manager``; log ``config`` (flattened) as params now."""
        self._storage = manager.storage
        manager.add_post_commit_hook(self.on_commit)
        self._safely(self.client.set_tag, self.run_id, TAG_RUN_URI, manager.storage.describe(""))
        if config is not None:
            self.log_config(config)
        return self

    def log_config(self, config: Any) -> None:
        """Config -> params. Params are immutable in MLflow: a resumed run logs only new keys."""
        existing = self.client.get_run(self.run_id).data.params
        params = {k: v for k, v in flatten_params(config).items() if k not in existing}
        self._log_batch(params=params, tags={"ckptguard.config_logged": "1"})
        self._config_logged = True

    def _safely(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - MLflow trouble must never fail a save
            log.warning("MLflow logging failed (run %s): %s", self.run_id, e)
            return None

    def _log_batch(self, *, metrics: list[Any] | None = None, params: Mapping[str, str] | None = None,
                   tags: Mapping[str, str] | None = None) -> None:
        """Send in chunks within MLflow's per-request limits (1000 metrics, 100 params/tags)."""
        from mlflow.entities import Param, RunTag

        m = list(metrics or [])
        p = [Param(k, v) for k, v in (params or {}).items()]
        t = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        for i in range(0, len(m), _BATCH):
            self._safely(self.client.log_batch, self.run_id, metrics=m[i : i + _BATCH])
        for i in range(0, len(p), 100):
            self._safely(self.client.log_batch, self.run_id, params=p[i : i + 100])
        for i in range(0, len(t), 100):
            self._safely(self.client.log_batch, self.run_id, tags=t[i : i + 100])

    # ---- the post-commit hook -----------------------------------------------------------------

    def on_commit(self, manifest: Mapping[str, Any]) -> None:
        """Called by the manager after each commit (registered by ``attach``)."""
        try:
            self._on_commit(manifest)
        except Exception as e:  # noqa: BLE001 - never fail the save
            log.warning("MLflow logging of step %s failed: %s", manifest.get("step"), e)

    def _on_commit(self, manifest: Mapping[str, Any]) -> None:
        storage = self._storage
        step = int(manifest["step"])
        name = checkpoint_name(step)
        uri = storage.describe(name)
        if not self._config_logged:
            self._log_config_from(name)
        metrics = self._new_metrics()
        status = str((manifest.get("verification") or {}).get("status") or "committed")
        if status == "unverified":
            status = "committed"
        artifact = f"checkpoints/{name}/MANIFEST.json"
        self._safely(self.client.log_text, self.run_id, json.dumps(manifest, indent=1), artifact)
        self._known[step] = status
        tags = {TAG_LATEST_STEP: str(step), TAG_LATEST_URI: uri, **self._status_tags(current=step)}
        if metrics:
            tags[TAG_LOGGED_THROUGH] = str(self._logged_through)
        self._log_batch(metrics=metrics, tags=tags)

    def _log_config_from(self, name: str) -> None:
        from ckptguard.format.safejson import yaml_loads

        try:
            raw = self._storage.read_bytes(f"{name}/config.yaml")
        except CheckpointNotFoundError:
            return
        try:
            config = yaml_loads(raw)
        except ValueError as e:
            log.warning("%s/config.yaml is not a config MLflow can log (%s); skipped", name, e)
            return
        self.log_config(config if isinstance(config, dict) else {})

    def _new_metrics(self) -> list[Any]:
        from mlflow.entities import Metric

        _, rows = read_metrics(self._storage)
        out = []
        for row in rows:
            step = int(row["step"])
            if step <= self._logged_through:
                continue
            ts = int(float(row.get("wall_time", 0.0)) * 1000)
            for k, v in row.items():
                if k not in ("step", "wall_time") and isinstance(v, float):
                    out.append(Metric(k, v, ts, step))
        if rows:
            self._logged_through = max(self._logged_through, max(int(r["step"]) for r in rows))
        return out

    def _status_tags(self, current: int | None = None) -> dict[str, str]:
        """Tags for every checkpoint this run logged: its URI and its present status."""
        present = {c.step: c for c in scan(self._storage, check_files=False)}
        tags: dict[str, str] = {}
        for step in sorted(self._known):
            c = present.get(step)
            if c is None:
                status = "pruned" if step != current else self._known[step]
            else:
                status = "committed" if c.status in ("unverified", "") else c.status
            if status != self._known[step] or step == current:
                tags[f"ckptguard.ckpt.{step}.status"] = status
                tags[f"ckptguard.ckpt.{step}.uri"] = self._storage.describe(checkpoint_name(step))
            self._known[step] = status
        return tags

    def sync_status(self) -> dict[int, str]:
        """Re-tag every logged checkpoint with its present status (pruned, verified, corrupt...)."""
        self._log_batch(tags=self._status_tags())
        return dict(self._known)

    def finish(self, status: str = "FINISHED") -> None:
        """Final status sync, then mark the MLflow run terminated."""
        if self._storage is not None:
            self.sync_status()
        self._safely(self.client.set_terminated, self.run_id, status)


def resume_from_mlflow(run_id: str, *, tracking_uri: str | None = None) -> str:
    """The run directory (path or URL) that MLflow run ``run_id`` checkpointed into."""
    client = _client(tracking_uri)
    tags = client.get_run(run_id).data.tags
    uri = tags.get(TAG_RUN_URI)
    if not uri:
        raise CheckpointNotFoundError(
            f"MLflow run {run_id} has no tag {TAG_RUN_URI!r}: it was not logged by "
            "ckptguard's MLflowLogger. Pass the run directory to CheckpointManager directly."
        )
    return str(uri)
