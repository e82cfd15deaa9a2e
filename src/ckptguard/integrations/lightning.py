"""PyTorch Lightning integration (extra ``lightning``, tested with ``lightning==2.6.6``).

>>> from ckptguard.integrations.lightning import CkptguardCallback, resumable_loader
>>> cb = CkptguardCallback("runs/exp1", every_steps=100, retention=cg.Retention(keep_last=3))
>>> trainer = L.Trainer(max_steps=10_000, callbacks=[cb])
>>> trainer.fit(model, ckpt_path="last")   # or cb.last: None on a fresh run

and, in the module's (or datamodule's) ``train_dataloader``, for an exact mid-epoch resume::

    return resumable_loader(DataLoader(ds, batch_size=32, num_workers=2,
                                       sampler=cg.ResumableSampler(ds, shuffle=True, seed=0)))

What the callback does (a :class:`~ckptguard.CheckpointManager` underneath):

- After every optimizer step (never inside a gradient-accumulation window) it calls
  ``manager.save(global_step, ...)`` with the step's loss and logged metrics: the manager saves when
  due (``every_steps``, ``every_seconds``, ``every="auto"``), records ``metrics.csv`` at every step,
  applies retention, verifies on the probe batch when given. Lightning's checkpoint dict is
  produced only when a save happens (through ``trainer.save_checkpoint`` and the plugin).
- It installs the plugin (:class:`~ckptguard.integrations.lightning_io.CkptguardCheckpointIO`) as
  the strategy's ``checkpoint_io``: ``trainer.fit(ckpt_path=...)`` loads through ckptguard
  (newest valid checkpoint, fallback past corrupt ones, no pickle, RNG restored).
- SIGTERM/SIGUSR1/SIGINT (from the start of training) only raise a flag; the next step boundary
  saves synchronously and the process exits (``128 + signal``). Lightning's own SIGTERM handler
  is replaced for that time (it would stop at the end of the batch, accumulation window or not).
- ``loss_guard={...}``: a :class:`~ckptguard.LossGuard` checks each optimizer step's loss before it
  is saved; a trip rolls weights, optimizers, LR schedulers and RNG back to the newest good
  checkpoint, and the data goes on (the batches since then are skipped).
- ``ckpt_path="last"`` works: the callback is an ``OnExceptionCheckpoint`` whose ``ckpt_path`` is
  the run (nothing when the run has no checkpoint yet). It saves nothing on an exception (the
  state mid-step is not a resumable one); it waits for a pending async save.

Mid-epoch resume: Lightning 2.6 restores its loop counters mid-epoch but restarts a plain
DataLoader from the beginning of the epoch (it warns "your dataloader is not resumable").
:func:`resumable_loader` gives the loader ``state_dict``/``load_state_dict`` so Lightning records
its position with the loops: the batches the training step received (Lightning prefetches one
batch ahead; that one is not counted), ckptguard's DataLoader tracking for the base seed and for
randomness in workers (see ckptguard.capture.sampler).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import OnExceptionCheckpoint
from torch.utils.data import DataLoader

from ckptguard.capture.sampler import ResumableSampler, load_loader_state, loader_state, track_dataloader
from ckptguard.capture.state import TrainState
from ckptguard.errors import CheckpointError
from ckptguard.integrations.lightning_io import CkptguardCheckpointIO, LightningState
from ckptguard.manager.manager import CheckpointManager
from ckptguard.storage import Storage
from ckptguard.verification.health import LossGuard

__all__ = ["CkptguardCallback", "ResumableLoader", "resumable_loader"]

log = logging.getLogger(__name__)
CALLBACK_STATE_VERSION = 1


class ResumableLoader(DataLoader[Any]):
    """What :func:`resumable_loader` mixes into a DataLoader's class (not instantiated directly).

    ``state_dict()`` is the position the training step reached: the batches counted by
    :meth:`batch_trained` (the callback calls it once per training batch) since the iterator was
    created, not the ones Lightning's fetcher pulled ahead.
    """

    ckptguard_trained: int | None = None

    def __iter__(self) -> Any:
        it = super().__iter__()
        self.ckptguard_trained = 0
        return it

    def batch_trained(self) -> None:
        """One more batch of the live iterator went through a training step."""
        self.ckptguard_trained = (self.ckptguard_trained or 0) + 1

    def state_dict(self) -> dict[str, Any]:
        tracker = track_dataloader(self)
        fetched = tracker.consumed
        if tracker.active and self.ckptguard_trained is not None:
            tracker.consumed = min(fetched, self.ckptguard_trained)
        try:
            return {"ckptguard_loader": loader_state(tracker, self.generator)}
        finally:
            tracker.consumed = fetched

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("ckptguard_loader")
        if not isinstance(saved, dict):
            log.warning("DataLoader: the checkpoint holds no ckptguard position; the epoch restarts.")
            return
        load_loader_state(track_dataloader(self), self, saved, "the Lightning checkpoint (loops)")
        self.ckptguard_trained = None


def resumable_loader(loader: DataLoader[Any]) -> DataLoader[Any]:
    """Make ``loader`` resume mid-epoch exactly under Lightning; return it (same object).

    Its sampler must be :class:`ckptguard.ResumableSampler` (``UnsupportedStateError``
    otherwise); call it on a DataLoader no TrainState tracks yet. With DDP, give the sampler
    ``num_replicas``/``rank`` and set ``Trainer(use_distributed_sampler=False)``: Lightning would
    otherwise replace it.
    """
    if isinstance(loader, ResumableLoader):
        return loader
    cls = type(loader)
    loader.__class__ = type(f"Lightning{cls.__name__}", (ResumableLoader, cls), {})
    try:
        track_dataloader(loader)  # its iterator wraps ours: every torch iterator resets the count
    except CheckpointError:
        loader.__class__ = cls
        raise
    return loader


def resumable_loaders(loaders: Any) -> list[ResumableLoader]:
    """The :class:`ResumableLoader` objects in ``trainer.train_dataloader`` (one, or a list/tuple/dict)."""
    if isinstance(loaders, ResumableLoader):
        return [loaders]
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return [d for item in loaders for d in resumable_loaders(item)]
    return []


def step_metrics(outputs: Any, logged: Mapping[str, Any]) -> dict[str, float]:
    """The step's loss (``outputs``) and every scalar Lightning logged, as floats."""
    metrics: dict[str, float] = {}
    for key, value in logged.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            metrics[key] = float(value.detach().cpu())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[key] = float(value)
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if isinstance(loss, torch.Tensor) and loss.numel() == 1:
        metrics.setdefault("loss", float(loss.detach().cpu()))
    return {k: v for k, v in metrics.items() if not math.isnan(v) or k == "loss"}


