"""Restoring in a torch.distributed run: which rank file a rank takes its RNG and data position
from, and sharded (DCP) model state.

The restore pipeline (:func:`ckptguard.manager.restoring.load_checkpoint`) calls these on every
rank and agrees between ranks after each stage; in a single process they are plain functions
(a checkpoint saved by several ranks, or with a sharded model, restores there too).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch.nn.parallel import DistributedDataParallel

from ckptguard.capture.state import TrainState, without_model
from ckptguard.distributed.coordination import PER_RANK_KEYS, Coordinator, rank_file
from ckptguard.distributed.dcp import is_sharded
from ckptguard.errors import CorruptCheckpointError, UnsupportedStateError
from ckptguard.persist.reader import CheckpointReader

__all__ = ["check_layout", "is_dcp", "load_sharded", "prepare_rank", "rank_entries", "warn_ddp_bucket_rebuild"]

log = logging.getLogger(__name__)


def is_dcp(manifest: Mapping[str, Any]) -> bool:
    """Whether the checkpoint holds sharded model state (written through DCP into ``dcp/``)."""
    info = manifest.get("distributed")
    return isinstance(info, dict) and info.get("mode") == "dcp"


def check_layout(state: TrainState, reader: CheckpointReader) -> None:
    """Refuse a checkpoint whose model layout (sharded or replicated) ``state`` cannot take."""
    where = reader.where
    if not is_dcp(reader.manifest) and is_sharded(state.model):
        raise UnsupportedStateError(
            f"{where} holds replicated (full) model state, the model is sharded (FSDP2/DTensor). "
            "Restore it into the unsharded model, then shard it, or restore a checkpoint saved "
            "with the sharded model."
        )


def rank_entries(coord: Coordinator, reader: CheckpointReader) -> dict[str, Any] | None:
    """This rank's own ``state.json`` entries (RNG, data position; ``restore_state(per_rank=)``)
    from its rank file, or rank 0's when the world size changed (logged: not bit-exact). None
    for a checkpoint without rank files (saved by a single process)."""
    saved_world = _saved_world_size(reader)
    rank = coord.rank
    if saved_world != coord.world_size:
        log.warning(
            "%s was saved by %d rank(s) and is restored on %d: rank 0's RNG state is used on every "
            "rank (the resumed run is not bit-exact) and the sampler resumes from the global sample "
            "count (resharded).",
            reader.where, saved_world, coord.world_size,
        )
        rank = 0
    name = rank_file(rank)
    if not reader.has(name):
        return None
    doc = reader.json(name)
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{reader.where}/{name} must hold an object.", path=reader.where, file=name)
    return {k: doc.get(k) for k in PER_RANK_KEYS}


def prepare_rank(coord: Coordinator, state: TrainState, reader: CheckpointReader) -> dict[str, Any] | None:
    """:func:`check_layout`, then :func:`rank_entries`: the first stage of a restore on each rank
    (rank 0 also logs :func:`warn_ddp_bucket_rebuild`'s warning)."""
    check_layout(state, reader)
    if coord.rank == 0:
        warn_ddp_bucket_rebuild(state.model, coord.world_size, reader.where)
    return rank_entries(coord, reader)


def warn_ddp_bucket_rebuild(model: object, world_size: int, where: str) -> bool:
    """Log (and return True) when resuming ``model`` cannot be bit-exact because of torch's DDP:
    a DDP that will rebuild its gradient buckets after its first iteration, on 3 or more ranks.

    A new DDP reduces its first backward with its initial bucket layout and then rebuilds the
    buckets in the order the gradients became ready (once, unless ``find_unused_parameters=True``
    without ``static_graph``). After a restore that first iteration is the first resumed step,
    where the uninterrupted run already used the rebuilt layout; a ring allreduce adds an element's
    values in an order that depends on its offset in the bucket, which changes the float sum with
    3 or more ranks (with 2, a + b == b + a). The restored state itself is exact.
    """
    if not isinstance(model, DistributedDataParallel) or world_size < 3:
        return False
    if model.find_unused_parameters and not model.static_graph:
        return False
    log.warning(
        "%s is restored into a DDP model on %d ranks: the resumed run may differ from an uninterrupted "
        "one in the last bits from its first step on (DDP reduces its first iteration with its initial "
        "gradient bucket layout, later ones with the rebuilt layout). For a bit-exact resume, construct "
        "DDP with find_unused_parameters=True (and static_graph=False): the buckets are then never rebuilt.",
        where, world_size,
    )
    return True


def _saved_world_size(reader: CheckpointReader) -> int:
    info = reader.manifest.get("distributed")
    if info is None:
        return 1
    size = info.get("world_size") if isinstance(info, dict) else None
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise CorruptCheckpointError(
            f"{reader.where}: malformed manifest: distributed.world_size must be an integer >= 1, "
            f"found {size!r}.",
            path=reader.where,
        )
    return size


def load_sharded(coord: Coordinator, state: TrainState, reader: CheckpointReader, *, strict: bool) -> TrainState:
    """Load the model and optimizer state of a DCP checkpoint (resharded to today's layout; DCP's
    collectives on ``coord``'s group, never the training group); return the rest of ``state``
    (what ``restore_state`` loads from the shared files)."""
    from ckptguard.distributed.shard_io import load_shards  # imports torch.distributed.checkpoint

    model = state.model
    if model is None:
        raise UnsupportedStateError(f"{reader.where} holds sharded model state; pass model= to TrainState to restore it.")
    load_shards(model, state.optimizers.values(), reader, strict=strict, process_group=coord.group)
    return without_model(state)
