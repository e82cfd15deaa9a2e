"""Loss health: catch non-finite or spiking losses and gradient norms, roll back, skip the data.

:class:`LossGuard` watches the loss (and optionally the gradient norm) of every step. It trips on
a non-finite value, or on a spike: a z-score above ``z_threshold`` against a moving window of the
last ``window`` healthy values. On a trip, :meth:`LossGuard.rollback` restores the newest valid
checkpoint from before the trip, moves the sampler past the offending data window (the batches from
the restored step up to the trip, plus ``skip_extra_batches``), and returns the restored step. After
``max_retries`` rollbacks without getting ``recover_steps`` past the last trip it raises
:class:`~ckptguard.errors.TrainingDivergedError`.

Check *before* saving, so that a poisoned step is never checkpointed::

    guard = cg.LossGuard(mgr, window=50, z_threshold=6.0, max_retries=3)
    step = mgr.restore(state) or 0
    while step < total:
        for xb, yb in loader:
            loss, grad_norm = train_step(xb, yb)
            step += 1
            if guard.check(step, loss, grad_norm):
                step = guard.rollback(state)
                break                      # re-create the iterator: it now skips the bad window
            mgr.save(step, state, metrics={"loss": loss})
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ckptguard.capture.sampler import ResumableSampler, track_dataloader
from ckptguard.capture.state import TrainState
from ckptguard.errors import TrainingDivergedError
from ckptguard.policies.slimming import slimmed_record
from ckptguard.run.catalog import CheckpointInfo, mark_status
from ckptguard.storage.base import Storage

__all__ = ["LossGuard", "RollbackTarget", "Trip", "zscore"]

log = logging.getLogger(__name__)


class RollbackTarget(Protocol):
    """What a LossGuard needs of the run's checkpoint manager (``CheckpointManager`` is one)."""

    @property
    def storage(self) -> Storage: ...

    def add_manifest_fields(self, provider: Callable[[int, TrainState], Mapping[str, Any]]) -> None: ...

    def wait(self) -> None: ...

    def checkpoints(self) -> list[CheckpointInfo]: ...

    def restore(self, state: TrainState, step: int | None = None, strict: bool = True) -> int | None: ...


@dataclasses.dataclass(frozen=True)
class Trip:
    """One detection: what tripped at which step, and the rollback that followed."""

    step: int
    kind: str  # "loss" or "grad_norm"
    value: float
    why: str  # "non-finite" or "spike z=..."
    restored_step: int | None = None
    skipped_samples: int = 0


def zscore(value: float, history: collections.deque[float]) -> float:
    """How many standard deviations ``value`` lies above the mean of ``history``."""
    n = len(history)
    mean = sum(history) / n
    var = sum((h - mean) ** 2 for h in history) / n
    std = max(math.sqrt(var), 1e-6 * max(1.0, abs(mean)))
    return (value - mean) / std


class _Watch:
    def __init__(self, kind: str, window: int, z_threshold: float, min_history: int) -> None:
        self.kind = kind
        self.history: collections.deque[float] = collections.deque(maxlen=window)
        self.z_threshold = z_threshold
        self.min_history = min_history

    def check(self, value: float) -> str | None:
        if not math.isfinite(value):
            return "non-finite"
        if len(self.history) >= self.min_history:
            z = zscore(value, self.history)
            if z > self.z_threshold:
                return f"spike z={z:.1f} over the last {len(self.history)} steps"
        self.history.append(value)
        return None