def hparams_config(module: pl.LightningModule) -> dict[str, Any] | None:
    """The module's ``save_hyperparameters()`` as the run's config (``config.yaml``, hashed, diffed by doctor)."""
    hparams = dict(module.hparams)
    return hparams or None


class CkptguardCallback(OnExceptionCheckpoint):
    """Checkpoints of a Lightning run through a :class:`~ckptguard.CheckpointManager`.

    Args:
        directory: the run (local path or fsspec URL); ``ckptguard ls/verify/plot/doctor`` read it.
        preemption: catch SIGTERM/SIGUSR1/SIGINT during training (save at the next step boundary, exit).
        final_save: save the last step when training ends (when not saved already).
        loss_guard: options of a :class:`~ckptguard.LossGuard` (``{"window": 50, "z_threshold": 6}``):
            a non-finite or spiking loss at an optimizer step rolls the model, optimizers, LR
            schedulers and RNG back to the newest good checkpoint (``self.loss_guard`` holds it);
            the data goes on, skipping the batches since then.
        **manager_options: passed to ``CheckpointManager`` (``every_steps``, ``every_seconds``,
            ``every="auto"``, ``mtbf_seconds``, ``retention``, ``async_save``, ``probe``,
            ``storage_options``, ``incremental``...).
    """

    def __init__(
        self, directory: str | os.PathLike[str] | Storage, *, preemption: bool = True, final_save: bool = True,
        loss_guard: Mapping[str, Any] | None = None, **manager_options: Any,
    ) -> None:
        self.manager = CheckpointManager(directory, **manager_options)
        super().__init__(dirpath=self.manager.storage.url, filename="ckptguard")
        self.directory = directory
        self.preemption = preemption
        self.final_save = final_save
        self._options = manager_options
        self._guard_options = loss_guard
        self.io = CkptguardCheckpointIO(self.manager)
        self.loss_guard = LossGuard(self.manager, **loss_guard) if loss_guard is not None else None
        self._state: TrainState | None = None
        self._last_step: int | None = None
        self._metrics: dict[str, float] = {}
        self._guard = contextlib.ExitStack()
        self._open = True

    # ---- resume ------------------------------------------------------------------------------

    @property
    def last(self) -> str | None:
        """The run's location when it holds a committed checkpoint (``fit(ckpt_path=cb.last)``), else None."""
        return self.manager.storage.url if self.manager.latest() is not None else None

    @property
    def ckpt_path(self) -> str:  # what Lightning's ckpt_path="last" considers
        return self.last or ""

    # ---- hooks -------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._open:  # a second fit() with the same callback
            self.manager = CheckpointManager(self.directory, **self._options)
            self.io = CkptguardCheckpointIO(self.manager)
            if self._guard_options is not None:
                self.loss_guard = LossGuard(self.manager, **self._guard_options)
            self._open = True
        if trainer.strategy.checkpoint_io is not self.io:
            trainer.strategy.checkpoint_io = self.io
        self.io.module = pl_module

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.preemption:
            self._guard.enter_context(self.manager.preemption_guard())
        holder = LightningState(produce=lambda: self._dump(trainer))
        self._state = self.io.state(holder, config=hparams_config(pl_module))
        self._last_step = trainer.global_step

    def _dump(self, trainer: pl.Trainer) -> dict[str, Any]:
        holder = LightningState()
        with self.io.capturing(holder):
            trainer.save_checkpoint(self.manager.storage.url, weights_only=False)
        assert holder.checkpoint is not None
        return holder.checkpoint

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for loader in resumable_loaders(trainer.train_dataloader):
            loader.batch_trained()
        step = trainer.global_step
        if step == self._last_step or self._state is None:
            return  # inside a gradient-accumulation window: no optimizer step yet
        self._last_step = step
        self._metrics = step_metrics(outputs, trainer.callback_metrics)
        if self.loss_guard is not None and self.loss_guard.check(step, self._metrics.get("loss")):
            self._roll_back(trainer)  # before any save: a poisoned step is never checkpointed
            return
        self.manager.save(step, self._state, metrics=self._metrics)

    def _roll_back(self, trainer: pl.Trainer) -> None:
        """LossGuard tripped: weights, optimizers, LR schedulers and RNG go back to the newest good
        checkpoint; the data and Lightning's step counter go on (its loops cannot be rewound
        inside ``fit()``), so the batches since that checkpoint are skipped."""
        assert self.loss_guard is not None
        holder = LightningState(without_model=self.io.module is not None)
        # A sampler of no samples: LossGuard's skip has nothing to move; the live loader goes on by itself.
        state = TrainState(model=self.io.module, sampler=ResumableSampler(0), lightning=holder)
        restored = self.loss_guard.rollback(state)
        ckpt = holder.checkpoint or {}
        for opt, saved in zip(trainer.optimizers, ckpt.get("optimizer_states", [])):
            opt.load_state_dict(saved)
        for config, saved in zip(trainer.lr_scheduler_configs, ckpt.get("lr_schedulers", [])):
            config.scheduler.load_state_dict(saved)
        log.warning(
            "LossGuard: the model, optimizer and LR schedule are back at step %d; training goes on "
            "from the next batch (global_step %d: the batches since step %d are skipped).",
            restored, trainer.global_step, restored,
        )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            if self.final_save and self._state is not None and trainer.global_step > 0:
                metrics = self._metrics if self._last_step == trainer.global_step else None
                self.manager.save(trainer.global_step, self._state, metrics=metrics, force=True)
            self.manager.wait()
        finally:
            self._guard.close()
            self._state = None

    def on_exception(self, trainer: pl.Trainer, *_: Any, **__: Any) -> None:
        self._guard.close()
        self._state = None
        self._close(during_error=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._guard.close()
        self._close(during_error=False)

    def _close(self, *, during_error: bool) -> None:
        if not self._open:
            return
        self._open = False
        try:
            self.manager.close()
        except CheckpointError as e:
            if not during_error:
                raise
            log.error("While closing %s after an error: %s", self.manager.storage.url, e)

    # ---- the callback's own entry in Lightning's checkpoint -----------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"version": CALLBACK_STATE_VERSION, "run": self.manager.storage.url}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("run")
        if saved is not None and saved != self.manager.storage.url:
            log.info("The checkpoint was written by the run %s; this run writes %s.", saved, self.manager.storage.url)
