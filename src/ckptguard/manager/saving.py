"""The one save pipeline: sync, async and distributed saves run the same stages.

A save is a :class:`SaveRequest` that goes through these stages, in order::

    capture       every rank, training thread: snapshot the TrainState (tensors, state.json, config.yaml)
    describe      rank 0: the manifest fields (the run's, the environment, metrics, field providers)
    stage         async only: copy the tensors into reused host buffers; the rest runs in the background
    prepare       rank 0: refresh the run lock, clean debris, flush metrics, create the staging place
    share         every rank: what each rank writes itself (distributed only: its rank file, DCP shards)
    gather        the coordinator brings every rank's file entries (or its error) to rank 0
    commit        rank 0: tensor files through the sink, blobs, MANIFEST.json last (lock checked first)
    after commit  rank 0: metrics, the run's bookkeeping, post-commit hooks, retention, GC; each runs
                  even if one before failed, and a failure (a PostCommitError: the checkpoint is
                  committed) is told to every rank and raised after the save, or for an async save
                  by the next save (once it has saved its own step), wait or close

Two collaborators make the modes: the coordinator (:mod:`ckptguard.distributed.coordination`: who
writes what and who commits; a single process's coordinator is the identity) and the tensor sink
(what writes a tensor file: ``default_tensor_writer``, ``ParallelTensorWriter`` or an
incremental run's writer). A new tier or store adds a sink or a stage, not another pipeline.

The run (the manager) plugs in through :class:`RunCallbacks`: its manifest fields, what it
records once a checkpoint is committed, and its retention.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ckptguard.capture.environment import collect_environment
from ckptguard.capture.state import Snapshot, TrainState, capture, without_model
from ckptguard.distributed.coordination import Coordinator, agree, capture_exc, on_primary
from ckptguard.distributed.saving import ShardStager, distributed_fields, shardable, write_rank_share
from ckptguard.errors import CheckpointError, PostCommitError
from ckptguard.format.manifest import checkpoint_name
from ckptguard.manager.extensions import ManifestFieldProvider, PostCommitHook, callable_name, provided_fields
from ckptguard.persist.background import BackgroundSaves, Reaper
from ckptguard.persist.gc import collect_garbage
from ckptguard.persist.incremental import IncrementalRun
from ckptguard.persist.parallel_io import TensorSink, default_tensor_writer
from ckptguard.persist.staging import Stager
from ckptguard.persist.writer import begin_checkpoint, clean_debris, write_checkpoint
from ckptguard.run.catalog import ManifestCache
from ckptguard.run.lock import LockPolicy, RunLock
from ckptguard.run.metrics_log import MetricsLog, plain_metrics
from ckptguard.storage.base import Storage
from ckptguard.tiers.replica import Replicator

__all__ = ["ManifestFieldProvider", "PostCommitHook", "RunCallbacks", "SavePipeline", "SaveRequest"]

log = logging.getLogger(__name__)

TensorFiles = Mapping[str, Mapping[str, torch.Tensor]]



@dataclasses.dataclass(frozen=True)
class SaveRequest:
    """One save: what to save and why (``sync``: never in the background, e.g. at preemption)."""

    step: int
    state: TrainState
    metrics: Mapping[str, Any] | None
    reason: str
    extra: Mapping[str, Any] | None = None
    sync: bool = False


@dataclasses.dataclass(frozen=True)
class RunCallbacks:
    """What the pipeline asks of the run it saves into (the manager provides them).

    ``fields(step, metrics)``: the run's manifest fields (``resumed_from``, ``run_id``,
    ``save_interval``), in the training thread. ``blocked(seconds)``: the caller may go on
    (training thread; an async save continues in the background). ``saved(step, seconds)``: a checkpoint is
    committed (every rank; before the bookkeeping). ``committed(manifest)``: rank 0, right after
    the commit, before the post-commit hooks (run record, supersede). ``curate()``: rank 0, after
    the hooks (retention).
    """

    fields: Callable[[int, Mapping[str, Any] | None], dict[str, Any]]
    blocked: Callable[[float], None]
    saved: Callable[[int, float], None]
    committed: Callable[[dict[str, Any]], None]
    curate: Callable[[], None]


@dataclasses.dataclass
class _Save:
    """A captured save on its way to the commit."""

    request: SaveRequest
    snap: Snapshot
    tensor_files: TensorFiles
    blobs: dict[str, bytes]
    fields: dict[str, Any]
    sharded: bool
    t0: float
    staged_shards: dict[str, Any] | None = None
    waited: float = 0.0  # seconds this save waited for the previous one (distributed: in capture)


class SavePipeline:
    """The save side of a manager: lock, debris, host buffers, the background save, the reaper.

    ``lock``: take the run's writer lock (on rank 0; a LockPolicy tunes it); ``incremental``: write
    tensors through an :class:`IncrementalRun`. Call order: ``acquire_lock()`` at the first write, ``save(request)`` per checkpoint (returns
    the seconds training was blocked), ``wait()`` for the save in flight, ``close()`` once.
    """

    def __init__(
        self,
        storage: Storage,
        coord: Coordinator,
        metrics_log: MetricsLog,
        run: RunCallbacks,
        *,
        lock: bool | LockPolicy,
        async_save: bool,
        incremental: bool,
        manifests: ManifestCache,
        target: Storage | None = None,
        replicator: Replicator | None = None,
    ) -> None:
        self.storage = storage
        self.target = target or storage  # where checkpoints go (a tiered run's first tier); the run's files stay in storage
        # A tiered run's saves touch only the first tier: the run lock's checks, metrics.csv and
        # the run record reach the durable tier with its copies (ckptguard.tiers), not at every save.
        self.durable_each_save = self.target is storage
        self.replicator = replicator  # distributed tiers: each node's first tier gets the whole checkpoint
        self.coord = coord
        self.metrics_log = metrics_log
        self.run = run
        policy = lock if isinstance(lock, LockPolicy) else None  # only rank 0 writes the run
        self.lock = RunLock(storage, policy=policy) if lock and coord.is_primary else None
        self.async_save = async_save
        self.incremental = IncrementalRun(storage, manifests=manifests) if incremental else None
        self.manifests = manifests
        self.tensor_writer: TensorSink = default_tensor_writer(self.target, background=async_save)
        self.stager = Stager()
        self.shard_stager = ShardStager()
        self.background = BackgroundSaves(storage.url, collective=coord.active)
        self.reaper = Reaper(storage)  # frees pruned checkpoints' data beside training
        self.locked = False
        self.last_waited_seconds: float | None = None
        self._environment: dict[str, Any] | None = None
        self._debris_cleaned = False
        self._providers: list[ManifestFieldProvider] = []
        self._hooks: list[PostCommitHook] = []
        self._after_commit_lock = threading.Lock()
        self._after_commit_failure: PostCommitError | None = None  # surfaces at the next save/wait/close

    # ---- extension points -----------------------------------------------------------------------

    def add_manifest_fields(self, provider: ManifestFieldProvider) -> None:
        """Merge ``provider(step, state)`` into every later manifest (see :func:`provided_fields`)."""
        if not callable(provider):
            raise TypeError(f"add_manifest_fields() takes a callable (step, state) -> dict, got {type(provider).__name__}")
        self._providers.append(provider)

    def add_post_commit_hook(self, hook: PostCommitHook) -> None:
        """Call ``hook(manifest)`` after every commit; a failure is a :class:`PostCommitError`."""
        if not callable(hook):
            raise TypeError(f"add_post_commit_hook() takes a callable (manifest) -> None, got {type(hook).__name__}")
        self._hooks.append(hook)

    def raise_after_commit_failure(self) -> None:
        """Raise (once) the :class:`PostCommitError` of a committed save whose hooks or retention
        failed, if any. Called after the save/wait it belongs to: the save in flight is durable."""
        with self._after_commit_lock:
            err, self._after_commit_failure = self._after_commit_failure, None
        if err is not None:
            raise err

    @property
    def environment(self) -> dict[str, Any]:
        """The environment recorded in every manifest, collected once (a git call)."""
        if self._environment is None:
            self._environment = collect_environment()
        return self._environment

    # ---- lock and debris ------------------------------------------------------------------------

    def acquire_lock(self) -> None:
        """Take the writer lock at the first write (RunLockLostError once another took the run)."""
        if self.lock is not None:
            self.lock.acquire()  # a no-op while held
            self.locked = True

    def debris_left(self) -> None:
        """Something (a half-done delete, a failed save) left debris: the next save cleans it."""
        self._debris_cleaned = False

    def prepare_host_buffers(self, files: Callable[[], TensorFiles]) -> None:
        """Async saves: allocate the host buffers in the background before the first save needs them."""
        if self.async_save and not self.stager.prepared:
            self.stager.prepare(files)

    # ---- the stages -----------------------------------------------------------------------------

    def save(self, request: SaveRequest) -> None:
        """Run one save through every stage (the last ones in the background for an async save).

        Distributed: the previous save must be over on every rank first (one save at a time on the
        background group; a failure of it raises on every rank here). Sharded (DCP) state is
        copied to host memory here and written by DCP in the background. Preemption saves are
        synchronous.
        """
        t0 = time.perf_counter()
        save = self._capture(request, t0)
        if self.async_save and not request.sync:
            if self.coord.active and not self.coord.is_primary:
                save.tensor_files = {}  # rank 0 writes the tensor files
            if save.sharded:
                save.staged_shards = self.shard_stager.stage(request.state)
            self._submit(save)  # waited for the previous save: its after-commit failure is known
            self.raise_after_commit_failure()
            return
        self.background.result()
        self._write_and_commit(save, self.coord)
        self.run.blocked(time.perf_counter() - t0)
        self.raise_after_commit_failure()

    def _capture(self, request: SaveRequest, t0: float) -> _Save:
        """Stages capture and describe."""
        sharded = self.coord.active and shardable(request.state)
        state = without_model(request.state) if sharded else request.state

        def describe() -> tuple[Snapshot, dict[str, Any]]:
            snap = capture(state, request.step)
            return snap, self._fields(request, snap) if self.coord.is_primary else {}

        waited: BaseException | None = None
        w0 = time.perf_counter()
        busy = self.background.busy
        if self.coord.active:  # one agreement for both: the previous save's outcome, this capture
            _, waited = capture_exc(self._wait_durable)  # a committed save's hook failure: raised after this save
        wait_s = time.perf_counter() - w0 if busy else 0.0
        captured, exc = capture_exc(describe)
        where = f"the previous save to {self.target.url}" if waited else self.target.describe(checkpoint_name(request.step))
        agree(self.coord, waited or exc, where, "save")
        assert captured is not None  # no rank waits for a failed one
        snap, fields = captured
        files = {k: v for k, v in snap.tensor_files.items() if v} if sharded else snap.tensor_files
        blobs = {"state.json": json.dumps(snap.state, separators=(",", ":")).encode()}
        if snap.config_yaml is not None:
            blobs["config.yaml"] = snap.config_yaml
        if self.coord.active:
            fields["distributed"] = distributed_fields(self.coord, sharded)
        return _Save(request, snap, files, blobs, fields, sharded, t0, waited=wait_s)

    def _fields(self, request: SaveRequest, snap: Snapshot) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "reason": request.reason,
            "metrics": plain_metrics(request.metrics),
            "config_hash": snap.config_hash,
            "environment": self.environment,
            "probe": None,
            "verification": {"status": "unverified"},
            **self.run.fields(request.step, request.metrics),
            "extra": {},
        }
        for provider in self._providers:
            fields.update(provided_fields(provider, request.step, request.state))
        fields["extra"].update(request.extra or {})
        return fields

    def _submit(self, save: _Save) -> None:
        """Stage to host memory, hand the rest to the background thread."""
        waited = save.waited
        if self.background.busy:
            w0 = time.perf_counter()
            self.background.result()
            waited += time.perf_counter() - w0
        else:
            self.background.result()
        if waited:
            log.info("save(step=%d) waited %.3fs for the previous async save (saves take longer than the "
                     "interval between them)", save.request.step, waited)
        save.tensor_files = self.stager.stage(save.tensor_files)
        blocked = time.perf_counter() - save.t0
        save.fields["blocked_seconds"] = round(blocked, 6)
        save.fields["waited_seconds"] = round(waited, 6)
        self.last_waited_seconds = waited
        self.run.blocked(blocked)
        self.background.submit(self._write_and_commit, save, self.coord.for_background())

    def _write_and_commit(self, save: _Save, coord: Coordinator) -> None:
        """Stages prepare, share, gather, commit and after commit (an async save's ``coord`` is
        the background one: its collectives run on a group of their own)."""
        step = save.request.step
        staging = on_primary(coord, lambda: self._prepare(step), f"preparing {self.target.describe(checkpoint_name(step))}")
        share: tuple[dict[str, dict[str, Any]], str | None] = ({}, None)  # a single process writes no share
        sink = self.incremental.writer() if self.incremental else self.tensor_writer
        manifest: dict[str, Any] = {}
        try:
            if self.replicator is not None:
                self.replicator.prepare(coord, staging)
            if coord.active:
                share = write_rank_share(
                    self.target, staging, coord, save.request.state, save.snap.state, save.sharded, save.staged_shards, sink
                )
            if self.replicator is not None:  # a failed share is reported to rank 0 by the gather below
                self.replicator.send_shares(coord, staging, share[0] if share[1] is None else {})
            reports = coord.gather(share)
            manifest = on_primary(coord, lambda: self._commit(save, staging, reports, sink), f"committing step {step}")
            if self.replicator is not None:
                self.replicator.send_commit(coord, staging, manifest, {n for r in reports or [] for n in r[0]})
        except CheckpointError as e:
            self._debris_cleaned = False  # the staging directory of a save that failed is debris
            if not coord.active:
                raise
            raise CheckpointError(
                f"Distributed save of step {step} to {self.target.url} failed: {e}. The checkpoints "
                "already committed are intact."
            ) from e
        seconds = time.perf_counter() - save.t0
        self.run.saved(step, seconds)
        if coord.is_primary:
            ranks = f" ({coord.world_size} ranks)" if coord.active else ""
            log.info("Saved %s%s in %.3fs", self.target.describe(checkpoint_name(step)), ranks, seconds)
        self._after_commit(step, manifest, coord)

    def _prepare(self, step: int) -> str:
        self.acquire_lock()
        if self.lock is not None and self.durable_each_save:
            self.lock.refresh()  # before removing debris: a writer that lost the run removes nothing
        if not self._debris_cleaned or self.reaper.failed:
            self.reaper.wait()  # what it is removing is not debris
            self.reaper.failed = 0
            log.debug("Cleaning up debris in %s", self.target.url)
            clean_debris(self.target)
            self._debris_cleaned = True
        if self.durable_each_save:
            self.flush_metrics()  # rows up to this step reach metrics.csv before the commit: a crash loses none
        try:
            return begin_checkpoint(self.target, step)
        except BaseException:
            self._debris_cleaned = False
            raise

    def _commit(
        self, save: _Save, staging: str, reports: list[tuple[dict[str, Any], str | None]] | None, sink: TensorSink
    ) -> dict[str, Any]:
        assert reports is not None
        errors = [err for _, err in reports if err]
        entries = {name: entry for share, _ in reports for name, entry in share.items()}
        fields = dict(save.fields)
        if self.coord.active:
            fields["save_seconds"] = time.perf_counter() - save.t0
        try:
            if errors:
                self.target.remove_tree(staging)
                raise CheckpointError("; ".join(errors))
            return write_checkpoint(
                self.target, save.request.step, save.tensor_files, save.blobs, fields, tensor_writer=sink,
                staging=staging, written=entries, before_commit=self.lock.check if self.lock is not None and self.durable_each_save else None,
            )
        except BaseException:
            self._debris_cleaned = False  # the failed save may have left debris: next save cleans
            raise

    def flush_metrics(self) -> None:
        """Append the metrics recorded so far to metrics.csv (a failure is logged, retried later)."""
        try:
            self.metrics_log.flush()
        except CheckpointError as e:  # the checkpoint does not depend on them; retried later
            log.warning("Could not append to metrics.csv: %s", e)

    def _after_commit(self, step: int, manifest: dict[str, Any], coord: Coordinator) -> None:
        """Stage after commit: rank 0 runs it; a failure is kept as a :class:`PostCommitError`
        (the checkpoint stays committed) and told to every rank, to be raised after this save
        (sync) or at the next save/wait/close (async): see :meth:`raise_after_commit_failure`."""
        error = self._run_after_commit(step, manifest) if coord.is_primary else None
        if coord.active:  # every rank hears how rank 0's after-commit went
            said = coord.broadcast(None if error is None else str(error))
            if said is not None and error is None:
                error = PostCommitError(f"Rank 0 reports: {said}", step=step)
        if error is None:
            return
        with self._after_commit_lock:
            if self._after_commit_failure is None:
                self._after_commit_failure = error
                return
        log.error("%s", error)  # an earlier one is still to be raised

    def _run_after_commit(self, step: int, manifest: dict[str, Any]) -> PostCommitError | None:
        """Bookkeeping, post-commit hooks in order, retention and GC: each runs even when one
        before it failed; the first failure is returned (the others are logged)."""
        where = self.target.describe(checkpoint_name(step))
        failures: list[PostCommitError] = []

        def attempt(what: str, next_step: str, fn: Callable[..., None], *args: Any) -> None:
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - reported as a PostCommitError, cause chained
                err = PostCommitError(
                    f"Step {step} was committed to {where} (the checkpoint is intact and restorable), but {what} "
                    f"failed after the commit: {type(e).__name__}: {e}. {next_step}", step=step,
                )
                err.__cause__ = e
                failures.append(err)

        if self.durable_each_save:
            self.flush_metrics()
        attempt("the run's bookkeeping (RUN/ckptguard.json)", "Check the run directory.", self.run.committed, manifest)
        for hook in self._hooks:
            attempt(f"the post-commit hook {callable_name(hook)}",
                    "Fix the hook (registered with add_post_commit_hook); later saves run it again.", hook, manifest)
        attempt("retention", "What it meant to delete is kept; the next save retries.", self.run.curate)
        if self.durable_each_save:
            attempt("freeing unreferenced data", "The next save retries.", self._collect_garbage)
        for later in failures[1:]:
            log.error("%s", later)
        return failures[0] if failures else None

    def _collect_garbage(self) -> None:
        collect_garbage(self.storage, self.manifests, reap=self.reaper)
        reaping = self.reaper.pending
        if any(n.startswith((".tmp-", ".trash-")) and n not in reaping for n in self.storage.listdir("")):
            self._debris_cleaned = False  # a cleanup failed quietly: the next save retries it

    # ---- waiting and closing --------------------------------------------------------------------

    def wait(self) -> None:
        """Block until the save in flight is durable and pruned data is freed; raise its error
        (an :class:`AsyncSaveError`, or a :class:`PostCommitError` when it committed and then failed)."""
        self._wait_durable()
        self.raise_after_commit_failure()

    def _wait_durable(self) -> None:
        try:
            self.background.result()
        finally:
            self.reaper.wait()

    def close(self) -> None:
        """Wait for the save in flight, then end the background threads (even when it failed)."""
        try:
            self.wait()
        finally:
            self.background.shutdown()
            self.reaper.close()  # removals finish under the run lock; its thread ends
            self.coord.close()  # distributed: the checkpoint process groups

    def check_lock(self) -> None:
        """The run lock is still this writer's (RunLockLostError otherwise); nothing without a lock."""
        if self.lock is not None:
            self.lock.check()

    @property
    def lock_lost(self) -> bool:
        """Whether another writer took the run from this one."""
        return self.lock is not None and self.lock.lost

    def release_lock(self) -> None:
        if self.lock is not None and self.locked:
            self.lock.release()
            self.locked = False
