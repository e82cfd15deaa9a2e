"""Accelerate integration: ``save_state`` / ``load_state`` through ckptguard.

>>> from ckptguard.integrations.accelerate import CkptguardAccelerator
>>> accelerator = CkptguardAccelerator(checkpoint_dir="runs/exp1", retention=cg.Retention(keep_last=3))
>>> model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
>>> step = accelerator.load_state() or 0          # newest VALID checkpoint (None: fresh run)
>>> ...
>>> accelerator.save_state(step=step)              # a ckptguard commit

``CkptguardAccelerator`` is an ``accelerate.Accelerator`` (1.x, extra ``ckptguard[hf]``) whose
``save_state`` commits the prepared models, optimizers, schedulers, the grad scaler, every object
given to ``register_for_checkpointing`` and the RNG of python, numpy, torch CPU and CUDA as one
ckptguard checkpoint (safetensors + JSON, checksummed, manifest written last) in
``checkpoint_dir``, instead of ``checkpoint_<n>/`` folders of pickles. What the plain Accelerator
does not give:

- retention (``Retention``, or ``ProjectConfiguration.total_limit`` as ``keep_last``) runs after
  the new checkpoint is committed: a crash inside a save never leaves fewer good checkpoints
  (Accelerate's ``total_limit`` deletes the oldest folder before writing the new one);
- ``load_state()`` verifies every byte, skips a torn or corrupt checkpoint for the next older one,
  and never unpickles (Accelerate's ``load_state`` picks the highest-numbered folder, whole or not,
  and ``torch.load``s its pickles);
- ``maybe_save_state(step)`` saves when ``every_steps``/``every_seconds`` say so, and under
  ``preemption_guard()`` a SIGTERM ends with a synchronous save at that step, then exit;
- mid-epoch resume: ``skip_first_batches(loader, n)`` skips sampler indices (no batch is loaded
  again) and applies the checkpoint's RNG after the resumed epoch's iterator drew its seed, where an
  uninterrupted run has it: the resumed run is bit-identical (CPU) when the sampler's order
  depends on the epoch only (``DataLoaderConfiguration(use_seedable_sampler=True)`` + ``set_epoch``).

Single process (one GPU or CPU): DeepSpeed, FSDP, Megatron and multi-process runs are refused.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any

# accelerate: the extra ``hf`` (pip install ckptguard[hf])
from accelerate import Accelerator  # type: ignore[import-untyped,import-not-found,unused-ignore]
from accelerate.utils import DistributedType  # type: ignore[import-untyped,import-not-found,unused-ignore]

from ckptguard.capture.rng import capture_rng, restore_rng
from ckptguard.capture.state import TrainState
from ckptguard.errors import CheckpointError, UnsupportedStateError
from ckptguard.integrations.paths import checkpoint_step
from ckptguard.manager.manager import CheckpointManager
from ckptguard.policies.preemption import PreemptionGuard
from ckptguard.policies.retention import Retention
from ckptguard.storage import Storage

__all__ = ["ACCELERATE_KEY", "CkptguardAccelerator", "RngAfterFirstBatch"]

ACCELERATE_KEY = "accelerate"  # extra[...] in state.json: Accelerate's own counters


class RngAfterFirstBatch:
    """A DataLoader whose iterator applies ``rng`` once it has started (and drawn its seed).

    The resumed epoch's iterator draws torch's base seed from the global RNG, as the uninterrupted
    run's did at the epoch start; applying the checkpoint's RNG after that draw puts the stream
    where the uninterrupted run had it at the saved step (the HF Trainer does the same).
    """

    def __init__(self, loader: Any, rng: dict[str, Any]) -> None:
        self.loader = loader
        self.rng: dict[str, Any] | None = rng

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.loader)
        try:
            first = next(it)
        except StopIteration:
            return
        finally:
            if self.rng is not None:
                restore_rng(self.rng)
                self.rng = None
        yield first
        yield from it


def _inner(obj: Any, attr: str) -> Any:
    """The torch object behind Accelerate's wrapper (AcceleratedOptimizer.optimizer, AcceleratedScheduler.scheduler)."""
    return getattr(obj, attr, obj)


