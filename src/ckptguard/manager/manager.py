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
import json
import logging
import os
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from ckptguard.capture.configdrift import log_config_drift
from ckptguard.capture.environment import collect_environment
from ckptguard.capture.state import Snapshot, TrainState, capture
from ckptguard.distributed.coordination import coordinator, preempt_code, signum_of
from ckptguard.errors import (
    CheckpointError,
)
from ckptguard.format.manifest import as_step, checkpoint_name
from ckptguard.manager.restoring import newer_than, restore_first_valid, select_candidates, supersede
from ckptguard.persist.background import BackgroundSaves, Reaper
from ckptguard.persist.gc import collect_garbage
from ckptguard.persist.incremental import IncrementalRun
from ckptguard.persist.parallel_io import default_tensor_writer
from ckptguard.persist.reader import CheckpointReader
from ckptguard.persist.staging import Stager
from ckptguard.persist.writer import clean_debris, write_checkpoint
from ckptguard.policies.pins import check_not_foreign, new_run_id, pin, pinned_steps, plan_own_lineage, unpin
from ckptguard.policies.preemption import DEFAULT_SIGNALS, PreemptionGuard
from ckptguard.policies.retention import Decision, Retention, apply_decisions
from ckptguard.policies.schedule import SaveSchedule, observed_mtbf
from ckptguard.run.catalog import CheckpointInfo, ManifestCache, scan
from ckptguard.run.history import record_events
from ckptguard.run.lock import LockPolicy, RunLock
from ckptguard.run.metrics_log import MetricsLog, plain_metrics
from ckptguard.run.runrecord import RUN_FILE, RunRecord, read_run_record
from ckptguard.storage import Storage, open_storage

__all__ = ["CheckpointManager", "RUN_FILE"]

log = logging.getLogger(__name__)


def _wait_at_exit(ref: weakref.ReferenceType[CheckpointManager]) -> None:
    mgr = ref()
    if mgr is not None:
        try:
            mgr.close()
        except CheckpointError as e:
            log.error("A pending checkpoint save failed at exit: %s", e)


