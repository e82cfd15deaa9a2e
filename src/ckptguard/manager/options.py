"""The manager's constructor arguments, checked and turned into the objects it keeps."""

from __future__ import annotations

from ckptguard.policies.retention import Retention
from ckptguard.policies.schedule import SaveSchedule, observed_mtbf
from ckptguard.run.runrecord import RunRecord, read_run_record
from ckptguard.storage import Storage
from ckptguard.tiers.options import Tiers

__all__ = ["checked_retention", "checked_run_id", "checked_tiers", "initial_schedule"]


def checked_run_id(run_id: str | None) -> str | None:
    """``run_id`` when it is a valid lineage name (or None); ValueError otherwise."""
    if run_id is not None and (not isinstance(run_id, str) or not run_id.replace("-", "").replace("_", "").isalnum()):
        raise ValueError(f"run_id must be a non-empty string of letters, digits, '-' and '_', got {run_id!r}")
    return run_id


def checked_retention(retention: Retention | None) -> Retention:
    """The retention policy (keep everything when None); TypeError for anything else."""
    if retention is None:
        return Retention()
    if not isinstance(retention, Retention):
        raise TypeError(f"retention must be a ckptguard.Retention, got {type(retention).__name__}")
    return retention


def initial_schedule(
    storage: Storage, record: RunRecord, every_steps: int | None, every_seconds: float | None,
    every: str | None, mtbf_seconds: float | None,
) -> SaveSchedule:
    """The save schedule; ``every="auto"`` starts from the MTBF and save cost the run's history
    observed."""
    if every not in (None, "auto"):
        raise ValueError(f"every= accepts only 'auto' (or None), got {every!r}; use every_steps/every_seconds")
    schedule = SaveSchedule(every_steps, every_seconds, auto=every == "auto", mtbf_seconds=mtbf_seconds)
    if schedule.auto:
        schedule.use_observed_mtbf(observed_mtbf(record.previous_sessions()))
        prev_cost = (read_run_record(storage).get("save_interval") or {}).get("save_cost_seconds")
        if isinstance(prev_cost, (int, float)) and not isinstance(prev_cost, bool):
            schedule.save_cost = float(prev_cost)
    return schedule


def checked_tiers(tiers: Tiers, incremental: bool) -> Tiers:
    """``tiers`` when the run can use them; TypeError/ValueError otherwise."""
    if not isinstance(tiers, Tiers):
        raise TypeError(f"tiers must be a ckptguard.tiers.Tiers, got {type(tiers).__name__}")
    if incremental:
        raise ValueError("tiers= and incremental=True do not combine yet: tiers copy whole checkpoints")
    return tiers
