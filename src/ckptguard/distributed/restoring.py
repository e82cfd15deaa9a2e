"""Restoring a checkpoint in a torch.distributed run: rank files, agreement, sharded state."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ckptguard.capture.state import TrainState, restore_state
from ckptguard.distributed.coordination import PER_RANK_KEYS, Coordinator, agree, capture_exc, rank_file
from ckptguard.distributed.dcp import DCP_DIR, dcp_load, is_sharded, verify_dcp_files
from ckptguard.distributed.saving import without_model
from ckptguard.errors import CorruptCheckpointError, UnsupportedStateError
from ckptguard.storage.local import LocalStorage

__all__ = ["restore_checkpoint"]

log = logging.getLogger(__name__)


class _RankReader:
    """A checkpoint reader whose ``state.json`` carries this rank's RNG and data position."""

    def __init__(self, inner: Any, rank_doc: Mapping[str, Any] | None) -> None:
        self._inner = inner
        self._doc = rank_doc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def json(self, fname: str) -> Any:
        data = self._inner.json(fname)
        if fname == "state.json" and self._doc is not None and isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in PER_RANK_KEYS}
            data.update({k: v for k, v in self._doc.items() if k in PER_RANK_KEYS})
        return data


def _read_rank_doc(reader: Any, name: str) -> Mapping[str, Any] | None:
    if not reader.has(name):
        return None
    doc = reader.json(name)
    if not isinstance(doc, dict):
        raise CorruptCheckpointError(f"{reader.where}/{name} must hold an object.", path=reader.where, file=name)
    return doc


def _saved_world_size(reader: Any) -> int:
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


def _rank_doc(coord: Coordinator, reader: Any) -> Mapping[str, Any] | None:
    saved_world = _saved_world_size(reader)
    if saved_world == coord.world_size:
        return _read_rank_doc(reader, rank_file(coord.rank))
    log.warning(
        "%s was saved by %d rank(s) and is restored on %d: rank 0's RNG state is used on every "
        "rank (the resumed run is not bit-exact) and the sampler resumes from the global sample "
        "count (resharded).",
        reader.where, saved_world, coord.world_size,
    )
    return _read_rank_doc(reader, rank_file(0))


def restore_checkpoint(coord: Coordinator, state: TrainState, reader: Any, *, strict: bool = True) -> Any:
    """Restore one verified checkpoint into ``state`` on every rank (collective when distributed)."""
    info = reader.manifest.get("distributed")
    mode = info.get("mode") if isinstance(info, dict) else None
    where = reader.where
    coord.same_step(int(reader.manifest["step"]), reader.storage.describe(""))

    def check() -> Mapping[str, Any] | None:
        if mode == "dcp":
            if not isinstance(reader.storage, LocalStorage):
                raise UnsupportedStateError(f"{where}: sharded (DCP) checkpoints are read from local or shared filesystems only.")
            verify_dcp_files(reader.storage.describe(reader.name), reader.manifest["files"], where)
            checked = getattr(reader, "checked", None)
            if isinstance(checked, set):  # verified above, streaming: not again in verify_unread
                checked.update(f for f in reader.manifest["files"] if f.startswith(DCP_DIR + "/"))
        elif is_sharded(state.model):
            raise UnsupportedStateError(
                f"{where} holds replicated (full) model state, the model is sharded (FSDP2/DTensor). "
                "Restore it into the unsharded model, then shard it, or restore a checkpoint saved "
                "with the sharded model."
            )
        return _rank_doc(coord, reader)

    doc, exc = capture_exc(check)
    agree(coord, exc, where)
    if mode == "dcp":
        model = state.model
        if model is None:
            raise UnsupportedStateError(f"{where} holds sharded model state; pass model= to TrainState to restore it.")
        _, exc = capture_exc(
            lambda: dcp_load(model, state.optimizers.values(), reader.storage.describe(reader.name), reader.manifest["files"], where, strict=strict)
        )
        agree(coord, exc, where)
    ts = without_model(state) if mode == "dcp" else state
    report, exc = capture_exc(lambda: restore_state(ts, _RankReader(reader, doc), strict=strict))
    agree(coord, exc, where)
    return report