class CkptguardAccelerator(Accelerator):  # type: ignore[misc]
    """An ``accelerate.Accelerator`` whose ``save_state``/``load_state`` are ckptguard commits and restores.

    Args (beyond Accelerator's): ``checkpoint_dir`` (path, URL or Storage; default
    ``project_dir``), ``retention`` (default ``Retention(keep_last=total_limit)`` of the
    ProjectConfiguration, else keep all), ``every_steps``/``every_seconds`` (for
    ``maybe_save_state``), ``checkpoint_options`` (more CheckpointManager keyword arguments:
    ``probe``, ``async_save``, ``storage_options``...), or ``checkpoint_manager`` (your own).
    """

    def __init__(
        self,
        *args: Any,
        checkpoint_dir: str | os.PathLike[str] | Storage | None = None,
        retention: Retention | None = None,
        every_steps: int | None = None,
        every_seconds: float | None = None,
        checkpoint_options: Mapping[str, Any] | None = None,
        checkpoint_manager: CheckpointManager | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if self.num_processes > 1 or self.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP, DistributedType.MEGATRON_LM):
            raise UnsupportedStateError(
                "CkptguardAccelerator supports single-process training only (no DeepSpeed, FSDP, Megatron or "
                "multi-process runs yet). Use the plain Accelerator for those, or a ckptguard loop with CheckpointManager."
            )
        if checkpoint_manager is None:
            where = checkpoint_dir if checkpoint_dir is not None else self.project_dir
            if where is None:
                raise CheckpointError("CkptguardAccelerator needs checkpoint_dir= (or a ProjectConfiguration with project_dir).")
            if retention is None:
                retention = Retention(keep_last=self.project_configuration.total_limit)
            checkpoint_manager = CheckpointManager(
                where, retention=retention, every_steps=every_steps, every_seconds=every_seconds, **dict(checkpoint_options or {})
            )
        self.checkpoint_manager = checkpoint_manager
        self._cg_rng: dict[str, Any] | None = None  # the restored RNG, for skip_first_batches
        self._cg_metrics: tuple[int | None, Mapping[str, Any] | None] = (None, None)

    def ckptguard_state(self) -> TrainState:
        """What one checkpoint holds: models, optimizers, schedulers, scaler, registered objects, RNG."""
        models = [self.unwrap_model(m) for m in self._models]
        objects: dict[str, Any] = {f"model_{i}": m for i, m in enumerate(models) if i > 0}
        objects.update({f"custom_{i}": o for i, o in enumerate(self._custom_objects)})
        return TrainState(
            model=models[0] if models else None,
            optimizer={str(i): _inner(o, "optimizer") for i, o in enumerate(self._optimizers)} or None,
            scheduler={str(i): _inner(s, "scheduler") for i, s in enumerate(self._schedulers)} or None,
            scaler=self.scaler,
            extra={ACCELERATE_KEY: {"step": int(self.step), "iteration": int(self.save_iteration)}},
            **objects,
        )

    def save_state(
        self, output_dir: str | None = None, safe_serialization: bool = True, *, step: int | None = None,
        metrics: Mapping[str, Any] | None = None, **kwargs: Any,
    ) -> str:
        """Commit a checkpoint at ``step`` (default: the save counter + 1); return its path.

        ``output_dir`` must be None: checkpoints go to the run directory, named by step.
        """
        if output_dir is not None:
            raise CheckpointError(
                f"save_state({output_dir!r}): CkptguardAccelerator saves into its run directory "
                f"{self.checkpoint_manager.storage.url}, one step-NNNNNNNNN folder per step; call save_state(step=N)."
            )
        step = self.save_iteration + 1 if step is None else step
        if metrics is None and self._cg_metrics[0] == step:
            metrics = self._cg_metrics[1]  # what maybe_save_state(step, metrics) was told at this step
        mgr = self.checkpoint_manager
        mgr.save(step, self.ckptguard_state(), metrics=metrics, force=True)
        self.project_configuration.iteration = step
        return f"{mgr.storage.url.rstrip('/')}/step-{step:09d}"

    def maybe_save_state(self, step: int, metrics: Mapping[str, Any] | None = None) -> bool:
        """Save when due (``every_steps``/``every_seconds``) or preempted; metrics always go to metrics.csv."""
        self._cg_metrics = (step, metrics)
        saved = self.checkpoint_manager.save(step, self.ckptguard_state(), metrics=metrics)
        if saved:
            self.project_configuration.iteration = step
        return saved

    def load_state(self, input_dir: str | None = None, load_kwargs: dict[str, Any] | None = None, *, strict: bool = True, **kwargs: Any) -> int | None:
        """Restore the newest valid checkpoint (or ``input_dir``, a ``RUN/step-N`` folder); return its step, None for a fresh run."""
        step = None if input_dir is None else checkpoint_step(str(input_dir), "Call load_state() for the newest valid checkpoint")
        holder: dict[str, Any] = {}
        ts = self.ckptguard_state()
        ts.extra = holder
        found = self.checkpoint_manager.restore(ts, step=step, strict=strict)
        if found is None:
            return None
        counters = holder.get(ACCELERATE_KEY) or {}
        self.step = int(counters.get("step", 0))
        self.project_configuration.iteration = found
        self._cg_rng = capture_rng()
        return found

    def skip_first_batches(self, dataloader: Any, num_batches: int = 0) -> Any:
        """Accelerate's skip (sampler indices only), and the restored RNG applied where the uninterrupted run had it."""
        skipped = super().skip_first_batches(dataloader, num_batches=num_batches)
        rng, self._cg_rng = self._cg_rng, None
        return RngAfterFirstBatch(skipped, rng) if rng is not None and num_batches > 0 else skipped

    def preemption_guard(self, **kwargs: Any) -> AbstractContextManager[PreemptionGuard]:
        """``CheckpointManager.preemption_guard``: SIGTERM/SIGUSR1/SIGINT -> the next ``maybe_save_state`` saves and exits."""
        return self.checkpoint_manager.preemption_guard(**kwargs)

    def end_training(self) -> None:
        super().end_training()
        self.checkpoint_manager.close()