class CheckpointManager:
    """Saves, restores and curates the checkpoints of one run directory.

    Args:
        directory: local path, ``file://`` URL, any fsspec URL (``s3://bucket/prefix``), or a
            Storage object.
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
        drift_epsilon: warn when the probe output changes by more than this (relative L2)
            between consecutive saves.
        on_verification_failure: called with a dict (step, status, detail, path) when a
            committed checkpoint fails verification.
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
    ) -> None:
        if run_id is not None and (not isinstance(run_id, str) or not run_id.replace("-", "").replace("_", "").isalnum()):
            raise ValueError(f"run_id must be a non-empty string of letters, digits, '-' and '_', got {run_id!r}")
        self.storage: Storage = open_storage(directory, storage_options)
        if every not in (None, "auto"):
            raise ValueError(f"every= accepts only 'auto' (or None), got {every!r}; use every_steps/every_seconds")
        self.schedule = SaveSchedule(every_steps, every_seconds, auto=every == "auto", mtbf_seconds=mtbf_seconds)
        self.run_id = run_id or new_run_id()  # lineage; a restore adopts the restored checkpoint's
        self._own_lineages: set[str | None] = {self.run_id}
        self._run_record = RunRecord(self.storage, self.run_id)
        if self.schedule.auto:
            self.schedule.use_observed_mtbf(observed_mtbf(self._run_record.previous_sessions()))
            prev_cost = (read_run_record(self.storage).get("save_interval") or {}).get("save_cost_seconds")
            if isinstance(prev_cost, (int, float)) and not isinstance(prev_cost, bool):
                self.schedule.save_cost = float(prev_cost)
        self.retention = retention if retention is not None else Retention()
        self._warned_unranked = False  # keep_best's metric missing from a save: said once
        if not isinstance(self.retention, Retention):
            raise TypeError(f"retention must be a ckptguard.Retention, got {type(retention).__name__}")
        self.async_save = bool(async_save)
        self.probe = probe
        self.verify_on_restore = verify_on_restore
        self._manifests = ManifestCache(self.storage)  # parsed once, across saves
        self._incremental = IncrementalRun(self.storage, manifests=self._manifests) if incremental else None
        self.resumed_from: int | None = None
        self._abandoned: dict[str, Any] = {}  # name -> manifest digest, after a rollback (see restore)
        self.last_saved_step: int | None = None
        self.last_save_seconds: float | None = None
        self.last_blocked_seconds: float | None = None
        self.metrics_log = MetricsLog(self.storage)
        self._coord = coordinator()  # torch.distributed: rank 0 locks, commits, curates
        if self._coord.active and self.async_save:
            log.info("async_save is not used in a distributed run: saves are collective and synchronous.")
            self.async_save = False
        policy = lock if isinstance(lock, LockPolicy) else None
        self._lock = RunLock(self.storage, policy=policy) if lock and self._coord.is_primary else None
        self._locked = False
        self._environment: dict[str, Any] | None = None
        self._background = BackgroundSaves(self.storage.url)
        self._reaper = Reaper(self.storage)  # frees pruned checkpoints' data beside training
        self._stager = Stager()
        self.tensor_writer = default_tensor_writer(self.storage, background=self.async_save)
        self.last_waited_seconds: float | None = None
        self._guard: PreemptionGuard | None = None
        self._closed = False
        self._debris_cleaned = False
        self._post_commit: list[Callable[[dict[str, Any]], None]] = []
        self._manifest_fields: list[Callable[[int, TrainState], Mapping[str, Any]]] = []
        self.last_restore_report: Any = None
        self.verifier = None
        if probe is not None:
            from ckptguard.verification.behaviour import attach_verifier

            self.verifier = attach_verifier(self, probe, drift_epsilon=drift_epsilon, on_failure=on_verification_failure)
        atexit.register(_wait_at_exit, weakref.ref(self))

    # ---- context manager ----------------------------------------------------------------------

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            try:
                self.close()
            except CheckpointError as e:
                log.error("While closing after an error: %s", e)

    def __repr__(self) -> str:
        return f"CheckpointManager({self.storage.url!r})"

    # ---- lock ---------------------------------------------------------------------------------

    def _acquire_lock(self) -> None:
        """Take the writer lock at the first write (RunLockLostError once another took the run)."""
        if self._lock is not None:
            self._lock.acquire()  # a no-op while held
            self._locked = True

    # ---- listing ------------------------------------------------------------------------------

    def checkpoints(self) -> list[CheckpointInfo]:
        """All committed checkpoints of the run, oldest first (by step number)."""
        return scan(self.storage, cache=self._manifests)

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
        self._background.raise_if_failed()
        if not self._coord.active:
            self._acquire_lock()  # a writer from its first save() (metrics.csv included)
        if metrics and self._coord.is_primary:
            self.metrics_log.record(step, metrics)
        preempted = self._guard is not None and self._guard.poll()
        code = preempt_code(preempted, self._guard.signum if self._guard is not None else None)
        due, code = self._coord.agree_save(step, force or self.schedule.due(step), code)
        if not (due or code):
            if self.async_save and not self._stager.prepared:  # allocate the host buffers early
                self._stager.prepare(lambda: capture(state, step).tensor_files)
            return False
        if code:
            if self._guard is None:
                self._guard = PreemptionGuard(())
            self._guard.trigger("preemption on another rank", signum_of(code))
            self._preemption_exit(step, state, metrics)
        self._save_now(step, state, metrics, reason="forced" if force and not self.schedule.due(step) else "periodic")
        return True

    def _preemption_exit(self, step: int, state: TrainState, metrics: Mapping[str, Any] | None) -> None:
        assert self._guard is not None
        reason = self._guard.reason or "preemption"
        log.warning("Preemption (%s): saving step %d synchronously, then exiting.", reason, step)
        self.wait()
        if self.last_saved_step != step:
            self._save_now(step, state, metrics, reason="preemption", sync=True, extra={"preemption": reason})
        code = self._guard.resolved_exit_code()
        self._run_record.session["preempted"] = True
        self.close()
        self._coord.barrier()  # every rank leaves only after the commit and rank 0's clean-up
        sys.exit(code)

    def _fields(self, step: int, state: TrainState, snap: Snapshot, metrics: Mapping[str, Any] | None, reason: str) -> dict[str, Any]:
        if self._environment is None:
            self._environment = collect_environment()
        unranked = None if self._warned_unranked else self.retention.unranked(step, metrics)
        if unranked:
            self._warned_unranked = True
            log.warning("%s", unranked)
        fields: dict[str, Any] = {
            "reason": reason,
            "metrics": plain_metrics(metrics),
            "config_hash": snap.config_hash,
            "environment": self._environment,
            "probe": None,
            "verification": {"status": "unverified"},
            "resumed_from": self.resumed_from,
            "run_id": self.run_id,
            "save_interval": self.schedule.describe(),
            "extra": {},
        }
        for provider in self._manifest_fields:
            fields.update(provider(step, state))
        return fields

    def _save_now(
        self,
        step: int,
        state: TrainState,
        metrics: Mapping[str, Any] | None,
        *,
        reason: str,
        sync: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if self._coord.active:
            from ckptguard.distributed.saving import save_distributed

            save_distributed(self, step, state, metrics, reason=reason, extra=extra)
            return
        self._acquire_lock()
        check_not_foreign(self.storage, step, self._own_lineages, self.run_id)
        t0 = time.perf_counter()
        snap = capture(state, step)
        fields = self._fields(step, state, snap, metrics, reason)
        if extra:
            fields["extra"].update(extra)
        blobs = {"state.json": json.dumps(snap.state, separators=(",", ":")).encode()}
        if snap.config_yaml is not None:
            blobs["config.yaml"] = snap.config_yaml
        if self.async_save and not sync:
            waited = 0.0
            if self._background.busy:
                w0 = time.perf_counter()
                self._background.result()
                waited = time.perf_counter() - w0
                log.info("save(step=%d) waited %.3fs for the previous async save", step, waited)
            else:
                self._background.result()
            files = self._stager.stage(snap.tensor_files)
            blocked = time.perf_counter() - t0
            fields["blocked_seconds"] = round(blocked, 6)
            fields["waited_seconds"] = round(waited, 6)
            self.last_blocked_seconds = blocked
            self.last_waited_seconds = waited
            self.schedule.saved(cost=blocked)
            self._background.submit(self._write_and_commit, step, files, blobs, fields, t0)
        else:
            self._background.result()
            self._write_and_commit(step, snap.tensor_files, blobs, fields, t0)
            self.last_blocked_seconds = time.perf_counter() - t0
            self.schedule.saved(cost=self.last_blocked_seconds)

    def _write_and_commit(
        self,
        step: int,
        files: Mapping[str, Mapping[str, torch.Tensor]],
        blobs: Mapping[str, bytes],
        fields: dict[str, Any],
        t0: float,
    ) -> dict[str, Any]:
        if self._lock is not None:
            self._lock.refresh()  # before removing debris: a writer that lost the run removes nothing
        if not self._debris_cleaned or self._reaper.failed:
            self._reaper.wait()  # what it is removing is not debris
            self._reaper.failed = 0
            clean_debris(self.storage)
            self._debris_cleaned = True
        self._flush_metrics()  # rows up to this step reach metrics.csv before the commit: a crash loses none
        fields = dict(fields)
        tensor_writer = self._incremental.writer() if self._incremental else self.tensor_writer
        try:
            manifest = write_checkpoint(
                self.storage, step, files, blobs, fields, tensor_writer=tensor_writer,
                before_commit=self._lock.check if self._lock is not None else None,
            )
        except BaseException:
            self._debris_cleaned = False  # the failed save may have left debris: next save cleans
            raise
        self.last_saved_step = step
        self.last_save_seconds = time.perf_counter() - t0
        log.info("Saved %s in %.3fs", self.storage.describe(checkpoint_name(step)), self.last_save_seconds)
        self._after_commit(manifest)
        reaping = self._reaper.pending
        if any(n.startswith((".tmp-", ".trash-")) and n not in reaping for n in self.storage.listdir("")):
            self._debris_cleaned = False  # a cleanup failed quietly: the next save retries it
        return manifest

    def add_post_commit_hook(self, hook: Callable[[dict[str, Any]], None]) -> None:
        """Call ``hook(manifest)`` after every commit (in the saving thread; before retention)."""
        self._post_commit.append(hook)

    def _flush_metrics(self) -> None:
        try:
            self.metrics_log.flush()
        except CheckpointError as e:  # the checkpoint does not depend on them; retried later
            log.warning("Could not append to metrics.csv: %s", e)

    def _after_commit(self, manifest: dict[str, Any]) -> None:
        self._flush_metrics()
        self._record_run()
        abandoned, self._abandoned = self._abandoned, {}
        supersede(self.storage, abandoned, self.resumed_from)  # the first commit after a rollback
        for hook in self._post_commit:
            hook(manifest)
        self._apply_retention()
        collect_garbage(self.storage, self._manifests, reap=self._reaper)

    def _record_run(self) -> None:
        """Merge the policy, the save interval and this session into RUN/ckptguard.json."""
        self._run_record.session["saves"] = int(self._run_record.session.get("saves", 0)) + 1
        self._run_record.write(retention=self.retention.to_json(), save_interval=self.schedule.describe())

    def protected_steps(self) -> dict[int, str]:
        out: dict[int, str] = {}
        if self.last_saved_step is not None:
            out[self.last_saved_step] = "just saved"
        if self.resumed_from is not None:
            out[self.resumed_from] = "resumed from"
        return out

    def plan_retention(self) -> list[Decision]:
        """What retention would keep/delete now, with reasons (nothing is deleted)."""
        ckpts = self.checkpoints()
        protected = pinned_steps(self.storage, ckpts)
        for step, why in self.protected_steps().items():
            protected[step] = f"{protected[step]}; {why}" if step in protected else why
        return plan_own_lineage(ckpts, self.retention, self._own_lineages, protected)

    def pin(self, step: int, note: str = "") -> None:
        """Protect checkpoint ``step`` from retention (a ``PINNED`` marker; see ckptguard.policies.pins)."""
        self._acquire_lock()
        pin(self.storage, step, note)

    def unpin(self, step: int) -> bool:
        """Remove the pin of checkpoint ``step``; return whether it was pinned."""
        self._acquire_lock()
        return unpin(self.storage, step)

    def _apply_retention(self) -> list[int]:
        if self.retention.keeps_everything:
            return []
        deleted, failed = apply_decisions(self.storage, self.plan_retention(), reap=self._reaper)
        if failed:
            self._debris_cleaned = False  # a half-done delete is debris: the next save cleans it
        record_events(self.storage, "pruned", deleted, reason="retention")
        return deleted

    # ---- async plumbing -----------------------------------------------------------------------

    def wait(self) -> None:
        """Block until the pending async save is durable and the data of the checkpoints
        retention pruned is freed; raise the save's error if it failed."""
        try:
            self._background.result()
        finally:
            self._reaper.wait()

    def close(self) -> None:
        """Wait for pending saves, flush metrics, release the lock. Safe to call twice."""
        if self._closed:
            return
        try:
            self.wait()
        finally:
            self._closed = True
            self._background.shutdown()
            self._reaper.close()  # removals finish under the run lock; its thread ends
            lost = self._lock is not None and self._lock.lost  # the run is another writer's now
            with contextlib.suppress(CheckpointError):
                if not lost:
                    self.metrics_log.flush()
            if self._guard is not None:
                self._guard.uninstall()
            if self._locked and not lost and self._run_record.session.get("saves"):
                self._run_record.session["clean"] = not self._run_record.session["preempted"]
                self._run_record.write(save_interval=self.schedule.describe())
            if self._lock is not None and self._locked:
                self._lock.release()
                self._locked = False

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
        candidates = select_candidates(self.checkpoints(), step, self.storage.url)
        found = restore_first_valid(
            self.storage, candidates, state, coord=self._coord, verify=self.verify_on_restore,
            strict=strict, rescan=self.checkpoints, explicit=step is not None,
        )
        if found is None:
            self.metrics_log.restart_after(None)  # a fresh run: rows of an attempt that never committed go
            return None
        c, report = found
        log_config_drift(CheckpointReader(self.storage, c.name, c.manifest or {}), state.config)  # WARNING per changed key
        self.metrics_log.restart_after(c.step)  # rows past the restored step are superseded
        # A rollback: checkpoints newer than the restored one belong to a continuation the run
        # abandons at its next commit (they are marked then, not now: a restore alone changes nothing).
        self._abandoned = newer_than(self.checkpoints(), c.step)
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
        guard = PreemptionGuard(signals, exit_code=exit_code, pollers=pollers, poll_seconds=poll_seconds)
        guard.install()
        previous, self._guard = self._guard, guard
        try:
            yield guard
        finally:
            guard.uninstall()
            self._guard = previous
