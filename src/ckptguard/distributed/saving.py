"""The distributed stages of a save (the pipeline is ckptguard.manager.saving).

A distributed save runs the same stages as a single process's; these are the parts that only a
torch.distributed run has: deciding whether the model is sharded (saved through DCP), what each
rank writes itself (its rank file, its share of the DCP files), and the manifest's
``distributed`` field. See ckptguard.distributed.coordination for the protocol.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from ckptguard.capture.state import TrainState
from ckptguard.distributed.coordination import PER_RANK_KEYS, Coordinator, rank_file
from ckptguard.distributed.dcp import DCP_DIR, dcp_save, dcp_state_dict, hash_file, is_sharded
from ckptguard.errors import UnsupportedStateError
from ckptguard.format.manifest import safe_relpath
from ckptguard.persist.writer import write_blob
from ckptguard.storage.base import Storage, join
from ckptguard.storage.local import LocalStorage

__all__ = ["ShardStager", "distributed_fields", "shardable", "write_rank_share"]


def shardable(storage: Storage, state: TrainState) -> bool:
    """Whether ``state``'s model is sharded (FSDP2 / DTensor: saved through DCP by every rank).

    Raises UnsupportedStateError when it is and ``storage`` is not a filesystem DCP can write to.
    """
    if not is_sharded(state.model):
        return False
    if not isinstance(storage, LocalStorage):
        raise UnsupportedStateError(
            f"Sharded (FSDP2/DTensor) state is saved through torch.distributed.checkpoint, which "
            f"ckptguard supports on local or shared filesystems only; {storage.url} is not one. "
            "Use a mounted path for the run directory."
        )
    return True


class ShardStager:
    """Async saves of sharded state: copies this rank's shards (model + optimizer, as DTensors)
    to host memory in the training thread; DCP writes the copy in the background. On CUDA the
    host buffers are pinned and reused across saves."""

    def __init__(self) -> None:
        self._stager: Any = None

    def stage(self, state: TrainState) -> dict[str, Any]:
        from torch.distributed.checkpoint.staging import BlockingAsyncStager

        assert state.model is not None
        if self._stager is None:
            self._stager = BlockingAsyncStager(cache_staged_state_dict=torch.cuda.is_available())
        staged: dict[str, Any] = self._stager.stage(dcp_state_dict(state.model, state.optimizers.values()))
        return staged


def distributed_fields(coord: Coordinator, sharded: bool) -> dict[str, Any]:
    """The manifest's ``distributed`` field."""
    return {
        "world_size": coord.world_size,
        "mode": "dcp" if sharded else "replicated",
        "rank_files": [rank_file(r) for r in range(coord.world_size)],
    }


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


def write_rank_share(
    storage: Storage, staging: str, coord: Coordinator, state: TrainState, snap_state: Mapping[str, Any], sharded: bool,
    staged: dict[str, Any] | None = None,
) -> tuple[dict[str, dict[str, Any]], str | None]:
    """The share stage: write what this rank writes itself into ``staging`` (its DCP shards, its
    rank file); return their manifest entries and this rank's error (None when it succeeded).
    ``staged``: the host copy of the sharded state (:class:`ShardStager`; None: the live model's).
    DCP's collectives run on ``coord``'s group. Errors are returned, not raised: rank 0 hears of
    them and commits nothing."""
    written: dict[str, dict[str, Any]] = {}
    error: str | None = None
    try:
        if sharded:
            if staged is None:
                assert state.model is not None
                staged = dcp_state_dict(state.model, state.optimizers.values())
            dcp_save(staged, storage.describe(join(staging, DCP_DIR)), coord.group)
            written.update(_hash_share(storage, staging, coord))
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        error = f"rank {coord.rank}: sharded state: {type(e).__name__}: {e}"
    try:
        doc = {"format_version": 1, "rank": coord.rank, "world_size": coord.world_size, "step": snap_state["step"]}
        doc.update({k: snap_state[k] for k in PER_RANK_KEYS if k in snap_state})
        name = rank_file(coord.rank)
        written[name] = write_blob(storage, join(staging, name), json.dumps(doc, separators=(",", ":")).encode())
    except Exception as e:  # noqa: BLE001 - reported to rank 0, raised on every rank
        error = error or f"rank {coord.rank}: {type(e).__name__}: {e}"
    return written, error
