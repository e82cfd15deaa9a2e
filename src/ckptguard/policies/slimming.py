"""Slimming: which kept checkpoints keep their training-only state (``Retention(full_last=N)``).

A long phased history costs a fraction when only the newest checkpoints can resume training
exactly and the older ones keep their weights (NeMo measured ~7x smaller). This module decides
(policies decide, never delete); :mod:`ckptguard.persist.slim` carries a decision out.

What "training-only" means here: the files of a checkpoint that hold nothing but state that only
continuing the training needs, :data:`TRAINING_ONLY_FILES`: the optimizer's tensors
(``optimizer.safetensors``; Adam's two moments are twice the weights). Slimming removes whole
files and never rewrites one, so that a kill leaves either manifest with all its files:
``model.safetensors`` (the weights), ``state.safetensors`` (the model's extra state, user
objects such as an EMA that ``ckptguard export --object`` writes out, scheduler and scaler
tensors: small), ``state.json`` (kilobytes: the optimizer's hyper-parameters and structure that
``doctor`` compares, the scheduler, the data position, the RNG), ``config.yaml``, the metrics,
probe results and environment of the manifest all stay. A sharded (DCP) checkpoint mixes model
and optimizer shards in each rank's file: it has no such file and is never slimmed.

The manifest of a slimmed checkpoint has a top-level :data:`SLIMMED` record,
``{"dropped": [file names], "at": <unix time>, "bytes_freed": n, "kinds": {file: kind}}``
(``bytes_freed``: the dropped files' sizes; in an incremental run the shared packs they used are
freed by garbage collection once no other checkpoint references them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ckptguard.run.catalog import CheckpointInfo

__all__ = ["SLIMMED", "TRAINING_ONLY_FILES", "plan_slimming", "slimmed_record", "training_only_files"]

SLIMMED = "slimmed"
TRAINING_ONLY_FILES = ("optimizer.safetensors",)


def slimmed_record(manifest: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The manifest's record of the slimming that made it weights only, or None (a full one)."""
    rec = (manifest or {}).get(SLIMMED)
    return rec if isinstance(rec, dict) else None


def training_only_files(manifest: Mapping[str, Any] | None) -> list[str]:
    """The files slimming would drop from a checkpoint with this manifest (empty: nothing to
    drop, or slimmed already)."""
    files = (manifest or {}).get("files")
    if not isinstance(files, dict) or slimmed_record(manifest) is not None:
        return []
    return [f for f in TRAINING_ONLY_FILES if f in files]


def plan_slimming(kept: Sequence[CheckpointInfo], n: int, protected: Mapping[int, str]) -> dict[int, tuple[str, ...]]:
    """Which of the ``kept`` checkpoints (sorted by step) are slim: step -> the files to drop
    (empty for one slimmed before; it stays slimmed). Slim: valid, older than the newest ``n``
    valid kept ones that still have their training state, not ``protected`` (the caller's
    invariants: resumed from, just saved, pinned), and holding training-only files."""
    valid = [c for c in kept if c.valid]
    full = [c.step for c in valid if slimmed_record(c.manifest) is None]
    newest = set(full[max(0, len(full) - n) :])
    out: dict[int, tuple[str, ...]] = {}
    for c in valid:
        drop = training_only_files(c.manifest)
        if slimmed_record(c.manifest) is not None:
            out[c.step] = ()
        elif drop and c.step not in newest and c.step not in protected:
            out[c.step] = tuple(drop)
    return out
