"""torch.distributed support: DDP (replicated state) and FSDP2 / DTensor (sharded state).

The manager asks :func:`coordinator` once; a single-process run gets :class:`Coordinator`, whose
methods are identities, so nothing changes for it. With ``torch.distributed`` initialized the
manager gets a :class:`ProcessGroupCoordinator` and:

* Only rank 0 takes the run lock, cleans debris, records metrics, writes the manifest, commits
  and applies retention. The run directory must be shared by all ranks (one host, a shared
  filesystem, or an object store).
* Every ``save()`` call agrees across ranks (one small ``all_reduce``) on whether to save, on the
  step (ranks calling ``save`` with different steps is an error), and on preemption: a signal on
  any rank makes every rank save the same step, wait until it is committed and exit with the
  same code.
* Saving: rank 0 creates the staging directory and broadcasts its name (``broadcast_object_list``
  between trusted ranks; nothing is pickled into the checkpoint). Every rank writes its own
  ``rank-0000R.json`` (RNG of python/numpy/torch/CUDA and the sampler or DataLoader position of
  that rank). Replicated (DDP) state: rank 0 writes model/optimizer tensors once, exactly as a
  single process would, plus ``state.json``. Sharded (FSDP2 / DTensor) state: all ranks write it
  through torch.distributed.checkpoint into ``dcp/`` (see :mod:`ckptguard.distributed.dcp`); each rank
  hashes its share of those files. The ranks gather their file entries (or their error) to rank
  0, which writes MANIFEST.json last and commits only when every rank succeeded; then it
  broadcasts the outcome, so a failure on any rank raises on every rank and commits nothing.
* Restoring: every rank reads the shared, verified files and its own rank file. Ranks check that
  they try the same step and agree after each attempt, so they fall back to the same older
  checkpoint when one rank finds damage. When
  the world size changed (2 ranks -> 1, or a single-process checkpoint on 2 ranks), rank 0's RNG
  is used on every rank (logged: not bit-exact) and the sampler resumes from ``global_consumed``;
  sharded state is resharded by DCP (to a plain module in a single process, too).

Saves in a distributed run are synchronous (``async_save`` is ignored, with a log line): a
background thread issuing collectives beside the training loop's own would need a second
process group; that is left for later.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch

from ckptguard.capture.state import TrainState, capture, restore_state
from ckptguard.distributed.dcp import DCP_DIR, dcp_load, dcp_save, hash_file, is_sharded, verify_dcp_files
from ckptguard.errors import CheckpointError, CorruptCheckpointError, UnsupportedStateError
from ckptguard.format.manifest import checkpoint_name, safe_relpath
from ckptguard.persist.writer import begin_checkpoint, clean_debris, write_blob, write_checkpoint
from ckptguard.storage.base import Storage, join
from ckptguard.storage.local import LocalStorage

__all__ = [
    "Coordinator",
    "ProcessGroupCoordinator",
    "coordinator",
    "rank_file",
    "restore_checkpoint",
    "save_distributed",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
PER_RANK_KEYS = ("rng", "dataloader", "sampler")
_NO_SIGNAL = 1000  # a preemption raised by a poller or user code, not by a signal
_OK, _CORRUPT, _FATAL = 0, 1, 2


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.json"


class Coordinator:
    """A single process: nothing to agree on."""

    active = False
    rank = 0
    world_size = 1

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    def agree_save(self, step: int, due: bool, preempt: int) -> tuple[bool, int]:
        """(save due on any rank, preemption code of any rank: 0 none, else a signal number)."""
        return due, preempt

    def max_int(self, value: int) -> int:
        return value

    def same_step(self, step: int, where: str) -> None:
        """Raise unless every rank is restoring ``step``."""
        return None

    def broadcast(self, obj: T) -> T:
        return obj

    def gather(self, obj: T) -> list[T] | None:
        return [obj]

    def barrier(self) -> None:
        return None


class ProcessGroupCoordinator(Coordinator):
    """Agreement between the ranks of the default torch.distributed process group."""

    active = True

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        backend = str(dist.get_backend())
        self._device = (
            torch.device("cuda", torch.cuda.current_device())
            if "nccl" in backend and torch.cuda.is_available() else torch.device("cpu")
        )

    def _max(self, values: list[int]) -> list[int]:
        t = torch.tensor(values, dtype=torch.int64, device=self._device)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MAX)
        return [int(v) for v in t.tolist()]

    def agree_save(self, step: int, due: bool, preempt: int) -> tuple[bool, int]:
        any_due, code, hi, neg_lo = self._max([int(due), preempt, step, -step])
        if hi != -neg_lo:
            raise CheckpointError(
                f"Ranks called save() with different steps ({-neg_lo} .. {hi}); every rank must "
                "call save(step, ...) with the same step at the same point of the loop."
            )
        return bool(any_due), code

    def same_step(self, step: int, where: str) -> None:
        hi, neg_lo = self._max([step, -step])
        if hi != -neg_lo:
            raise CheckpointError(
                f"Ranks are restoring different checkpoints (steps {-neg_lo} .. {hi}) from {where}: "
                "every rank must see the same run directory (a shared filesystem or bucket) and "
                "call restore() with the same arguments."
            )

    def max_int(self, value: int) -> int:
        return self._max([value])[0]

    def broadcast(self, obj: T) -> T:
        box: list[Any] = [obj]
        self._dist.broadcast_object_list(box, src=0)
        return box[0]  # type: ignore[no-any-return]

    def gather(self, obj: T) -> list[T] | None:
        out: list[Any] | None = [None] * self.world_size if self.is_primary else None
        self._dist.gather_object(obj, out, dst=0)
        return out

    def barrier(self) -> None:
        self._dist.barrier()


def coordinator() -> Coordinator:
    """The coordinator for this process: distributed when torch.distributed is initialized."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return ProcessGroupCoordinator()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # launched by torchrun, group not up yet
        log.warning(
            "torch.distributed is not initialized but WORLD_SIZE=%s: every rank will act as a "
            "single process (and all but one fail on the run lock). Call "
            "dist.init_process_group() before creating the CheckpointManager.",
            os.environ.get("WORLD_SIZE"),
        )
    return Coordinator()