class LossGuard:
    """Detects divergence and rolls the run back to the last good checkpoint (module docstring).

    Args:
        manager: the run's CheckpointManager (rollback restores through it).
        window: length of the moving window of healthy values for the z-score.
        z_threshold: a value more than this many standard deviations above the window's mean trips.
        min_history: no spike detection before this many healthy values (non-finite always trips).
        max_retries: rollbacks allowed per incident; one more trip raises TrainingDivergedError.
        skip_extra_batches: batches to skip beyond the window from the restored step to the trip.
        recover_steps: healthy steps past the last trip that end an incident (default: window).
        batch_size: samples per batch, when the TrainState has a sampler but no DataLoader.
    """

    def __init__(
        self,
        manager: RollbackTarget,
        *,
        window: int = 50,
        z_threshold: float = 6.0,
        min_history: int | None = None,
        max_retries: int = 3,
        skip_extra_batches: int = 0,
        recover_steps: int | None = None,
        batch_size: int | None = None,
    ) -> None:
        if window < 2:
            raise ValueError(f"LossGuard(window=...) must be >= 2, got {window}")
        if z_threshold <= 0:
            raise ValueError(f"LossGuard(z_threshold=...) must be > 0, got {z_threshold}")
        if max_retries < 0 or skip_extra_batches < 0:
            raise ValueError("LossGuard: max_retries and skip_extra_batches must be >= 0")
        self.manager = manager
        min_history = min(window, 10) if min_history is None else min_history
        self._watches = {k: _Watch(k, window, z_threshold, min_history) for k in ("loss", "grad_norm")}
        self.max_retries = max_retries
        self.skip_extra_batches = skip_extra_batches
        self.recover_steps = window if recover_steps is None else recover_steps
        self.batch_size = batch_size
        self.trips: list[Trip] = []
        self.pending: Trip | None = None
        self.retries = 0
        manager.add_manifest_fields(self._manifest_field)

    def _manifest_field(self, step: int, state: TrainState) -> dict[str, Any]:
        return {"loss_guard": {"trips": [dataclasses.asdict(t) for t in self.trips[-20:]]}} if self.trips else {}

    def check(self, step: int, loss: Any, grad_norm: Any = None) -> bool:
        """Record one step; return True when it tripped (then call :meth:`rollback`)."""
        if self.pending is not None:
            return True
        for kind, value in (("loss", loss), ("grad_norm", grad_norm)):
            if value is None:
                continue
            v = float(value.item() if hasattr(value, "item") else value)
            why = self._watches[kind].check(v)
            if why is not None:
                self.pending = Trip(step, kind, v, why)
                log.warning("LossGuard: %s at step %d is %s (%s).", kind, step, v, why)
                return True
        if self.trips and step > self.trips[-1].step + self.recover_steps:
            self.retries = 0
        return False

    def rollback(self, state: TrainState) -> int:
        """Restore the newest valid checkpoint before the trip, skip the bad data; return its step."""
        trip = self.pending
        if trip is None:
            raise RuntimeError("LossGuard.rollback() called without a trip; check() returned False")
        self.retries += 1
        where = self.manager.storage.url
        if self.retries > self.max_retries:
            raise TrainingDivergedError(
                f"Training in {where} diverged: {trip.kind} at step {trip.step} is {trip.value} "
                f"({trip.why}), after {self.max_retries} rollback(s) with the bad data skipped. "
                "Lower the learning rate or clip gradients, inspect the data after the last good "
                "checkpoint, or raise LossGuard(max_retries=...)."
            )
        self.manager.wait()
        ckpts = self.manager.checkpoints()
        for c in ckpts:
            if c.step >= trip.step and c.valid:
                mark_status(self.manager.storage, c.name, "failed", f"saved at or after a loss-guard trip at step {trip.step}")
        good = [c for c in ckpts if c.valid and c.step < trip.step]
        if not good:
            raise TrainingDivergedError(
                f"Training in {where} diverged at step {trip.step} ({trip.kind} {trip.value}, "
                f"{trip.why}) and there is no valid checkpoint before it to roll back to. Save "
                "more often (every_steps=...) or lower the learning rate."
            )
        full = [c for c in good if slimmed_record(c.manifest) is None]  # a slimmed one holds weights only
        restored = self.manager.restore(state, step=(full or good)[-1].step)
        assert restored is not None
        skipped = self._skip(state, trip.step - restored + self.skip_extra_batches)
        self.pending = None
        self.trips.append(dataclasses.replace(trip, restored_step=restored, skipped_samples=skipped))
        log.warning(
            "LossGuard: rolled back from step %d to %d (attempt %d of %d) and skipped %d samples.",
            trip.step, restored, self.retries, self.max_retries, skipped,
        )
        return restored

    def _skip(self, state: TrainState, batches: int) -> int:
        sampler: ResumableSampler | None
        if state.dataloader is not None:
            tracker = track_dataloader(state.dataloader)
            sampler, bs = tracker.sampler, tracker.batch_size
        else:
            sampler = state.sampler if isinstance(state.sampler, ResumableSampler) else None
            bs = self.batch_size or 1
        if sampler is None:
            log.warning("LossGuard: no ResumableSampler in the TrainState; the bad data is not skipped.")
            return 0
        sampler.skip(batches * bs)
        return batches * bs
