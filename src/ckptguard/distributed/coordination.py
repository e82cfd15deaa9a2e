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
* Saving (the stages of ckptguard.manager.saving, the one save pipeline, with this coordinator;
  the distributed stages are in :mod:`ckptguard.distributed.saving`): rank 0 creates the staging directory and broadcasts its name (``broadcast_object_list``
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

* A save's collectives never run on the training group. The coordinator creates two gloo
  groups over the same rendezvous when the manager is constructed (a collective call: every rank
  constructs its manager at the same point): one for the training thread's agreement
  (``agree_save``, restore) and one for the background thread of an async save (share, gather,
  commit, outcome). Each has its own timeout (:data:`CHECKPOINT_TIMEOUT`), so a slow save cannot
  trip a training collective's timeout, and the two threads never interleave collectives on one
  group (DCP's own collectives included). Async saves: ``save()`` blocks each rank for the capture
  and the copy to host memory (sharded state: its DCP state dict); the rest runs on the background
  group, one save at a time (the next save waits for the previous one on every rank, and a
  failure on any rank raises on every rank there). Preemption saves are synchronous. The
  manager's ``close()`` destroys both groups (:meth:`ProcessGroupCoordinator.close`).
* After the commit, rank 0 alone runs the post-commit hooks and retention, then broadcasts how
  they went: a failure there raises a ``PostCommitError`` (the checkpoint is committed) on every
  rank, after a synchronous save, or at the next save/wait/close after an async one.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import torch

from ckptguard.errors import CheckpointError, CorruptCheckpointError

__all__ = [
    "CHECKPOINT_TIMEOUT",
    "PER_RANK_KEYS",
    "Coordinator",
    "DamagedElsewhere",
    "ProcessGroupCoordinator",
    "agree",
    "capture_exc",
    "coordinator",
    "on_primary",
    "preempt_code",
    "rank_file",
    "signum_of",
]

log = logging.getLogger(__name__)
T = TypeVar("T")
PER_RANK_KEYS = ("rng", "dataloader", "sampler")
_NO_SIGNAL = 1000  # a preemption raised by a poller or user code, not by a signal
_OK, _CORRUPT, _FATAL = 0, 1, 2
CHECKPOINT_TIMEOUT = datetime.timedelta(minutes=30)
"""Timeout of the checkpoint process groups (independent of the training group's)."""


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

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank."""
        return [obj]

    def exchange(self, outgoing: Mapping[int, bytearray], incoming: Mapping[int, int]) -> dict[int, memoryview]:
        """Point to point: send ``outgoing[rank]`` to each rank, receive ``incoming[rank]`` bytes
        from each; every pair must match (the sizes agreed beforehand). Returns what arrived
        (nothing is copied on the way: the buffers are sent and received in place)."""
        if outgoing or incoming:
            raise CheckpointError("A single process has no other rank to exchange checkpoint files with.")
        return {}

    def for_background(self) -> Coordinator:
        """The coordinator a background save uses (its own process group; here: itself)."""
        return self

    def close(self) -> None:
        """Release what the coordinator holds (the manager's close; here: nothing)."""
        return None

    @contextlib.contextmanager
    def closing_deferred(self) -> Iterator[None]:
        """``close()`` inside the block takes effect at its end (a last barrier after the manager's close)."""
        yield

    @property
    def group(self) -> Any:
        """The process group of this coordinator's collectives (None: no process group)."""
        return None


class ProcessGroupCoordinator(Coordinator):
    """Agreement between the ranks of the default torch.distributed process group, on gloo
    groups of their own (never on the training group).

    Constructing one is a collective call (``new_group``): every rank must construct it at the same
    point. ``group``: use that group and create none (the background coordinator's).
    """

    active = True

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self._device = torch.device("cpu")  # the checkpoint groups are gloo
        self._background: ProcessGroupCoordinator | None = None
        self._owned: list[Any] = []  # the groups this coordinator created: destroyed by close()
        self._closed = False
        self._defer_close: bool | None = None  # None: not deferred; False/True: close() was (not) called meanwhile
        if group is None:
            group = dist.new_group(backend="gloo", timeout=CHECKPOINT_TIMEOUT)
            self._background = ProcessGroupCoordinator(dist.new_group(backend="gloo", timeout=CHECKPOINT_TIMEOUT))
            self._owned = [group, self._background.group]
        self._group = group

    def for_background(self) -> Coordinator:
        return self._background if self._background is not None else self

    @property
    def group(self) -> Any:
        if self._closed:
            raise CheckpointError("The checkpoint process groups are destroyed (the CheckpointManager is closed); create a new manager.")
        return self._group

    def close(self) -> None:
        """Destroy the two checkpoint groups (a local call, not a collective; once) and drop
        them, so that their sockets close now. When the default group is already destroyed
        (``dist.destroy_process_group()`` before the manager's ``close()``), they went with it."""
        if self._defer_close is not None:
            self._defer_close = True
            return
        owned, self._owned = self._owned, []
        self._closed = True
        self._group = None
        if self._background is not None:
            self._background.close()
        if not owned or not (self._dist.is_available() and self._dist.is_initialized()):
            return
        for group in owned:
            try:
                self._dist.destroy_process_group(group)
            except (ValueError, RuntimeError) as e:  # gone already (the default group was re-created)
                log.debug("Checkpoint process group already destroyed: %s", e)

    @contextlib.contextmanager
    def closing_deferred(self) -> Iterator[None]:
        self._defer_close = False
        try:
            yield
        finally:
            requested, self._defer_close = self._defer_close, None
            if requested:
                self.close()

    def _max(self, values: list[int]) -> list[int]:
        t = torch.tensor(values, dtype=torch.int64, device=self._device)
        self._dist.all_reduce(t, op=self._dist.ReduceOp.MAX, group=self.group)
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
        self._dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]  # type: ignore[no-any-return]

    def gather(self, obj: T) -> list[T] | None:
        out: list[Any] | None = [None] * self.world_size if self.is_primary else None
        self._dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def barrier(self) -> None:
        self._dist.barrier(group=self.group)

    def all_gather(self, obj: T) -> list[T]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self.group)
        return out

    def exchange(self, outgoing: Mapping[int, bytearray], incoming: Mapping[int, int]) -> dict[int, memoryview]:
        group = self.group
        works: list[Any] = []
        received: dict[int, torch.Tensor] = {}
        for src, size in sorted(incoming.items()):
            received[src] = torch.empty(size, dtype=torch.uint8)
            if size:
                works.append(self._dist.irecv(received[src], src=src, group=group))
        for dst, data in sorted(outgoing.items()):
            if data:
                works.append(self._dist.isend(torch.frombuffer(data, dtype=torch.uint8), dst=dst, group=group))
        for work in works:
            if work is not None:
                work.wait()
        return {src: memoryview(t.numpy().data) for src, t in received.items()}


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



def on_primary(coord: Coordinator, fn: Callable[[], T], what: str) -> T:
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
        raise CheckpointError(f"Rank 0 failed {what}: {str(error).rstrip('.?!')}. Nothing was committed.")
    return result  # type: ignore[no-any-return]


class DamagedElsewhere(CorruptCheckpointError):
    """Another rank found the checkpoint damaged: this rank falls back with it, and marks nothing
    (its own copy, in a tiered run a copy of its own node, may be sound)."""


def agree(coord: Coordinator, exc: BaseException | None, where: str, doing: str = "restore") -> None:
    """Raise on every rank when any rank failed; damage makes every rank fall back together."""
    code = _OK if exc is None else _CORRUPT if isinstance(exc, CorruptCheckpointError) else _FATAL
    worst = coord.max_int(code)
    if exc is not None:
        raise exc
    if worst == _CORRUPT:
        raise DamagedElsewhere(
            f"{where}: another rank found this checkpoint damaged (see its log); every rank "
            "falls back with it (to another copy of the step, or an older checkpoint).",
            path=where,
        )
    if worst == _FATAL:
        raise CheckpointError(f"{where}: another rank failed to {doing} this checkpoint; see its log.")


def capture_exc(fn: Callable[[], T]) -> tuple[T | None, BaseException | None]:
    try:
        return fn(), None
    except BaseException as e:
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return None, e