def preempt_code(triggered: bool, signum: int | None) -> int:
    if not triggered:
        return 0
    return int(signum) if signum else _NO_SIGNAL


def signum_of(code: int) -> int | None:
    return None if code in (0, _NO_SIGNAL) else code


# ---- save ------------------------------------------------------------------------------------


def _without_model(state: TrainState) -> TrainState:
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


def _on_primary(coord: Coordinator, fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on rank 0 and share its result; raise on every rank if it failed."""
    result: Any = None
    error: str | None = None
    exc: BaseException | None = None
    if coord.is_primary:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - the other ranks must hear about any failure
            exc, error = e, f"{type(e).__name__}: {e}"
    result, error = coord.broadcast((result, error))
    if exc is not None:
        raise exc
    if error is not None:
        raise CheckpointError(f"Rank 0 failed {what}: {error}. Nothing was committed.")
    return result  # type: ignore[no-any-return]


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
    snap, exc = _capture_exc(lambda: capture(_without_model(state) if sharded else state, step))
    _agree(coord, exc, storage.describe(checkpoint_name(step)), "save")  # no rank waits for a failed one
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

    staging = _on_primary(coord, prepare, f"preparing {storage.describe(checkpoint_name(step))}")
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
        _on_primary(coord, commit, f"committing step {step}")
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


# ---- restore ---------------------------------------------------------------------------------


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


def _agree(coord: Coordinator, exc: BaseException | None, where: str, doing: str = "restore") -> None:
    """Raise on every rank when any rank failed; damage makes every rank fall back together."""
    code = _OK if exc is None else _CORRUPT if isinstance(exc, CorruptCheckpointError) else _FATAL
    worst = coord.max_int(code)
    if exc is not None:
        raise exc
    if worst == _CORRUPT:
        raise CorruptCheckpointError(
            f"{where}: another rank found this checkpoint damaged (see its log); every rank "
            "falls back to an older checkpoint.",
            path=where,
        )
    if worst == _FATAL:
        raise CheckpointError(f"{where}: another rank failed to {doing} this checkpoint; see its log.")


def _capture_exc(fn: Callable[[], T]) -> tuple[T | None, BaseException | None]:
    try:
        return fn(), None
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return None, e


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

    doc, exc = _capture_exc(check)
    _agree(coord, exc, where)
    if mode == "dcp":
        model = state.model
        if model is None:
            raise UnsupportedStateError(f"{where} holds sharded model state; pass model= to TrainState to restore it.")
        _, exc = _capture_exc(
            lambda: dcp_load(model, state.optimizers.values(), reader.storage.describe(reader.name), reader.manifest["files"], where, strict=strict)
        )
        _agree(coord, exc, where)
    ts = _without_model(state) if mode == "dcp" else state
    report, exc = _capture_exc(lambda: restore_state(ts, _RankReader(reader, doc), strict=strict))
    _agree(coord, exc, where)
    return report
