"""The collective save of a torch.distributed run (see ckptguard.distributed.coordination)."""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from ckptguard.capture.state import TrainState, capture
from ckptguard.distributed.coordination import PER_RANK_KEYS, Coordinator, agree, capture_exc, on_primary, rank_file
from ckptguard.distributed.dcp import DCP_DIR, dcp_save, hash_file, is_sharded
from ckptguard.errors import CheckpointError, UnsupportedStateError
from ckptguard.format.manifest import checkpoint_name, safe_relpath
from ckptguard.persist.writer import begin_checkpoint, clean_debris, write_blob, write_checkpoint
from ckptguard.storage.base import Storage, join
from ckptguard.storage.local import LocalStorage

__all__ = ["save_distributed", "without_model"]

log = logging.getLogger(__name__)


def without_model(state: TrainState) -> TrainState:
    """The TrainState minus model and optimizers (those go through DCP)."""
    ts = copy.copy(state)
    ts.model = None
    ts.optimizers = {}
    return ts


def _hash_share(storage: Storage, staging: str, coord: Coordinator) -> dict[str, dict[str, Any]]:
    """Hash this rank's round-robin share of the DCP files; return their manifest entries."""
    root = storage.describe(join(staging, DCP_DIR))
    names = sorted(os.listdir(root))
    out = {}
    for name in names[coord.rank :: coord.world_size]:
        rel = safe_relpath(f"{DCP_DIR}/{name}", root)
        size, digest = hash_file(os.path.join(root, name))
        out[rel] = {"kind": "blob", "size": size, "xxh3_128": digest}
    return out


def save_distributed(
    mgr: Any,
    step: int,
    state: TrainState,
    metrics: Mapping[str, Any] | None,
    *,
    reason: str,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """One collective save (all ranks call it); rank 0 returns the manifest, others None."""
    coord: Coordinator = mgr._coord
    storage: Storage = mgr.storage
    t0 = time.perf_counter()
    mgr.wait()
    sharded = is_sharded(state.model)
    if sharded and not isinstance(storage, LocalStorage):
        raise UnsupportedStateError(
            f"Sharded (FSDP2/DTensor) state is saved through torch.distributed.checkpoint, which "
            f"ckptguard supports on local or shared filesystems only; {storage.url} is not one. "
            "Use a mounted path for the run directory."
        )
    snap, exc = capture_exc(lambda: capture(without_model(state) if sharded else state, step))
    agree(coord, exc, storage.describe(checkpoint_name(step)), "save")  # no rank waits for a failed one
    assert snap is not None
    tensor_files = {k: v for k, v in snap.tensor_files.items() if v} if sharded else snap.tensor_files

    def prepare() -> str:
        mgr._acquire_lock()
        if mgr._lock is not None:
            mgr._lock.refresh()  # before removing debris: a writer that lost the run removes nothing
        if not mgr._debris_cleaned:
            clean_debris(storage)
            mgr._debris_cleaned = True
        return begin_checkpoint(storage, step)

    staging = on_primary(coord, prepare, f"preparing {storage.describe(checkpoint_name(step))}")
    written: dict[str, dict[str, Any]] = {}
    error: str | None = None
    try:
        if sharded:
            assert state.model is not None
            dcp_save(state.model, state.optimizers.values(), storage.describe(join(staging, DCP_DIR)))
            written.update(_hash_share(storage, staging, coord))
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        error = f"rank {coord.rank}: sharded state: {type(e).__name__}: {e}"
    try:
        doc = {"format_version": 1, "rank": coord.rank, "world_size": coord.world_size, "step": step}
        doc.update({k: snap.state[k] for k in PER_RANK_KEYS if k in snap.state})
        name = rank_file(coord.rank)
        written[name] = write_blob(storage, join(staging, name), json.dumps(doc, separators=(",", ":")).encode())
    except Exception as e:  # noqa: BLE001 - reported to rank 0, raised on every rank
        error = error or f"rank {coord.rank}: {type(e).__name__}: {e}"
    reports = coord.gather((written, error))

    committed: dict[str, Any] = {}

    def commit() -> str:
        assert reports is not None
        errors = [err for _, err in reports if err]
        if errors:
            storage.remove_tree(staging)
            raise CheckpointError("; ".join(errors))
        entries: dict[str, dict[str, Any]] = {}
        for files, _ in reports:
            entries.update(files)
        fields = mgr._fields(step, state, snap, metrics, reason)
        fields["extra"].update(extra or {})
        fields["distributed"] = {
            "world_size": coord.world_size,
            "mode": "dcp" if sharded else "replicated",
            "rank_files": [rank_file(r) for r in range(coord.world_size)],
        }
        blobs = {"state.json": json.dumps(snap.state, separators=(",", ":")).encode()}
        if snap.config_yaml is not None:
            blobs["config.yaml"] = snap.config_yaml
        fields["save_seconds"] = time.perf_counter() - t0
        committed.update(
            write_checkpoint(
                storage, step, tensor_files, blobs, fields, staging=staging, written=entries,
                before_commit=mgr._lock.check if mgr._lock is not None else None,
            )
        )
        return str(committed["name"])

    try:
        on_primary(coord, commit, f"committing step {step}")
    except CheckpointError as e:
        raise CheckpointError(
            f"Distributed save of step {step} to {storage.url} failed: {e}. The checkpoints "
            "already committed are intact."
        ) from e
    mgr.last_saved_step = step
    mgr.last_save_seconds = mgr.last_blocked_seconds = time.perf_counter() - t0
    mgr.schedule.saved()
    if not coord.is_primary:
        return None
    log.info("Saved %s (%d ranks) in %.3fs", storage.describe(checkpoint_name(step)), coord.world_size, mgr.last_save_seconds)
    mgr._after_commit(committed)
    return committed
