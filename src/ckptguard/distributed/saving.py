"""The distributed stages of a save (the pipeline is ckptguard.manager.saving).

A distributed save runs the same stages as a single process's; these are the parts that only a
torch.distributed run has: deciding whether the model is sharded (saved through DCP), what each
rank writes itself (its rank file, its share of the DCP files), and the manifest's
``distributed`` field. See ckptguard.distributed.coordination for the protocol.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from ckptguard.capture.state import TrainState
from ckptguard.distributed.coordination import PER_RANK_KEYS, Coordinator, rank_file
from ckptguard.distributed.dcp import DCP_DIR, dcp_state_dict, is_sharded
from ckptguard.persist.parallel_io import TensorSink
from ckptguard.persist.writer import write_blob
from ckptguard.storage.base import Storage, join

__all__ = ["ShardStager", "distributed_fields", "shardable", "write_rank_share"]


def shardable(state: TrainState) -> bool:
    """Whether ``state``'s model is sharded (FSDP2 / DTensor: saved through DCP by every rank,
    into any storage: see ckptguard.distributed.shard_io)."""
    return is_sharded(state.model)


def _layout(sd: Any) -> Any:
    """What must stay the same for a cached host copy of a state dict to be reused: the nested
    keys, and every tensor's type, shape and dtype (progressive unfreezing adds optimizer
    state, a cast changes dtypes: a changed layout gets fresh buffers; the sharding itself only
    changes with the world size, i.e. in a new process)."""
    if isinstance(sd, dict):
        return tuple((k, _layout(v)) for k, v in sd.items())
    if isinstance(sd, (list, tuple)):
        return tuple(_layout(v) for v in sd)
    if isinstance(sd, torch.Tensor):
        return (type(sd), sd.shape, sd.dtype)
    return type(sd)


class ShardStager:
    """Async saves of sharded state: copies this rank's shards (model + optimizer, as DTensors)
    to host memory in the training thread; the background thread writes the copy. The host
    buffers are allocated once and reused while the state's layout stays the same (pinned on
    CUDA); a changed layout (new optimizer state) gets fresh ones."""

    def __init__(self) -> None:
        self._cache: Any = None
        self._layout: Any = None

    def stage(self, state: TrainState) -> dict[str, Any]:
        assert state.model is not None
        sd = dcp_state_dict(state.model, state.optimizers.values())
        try:  # torch's own helpers (2.4+): copies into preallocated, optionally pinned, buffers
            from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
        except ImportError:  # pragma: no cover - a torch without them: a fresh copy each time
            from torch.distributed.checkpoint.staging import BlockingAsyncStager

            staged: dict[str, Any] = BlockingAsyncStager().stage(sd)
            return staged
        layout = _layout(sd)
        cuda = torch.cuda.is_available()
        if self._cache is None or layout != self._layout:
            self._cache = _create_cpu_state_dict(sd, pin_memory=cuda)
            self._layout = layout
        out: dict[str, Any] = _copy_state_dict(sd, self._cache, non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize()  # the copy is complete before training changes the weights
        return out


def distributed_fields(coord: Coordinator, sharded: bool) -> dict[str, Any]:
    """The manifest's ``distributed`` field."""
    return {
        "world_size": coord.world_size,
        "mode": "dcp" if sharded else "replicated",
        "rank_files": [rank_file(r) for r in range(coord.world_size)],
    }


def write_rank_share(
    storage: Storage, staging: str, coord: Coordinator, state: TrainState, snap_state: Mapping[str, Any], sharded: bool,
    staged: dict[str, Any] | None = None, sink: TensorSink | None = None,
) -> tuple[dict[str, dict[str, Any]], str | None]:
    """The share stage: write what this rank writes itself into ``staging`` (its shard file
    through ``sink``, the run's tensor sink; its rank file); return their manifest entries and
    this rank's error (None when it succeeded). ``staged``: the host copy of the sharded state
    (:class:`ShardStager`; None: the live model's). DCP's collectives run on ``coord``'s group.
    Errors are returned, not raised: rank 0 hears of them and commits nothing."""
    written: dict[str, dict[str, Any]] = {}
    error: str | None = None
    try:
        if sharded:
            if staged is None:
                assert state.model is not None
                staged = dcp_state_dict(state.model, state.optimizers.values())
            from ckptguard.distributed.shard_io import save_shards  # imports torch.distributed.checkpoint

            assert sink is not None, "a sharded save needs the run's tensor sink"
            written.update(save_shards(staged, storage, join(staging, DCP_DIR), sink, coord.group))
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
