"""CheckpointManager: wires storage, capture, the commit protocol, policies and verification.

>>> mgr = CheckpointManager("runs/exp1", every_steps=500, retention=Retention(keep_last=3))
>>> step = mgr.restore(state)             # newest valid checkpoint, or None for a fresh run
>>> with mgr.preemption_guard():
...     for step in range(step or 0, total):
...         loss = train_step()
...         mgr.save(step + 1, state, metrics={"loss": loss})   # saves only when due
>>> mgr.close()                          # waits for async saves and raises their errors
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from ckptguard.capture.configdrift import log_config_drift
from ckptguard.capture.state import TrainState, capture
from ckptguard.distributed.coordination import coordinator, on_primary
from ckptguard.errors import CheckpointError, PostCommitError, StorageError
from ckptguard.format.manifest import as_step
from ckptguard.manager.options import checked_retention, checked_run_id, checked_tiers, initial_schedule
from ckptguard.manager.preemption import Preemption, logged
from ckptguard.manager.restoring import newer_than, raise_if_missing_bucket, supersede
from ckptguard.manager.saving import RunCallbacks, SavePipeline, SaveRequest
from ckptguard.persist.parallel_io import TensorSink
from ckptguard.persist.prune import apply_decisions
from ckptguard.persist.reader import CheckpointReader
from ckptguard.policies.pins import check_not_foreign, new_run_id, pin, pinned_steps, plan_own_lineage, unpin
from ckptguard.policies.preemption import DEFAULT_SIGNALS, PreemptionGuard
from ckptguard.policies.retention import Decision, Retention
from ckptguard.run.catalog import CheckpointInfo, ManifestCache, scan
from ckptguard.run.history import record_events
from ckptguard.run.lock import LockPolicy, abandon
from ckptguard.run.metrics_log import MetricsLog
from ckptguard.run.runrecord import RUN_FILE, RunRecord
from ckptguard.run.watchdog import HANG_EXIT_CODE, Watchdog, WatchdogOptions
from ckptguard.storage import Storage, open_storage
from ckptguard.tiers.options import Tiers
from ckptguard.tiers.restoring import restore_run
from ckptguard.tiers.tiered import TierSet
from ckptguard.verification.behaviour import Verifier, attach_verifier

__all__ = ["CheckpointManager", "RUN_FILE"]

log = logging.getLogger(__name__)


def _wait_at_exit(ref: weakref.ReferenceType[CheckpointManager]) -> None:
    mgr = ref()
    if mgr is not None:
        try:
            mgr._close(clean=False)  # a tiered run's hot memory stays for a restart (the keeper persists it)
        except CheckpointError as e:
            log.error("A pending checkpoint save failed at exit: %s", e)


class CheckpointManager:
    """Saves, restores and curates the checkpoints of one run directory.

    Args:
        directory: local path, ``file://`` URL, any fsspec URL (``s3://bucket/prefix``), or a Storage.
        every_steps / every_seconds: when ``save()`` saves (either fires); ``force=True`` always.
        every: ``"auto"`` adds the Young/Daly interval sqrt(2 x save cost x MTBF), from the
            measured save cost and ``mtbf_seconds`` (else the MTBF observed in the run's history,
            else 4 h); see ckptguard.policies.schedule.
        retention: what to keep (default: keep everything).
        async_save: ``save()`` copies the state to reused host buffers and returns; a background
            thread writes, checksums and commits. Errors surface on the next save/wait/close.
        probe: optional probe batch for behavioural verification (a tensor, tuple/dict of
            tensors, or a callable returning one), frozen at the first save in
            ``RUN/probe.safetensors``; see ckptguard.verification.behaviour.
        drift_epsilon: warn when the probe output changes by more than this (relative L2) between saves.
        on_verification_failure: called with a dict (step, status, detail, path) when a commit fails verification.
        verify_on_restore: check every byte against the manifest's checksums when restoring.
        storage_options: passed to fsspec for URLs.
        lock: take the run's writer lock (one writer per run) at the first write (save, pin,
            unpin); a manager that only restores takes none. A ``LockPolicy`` tunes it (stale time
            and heartbeat of object-store locks); False: no lock (the caller guarantees one writer).
        incremental: store tensor data by content in ``RUN/objects/`` so that a tensor a retained
            checkpoint already holds is referenced, not written again (see ckptguard.persist.incremental);
            unreferenced data is garbage-collected after each commit (ckptguard.persist.gc).
        run_id: the run's lineage (recorded in every manifest). By default a new one, replaced by
            the restored checkpoint's on restore; retention only prunes this lineage's checkpoints.
            Pass an existing id to continue a run's history without restoring from it.
        tiers: save to host memory kept by a keeper process (and/or a node-local directory) and
            copy down to ``directory`` in the background (see ckptguard.tiers and the README's
            "Spot instances and tiers"); ``every_*`` is then the first tier's cadence.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | Storage,
        *,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        every: str | None = None,
        mtbf_seconds: float | None = None,
        retention: Retention | None = None,
        async_save: bool = False,
        probe: Any = None,
        drift_epsilon: float | None = None,
        on_verification_failure: Callable[[dict[str, Any]], None] | None = None,
        verify_on_restore: bool = True,
        storage_options: dict[str, Any] | None = None,
        lock: bool | LockPolicy = True,
        incremental: bool = False,
        run_id: str | None = None,
        tiers: Tiers | None = None,
    ) -> None:
        run_id = checked_run_id(run_id)
        self.storage: Storage = open_storage(directory, storage_options)
        self.run_id = run_id or new_run_id()  # lineage; a restore adopts the restored checkpoint's
        self._own_lineages: set[str | None] = {self.run_id}
        self._run_record = RunRecord(self.storage, self.run_id)
        self.schedule = initial_schedule(self.storage, self._run_record, every_steps, every_seconds, every, mtbf_seconds)
        self.retention = checked_retention(retention)
        self._warned_unranked = False  # keep_best's metric missing from a save: said once
        self.probe = probe
        self.verify_on_restore = verify_on_restore
        self._manifests = ManifestCache(self.storage)  # parsed once, across saves
        self.resumed_from: int | None = None
        self._abandoned: dict[str, Any] = {}  # name -> manifest digest, after a rollback (see restore)
        self.last_saved_step: int | None = None
        self._last_requested: int | None = None  # the step of the newest save() that started a save
        self.last_save_seconds: float | None = None
        self.last_blocked_seconds: float | None = None
        self.metrics_log = MetricsLog(self.storage)
        self._coord = coordinator()  # torch.distributed: rank 0 locks, commits, curates
        self._lock_agreed = False  # distributed: rank 0 took the lock at the first save() call
        self._tiers = None if tiers is None else TierSet(
            checked_tiers(tiers, incremental), self.storage, storage_options=storage_options, mtbf=self.schedule.mtbf_seconds,
            on_durable=self._on_durable, lock_check=lambda: self._saves.check_lock(), coord=self._coord,
        )
        self._saves = SavePipeline(
            self.storage, self._coord, self.metrics_log,
            RunCallbacks(self._run_fields, self._blocked, self._saved, self._committed, self._apply_retention),
            lock=lock, async_save=async_save, incremental=incremental, manifests=self._manifests,
            target=self._tiers.first.storage if self._tiers else None, replicator=self._tiers.replicator if self._tiers else None,
        )
        self._preemption = Preemption()
        self._watchdog: Watchdog | None = None
        self._closed = False
        self.last_restore_report: Any = None
        self.verifier: Verifier | None = None if probe is None else attach_verifier(
            self, probe, drift_epsilon=drift_epsilon, on_failure=on_verification_failure
        )
        atexit.register(_wait_at_exit, weakref.ref(self))

    # ---- context manager ----------------------------------------------------------------------

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self._close(clean=exc_type is None)
        except CheckpointError as e:
            if exc_type is None:
                raise
            log.error("While closing after an error: %s", e)

    def __repr__(self) -> str:
        return f"CheckpointManager({self.storage.url!r})"

    def checkpoints(self) -> list[CheckpointInfo]:
        """All committed checkpoints of the run, oldest first (by step number); a tiered run's
        from the fastest tier holding each step."""
        return scan(self.storage, cache=self._manifests) if self._tiers is None else self._tiers.checkpoints()

    def latest(self) -> CheckpointInfo | None:
        """The newest valid checkpoint, or None."""
        valid = [c for c in self.checkpoints() if c.valid]
        return valid[-1] if valid else None

    # ---- save ---------------------------------------------------------------------------------

    def due(self, step: int) -> bool:
        return self.schedule.due(step)

    def save(
        self,
        step: int,
        state: TrainState,
        *,
        metrics: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save when due (or forced, or preempted); return whether a checkpoint was started.

        Metrics given at every call go to ``metrics.csv``. If a preemption signal arrived, this
        call saves synchronously, waits until it is durable and exits the process.
        """
        self._check_open()
        step = as_step(step, self.storage.url)  # before anything is written (metrics.csv included)
        if self._watchdog is None:
            return self._save(step, state, metrics, force)
        with self._watchdog.saving(step):  # a heartbeat; the save deadline applies meanwhile
            return self._save(step, state, metrics, force)

    def _save(self, step: int, state: TrainState, metrics: Mapping[str, Any] | None, force: bool) -> bool:
        self._saves.background.raise_if_failed()
        if not self._coord.active:
            self._saves.acquire_lock()  # a writer from its first save() (metrics.csv included)
        elif not self._lock_agreed:  # every rank's first save() call: rank 0 locks, all hear how it went
            on_primary(self._coord, self._saves.acquire_lock, f"taking the writer lock of {self.storage.url}")
            self._lock_agreed = True
        if self._tiers is not None:
            self._tiers.attach(to_save=True)  # the keeper is alive (a new one if it died)
        if metrics and self._coord.is_primary:
            self.metrics_log.record(step, metrics)
        wanted = force or self.schedule.due(step)
        if wanted and (step == self.last_saved_step or (step == self._last_requested and self._saves.background.busy)):
            # Committed (or restored) already, or in flight: the loop's periodic save of its last
            # step followed by a final save(step, force=True) does not write it twice (nor drop the
            # first one's metrics). A save of it that failed is retried. Ranks agree below.
            log.debug("save(step=%d): this step is already saved; not saving it again", step)
            wanted = False
        due, code = self._coord.agree_save(step, wanted, self._preemption.code())
        if not (due or code):
            self._saves.prepare_host_buffers(lambda: capture(state, step).tensor_files)  # before the first save
            if not self._coord.active:  # distributed: only where every rank waited for the save (see below)
                self._saves.raise_after_commit_failure()
            return False
        if code:
            self._preemption_exit(self._preemption.trigger(code), step, state, metrics)
        self._save_now(SaveRequest(step, state, metrics, "forced" if force and not self.schedule.due(step) else "periodic"))
        return True

    def _preemption_exit(self, guard: PreemptionGuard, step: int, state: TrainState, metrics: Mapping[str, Any] | None) -> None:
        reason = guard.reason or "preemption"
        log.warning("Preemption (%s): saving step %d synchronously, then exiting.", reason, step)
        with logged(PostCommitError):  # its checkpoint is committed: the preemption save goes on
            self.wait()
        if self.last_saved_step != step:
            with logged(PostCommitError):
                self._save_now(SaveRequest(step, state, metrics, "preemption", extra={"preemption": reason}, sync=True))
        code = guard.resolved_exit_code()
        self._run_record.session["preempted"] = True
        with self._coord.closing_deferred():  # the barrier runs on a checkpoint group: destroyed after it
            self.close()
            self._coord.barrier()  # every rank leaves only after the commit and rank 0's clean-up
        sys.exit(code)

    def _save_now(self, request: SaveRequest) -> None:
        self._last_requested = request.step
        if not self._coord.active:
            self._saves.acquire_lock()
            check_not_foreign(self._saves.target, request.step, self._own_lineages, self.run_id)
        self._saves.save(request)

    def add_manifest_fields(self, provider: Callable[[int, TrainState], Mapping[str, Any]]) -> None:
        """Merge ``provider(step, state)`` into every later manifest (training thread, rank 0).

        It returns new top-level keys with JSON values (``{"data_position": {...}}``). A key the
        manifest itself uses (ckptguard.manager.extensions.MANIFEST_KEYS), a value that is not
        JSON, or an exception in the provider fails that save with a ``ManifestFieldError``
        naming the provider, the step and the key, before anything is written.
        """
        self._saves.add_manifest_fields(provider)

    def add_post_commit_hook(self, hook: Callable[[dict[str, Any]], None]) -> None:
        """Call ``hook(manifest)`` after every commit (saving thread, rank 0, before retention).
        A failing hook does not undo the commit: a ``PostCommitError`` naming it is raised by that
        save (async: the next save/wait/close), on every rank (ckptguard.manager.saving)."""
        self._saves.add_post_commit_hook(hook)

    def _run_fields(self, step: int, metrics: Mapping[str, Any] | None) -> dict[str, Any]:
        unranked = None if self._warned_unranked else self.retention.unranked(step, metrics)
        if unranked:
            self._warned_unranked = True
            log.warning("%s", unranked)
        return {"resumed_from": self.resumed_from, "run_id": self.run_id, "save_interval": self.schedule.describe()}

    def _blocked(self, seconds: float) -> None:
        self.last_blocked_seconds = seconds
        self.schedule.saved(cost=seconds)

    def _saved(self, step: int, seconds: float) -> None:
        self.last_saved_step = step
        self.last_save_seconds = seconds

    def _committed(self, manifest: dict[str, Any]) -> None:
        """Record the save in RUN/ckptguard.json; mark what a rollback abandoned (first commit after it)."""
        self._run_record.session["saves"] = int(self._run_record.session.get("saves", 0)) + 1
        if self._tiers is None:  # a tiered run's record is written with its durable copies
            self._run_record.write(retention=self.retention.to_json(), save_interval=self.schedule.describe())
        abandoned, self._abandoned = self._abandoned, {}
        supersede(self.storage, abandoned, self.resumed_from)
        if self._tiers is not None:
            self._tiers.committed(manifest["name"])

    def protected_steps(self) -> dict[int, str]:
        out: dict[int, str] = {}
        if self.last_saved_step is not None:
            out[self.last_saved_step] = "just saved"
        if self.resumed_from is not None:
            out[self.resumed_from] = "resumed from"
        return out

    def plan_retention(self) -> list[Decision]:
        """What retention would keep/delete now, with reasons (nothing is deleted)."""
        ckpts = scan(self.storage, cache=self._manifests)  # the durable tier's, for a tiered run
        protected = pinned_steps(self.storage, ckpts)
        for step, why in self.protected_steps().items():
            protected[step] = f"{protected[step]}; {why}" if step in protected else why
        return plan_own_lineage(ckpts, self.retention, self._own_lineages, protected)

    def pin(self, step: int, note: str = "") -> None:
        """Protect checkpoint ``step`` from retention (a ``PINNED`` marker; see ckptguard.policies.pins)."""
        self._saves.acquire_lock()
        pin(self.storage, step, note)

    def unpin(self, step: int) -> bool:
        """Remove the pin of checkpoint ``step``; return whether it was pinned."""
        self._saves.acquire_lock()
        return unpin(self.storage, step)

    def _on_durable(self) -> None:
        """A tiered run's first save, or a copy that reached the durable tier (the copier's thread):
        metrics.csv, the run record, retention."""
        self._saves.flush_metrics()
        self._run_record.write(retention=self.retention.to_json(), save_interval=self.schedule.describe(), tiers=self._tiers and self._tiers.describe())
        self._apply_retention(durable=True)

    def _apply_retention(self, durable: bool = False) -> None:
        if self.retention.keeps_everything or (self._tiers is not None and not durable):
            return
        deleted, failed = apply_decisions(self.storage, self.plan_retention(), reap=self._saves.reaper)
        if failed:
            self._saves.debris_left()  # a half-done delete is debris: the next save cleans it
        record_events(self.storage, "pruned", deleted, reason="retention")

    # ---- async plumbing -----------------------------------------------------------------------

    @property
    def async_save(self) -> bool:
        """Whether ``save()`` returns after the copy to host memory (distributed runs too)."""
        return self._saves.async_save

    @property
    def pending(self) -> bool:
        """Whether an async save is still being written (``wait()`` blocks until it is durable)."""
        return self._saves.background.busy

    @property
    def host_buffers(self) -> Mapping[tuple[str, str], torch.Tensor]:
        """The host buffers async saves copy into, by (file, tensor); waits while they are prepared."""
        return self._saves.stager.buffers

    @property
    def tensor_writer(self) -> TensorSink:
        """What writes each tensor file (``default_tensor_writer``); replaceable (``ParallelTensorWriter``)."""
        return self._saves.tensor_writer

    @tensor_writer.setter
    def tensor_writer(self, writer: TensorSink) -> None:
        self._saves.tensor_writer = writer

    @property
    def environment(self) -> dict[str, Any]:
        """The environment every manifest records (git, versions, host, device); collected once."""
        return self._saves.environment

    @property
    def last_waited_seconds(self) -> float | None:
        """How long the last async save waited for the one before it."""
        return self._saves.last_waited_seconds

    def wait(self) -> None:
        """Block until the pending async save is durable and pruned data is freed; raise its error."""
        self._saves.wait()

    def close(self) -> None:
        """Wait for pending saves, flush metrics, release the lock. Safe to call twice. A tiered
        run copies its newest checkpoint to every tier first and frees the hot memory."""
        self._close(clean=True)

    def _close(self, *, clean: bool) -> None:
        if self._closed:
            return
        try:
            self._closed = True
            try:
                if self._watchdog is not None:
                    self._watchdog.finish()  # the pending save, under the save deadline, then stop
            finally:
                try:
                    self._saves.close()
                finally:
                    if self._tiers is not None:
                        self._tiers.close(flush=clean)
                        self._saves.reaper.close()  # the durable copy's retention removed what it pruned
        finally:
            gone = self._tiers is not None and self._tiers.durable_unreachable
            lost = self._saves.lock_lost or gone  # another writer's run now, or a store where each try waits out its retries
            if gone:
                abandon(self._saves.lock, f"{self.storage.url} is unreachable: close() skipped metrics.csv, the run record and the run lock's removal")
            with contextlib.suppress(CheckpointError):
                if not lost:
                    self.metrics_log.flush()
            self._preemption.uninstall()
            if self._saves.locked and not lost and self._run_record.session.get("saves"):
                self._run_record.session["clean"] = not self._run_record.session["preempted"]
                self._run_record.write(save_interval=self.schedule.describe())
            self._saves.release_lock()

    def watchdog(
        self, seconds: float, *, save_seconds: float | None = None, poll_seconds: float | None = None,
        exit_code: int = HANG_EXIT_CODE, collective_timeout: float | None = None,
    ) -> Watchdog:
        """Start a hang watchdog (a context manager around the loop; see ckptguard.run.watchdog): no
        ``save()`` (or ``Watchdog.beat()``) for ``seconds``, or a save blocked past ``save_seconds``
        (4 x seconds), writes every stack to ``RUN/hangs/``, records the hang and exits with
        ``exit_code``. ``collective_timeout`` (the process group's) is checked to be longer."""
        self._check_open()
        options = WatchdogOptions(
            seconds, save_seconds, poll_seconds, exit_code=exit_code, collective_timeout=collective_timeout
        )
        if self._watchdog is not None:
            self._watchdog.stop()
        self._watchdog = Watchdog(
            self.storage, options, rank=self._coord.rank, drain=self._saves.wait, on_hang=self._record_hang
        ).start()
        return self._watchdog

    def _record_hang(self, hang: dict[str, Any]) -> None:
        """The watchdog fires (its report thread, before the exit): see RunRecord.record_hang."""
        self._run_record.record_hang(hang, end_session=self._saves.locked and not self._saves.lock_lost)

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"{self!r} is closed; create a new CheckpointManager.")

    # ---- restore ------------------------------------------------------------------------------

    def restore(self, state: TrainState, step: int | None = None, strict: bool = True) -> int | None:
        """Restore the newest valid checkpoint (or exactly ``step``); return its step or None.

        A checkpoint whose bytes fail verification is logged, marked corrupt and skipped; the
        next older one is tried. Returns None only when the run has no committed checkpoint at
        all; raises NoValidCheckpointError when checkpoints exist and none can be used, and
        StateMismatchError (nothing marked) when today's objects do not take the saved state.
        See ckptguard.manager.restoring for every way a restore ends.
        """
        self._check_open()
        self.wait()
        where, found = restore_run(self.storage, self._tiers, state, coord=self._coord, verify=self.verify_on_restore,
                                   strict=strict, step=step, listing=self.checkpoints)
        if found is None:
            raise_if_missing_bucket(self.storage)  # not a fresh run: a typo, or a bucket not created yet
            self.metrics_log.restart_after(None)  # a fresh run: rows of an attempt that never committed go
            return None
        c, report = found
        log_config_drift(CheckpointReader(where, c.name, c.manifest or {}), state.config)  # WARNING per changed key
        self.metrics_log.restart_after(c.step)  # rows past the restored step are superseded
        # A rollback: checkpoints newer than the restored one belong to a continuation abandoned at the next commit (marked then, not now).
        self._abandoned = {}  # none known when a faster tier's copy was restored while the durable tier is unreachable
        with contextlib.suppress(StorageError) if where is not self.storage else contextlib.nullcontext():
            self._abandoned = newer_than(scan(self.storage, cache=self._manifests), c.step)
        if self._tiers is not None:
            self._tiers.restored(c, from_first=where is self._tiers.first.storage)
        self.last_restore_report = report
        self.resumed_from = c.step
        self.last_saved_step = c.step
        rid = (c.manifest or {}).get("run_id")
        self.run_id = rid if isinstance(rid, str) else self.run_id
        self._own_lineages = {self.run_id} if isinstance(rid, str) else {self.run_id, None}
        self._run_record.session.update(run_id=self.run_id, resumed_from=c.step)
        self.schedule.saved()
        return c.step

    # ---- preemption ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def preemption_guard(
        self,
        signals: tuple[int, ...] = DEFAULT_SIGNALS,
        *,
        exit_code: int | None = None,
        pollers: tuple[Callable[[], bool], ...] = (),
        poll_seconds: float = 5.0,
    ) -> Iterator[PreemptionGuard]:
        """Catch preemption signals for the duration of the block (see ckptguard.policies.preemption)."""
        with self._preemption.installed(signals, exit_code=exit_code, pollers=pollers, poll_seconds=poll_seconds) as guard:
            yield guard
