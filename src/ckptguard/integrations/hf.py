"""Hugging Face Trainer integration: every checkpoint the Trainer writes is a ckptguard commit.

>>> from ckptguard.integrations.hf import CkptguardTrainer
>>> trainer = CkptguardTrainer(model=model, args=args, train_dataset=ds)   # a transformers.Trainer
>>> trainer.train(resume_from_checkpoint=True)    # newest VALID checkpoint of args.output_dir

What changes against the plain Trainer (``transformers`` 5.x, extra ``ckptguard[hf]``):

- A save (``save_steps``, ``save_strategy``, a SIGTERM) writes ``OUTPUT_DIR/step-NNNNNNNNN/`` through
  :class:`ckptguard.CheckpointManager`: model and optimizer in safetensors, scheduler, scaler, RNG
  and the ``TrainerState`` (``trainer_state.json``'s content, callbacks' state included) in JSON,
  checksummed, committed by the manifest written last. No ``checkpoint-N/`` folder, no pickle.
- ``train(resume_from_checkpoint=True)`` restores the newest checkpoint whose bytes verify (a torn
  or corrupt one is skipped and marked, the next older one is used); a run with no checkpoint yet
  starts fresh (the plain Trainer raises). A path (``OUTPUT_DIR/step-N``) restores exactly that one.
  The Trainer's own loaders are never called on this path: nothing is unpickled.
- Mid-epoch resume goes through the Trainer's own skip (``accelerate.skip_first_batches``): for a
  map-style dataset it skips sampler indices, no batch is loaded again, and the RNG is restored
  where the Trainer restores it, so the resumed run is bit-identical to an uninterrupted one (CPU).
- ``save_total_limit`` becomes ``Retention(keep_last=save_total_limit)``, plus ``keep_best=1`` on
  ``metric_for_best_model``; pass ``retention=`` for any other policy. Retention runs after the
  new checkpoint is committed and never deletes the newest valid or the best one.
- SIGTERM / SIGUSR1 / SIGINT: the next optimizer step ends with a synchronous save, then the
  process exits (code 128 + signal). Do not combine with ``enable_jit_checkpoint``.

``CkptguardTrainerMixin`` does the same for a Trainer subclass of your own
(``class MyTrainer(CkptguardTrainerMixin, SFTTrainer)``). Single process (one GPU or CPU);
DeepSpeed, FSDP and multi-process runs are refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import torch

# transformers: the extra ``hf`` (pip install ckptguard[hf])
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState

from ckptguard.capture.rng import capture_rng, restore_rng
from ckptguard.capture.state import TrainState
from ckptguard.errors import UnsupportedStateError
from ckptguard.format.manifest import checkpoint_name
from ckptguard.integrations.hf_export import HF_CONFIG_KEY
from ckptguard.integrations.paths import checkpoint_step
from ckptguard.manager.manager import CheckpointManager
from ckptguard.policies.preemption import PreemptionGuard
from ckptguard.policies.retention import Retention
from ckptguard.storage import Storage

__all__ = ["CkptguardCallback", "CkptguardTrainer", "CkptguardTrainerMixin", "TRAINER_STATE_KEY", "default_retention", "first_batch"]

log = logging.getLogger(__name__)
TRAINER_STATE_KEY = "hf_trainer_state"  # extra[...] in state.json: the TrainerState as JSON
_TRAINER_STATE_FILE = "trainer_state.json"


def default_retention(args: TrainingArguments) -> Retention:
    """``save_total_limit`` / ``metric_for_best_model`` as a ckptguard Retention (keep all if unset)."""
    metric = args.metric_for_best_model
    if metric is not None and not metric.startswith("eval_"):
        metric = f"eval_{metric}"
    mode = "max" if args.greater_is_better else "min"
    return Retention(keep_last=args.save_total_limit, keep_best=1 if metric else 0, metric=metric, mode=mode)


class CkptguardCallback(TrainerCallback):
    """Turns a preemption signal into a save at the end of the current optimizer step.

    The mixin installs it; ``guard`` is set while ``train()`` runs. The save goes through the
    Trainer (``_save_checkpoint``), whose ckptguard save sees the signal, commits synchronously
    and exits the process.
    """

    def __init__(self) -> None:
        self.guard: PreemptionGuard | None = None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> TrainerControl:
        if self.guard is not None and self.guard.poll():
            control.should_save = True
        return control


def _inner_optimizer(opt: Any) -> Any:
    """The torch optimizer behind Accelerate's AcceleratedOptimizer (``.optimizer``)."""
    return getattr(opt, "optimizer", opt)


def _trainer_state_json(state: TrainerState) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(json.dumps(dataclasses.asdict(state), sort_keys=True))
    return data


def _model_config(model: Any) -> dict[str, Any] | None:
    """``model.config`` as JSON (what ``ckptguard export --format hf`` writes as config.json)."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_json_string"):
        return None
    data: dict[str, Any] = json.loads(config.to_json_string(use_diff=False))
    return data


def _latest_metrics(state: TrainerState) -> dict[str, float]:
    """The newest value of each number the Trainer logged (``loss``, ``learning_rate``...); an
    evaluation's (``eval_*``) only when it ran at this step, so that retention never ranks a
    checkpoint by an older checkpoint's evaluation."""
    out: dict[str, float] = {}
    for entry in state.log_history:
        for k, v in entry.items():
            fresh = not k.startswith("eval_") or entry.get("step") == state.global_step
            if fresh and isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch"):
                out[k] = float(v)
    return out


def first_batch(trainer: Any) -> dict[str, Any] | None:
    """The first ``per_device_train_batch_size`` rows of the training set, collated: the probe batch.

    None (no behavioural verification, logged) when the dataset has no length or the rows do not
    collate into tensors the model takes as keyword arguments.
    """
    ds = getattr(trainer, "train_dataset", None)
    try:
        n = min(len(ds), trainer.args.per_device_train_batch_size)  # type: ignore[arg-type]
        with torch.random.fork_rng(devices=[]):
            batch = trainer.data_collator([ds[i] for i in range(n)])  # type: ignore[index]
        if isinstance(batch, Mapping) and batch and all(isinstance(v, torch.Tensor) for v in batch.values()):
            return dict(batch)
    except Exception as e:  # noqa: BLE001 - no probe is a lesser evil than no training
        log.warning("No probe batch from the training set (%s: %s): checkpoints are checksummed, not verified by a forward pass.", type(e).__name__, e)
        return None
    log.warning("The first training rows do not collate into a dict of tensors: checkpoints are checksummed, not verified by a forward pass.")
    return None


class CkptguardTrainerMixin:
    """Mix into a ``transformers.Trainer`` (subclass) before it: ``class T(CkptguardTrainerMixin, Trainer)``.

    Extra keyword arguments: ``checkpoint_manager`` (a CheckpointManager of your own; default one
    on ``args.output_dir`` with :func:`default_retention`) or, for the default one, ``checkpoint_dir``
    (a path, URL or Storage instead of ``args.output_dir``), ``retention``,
    ``probe`` (``"auto"``: the first training batch, see :func:`first_batch`, so that every commit
    is loaded back and checked by a forward pass; None: no behavioural verification) and
    ``checkpoint_options`` (more CheckpointManager keyword arguments: ``async_save``,
    ``storage_options``...). The Trainer's private checkpoint methods it replaces
    (``_save_checkpoint``, ``_load_from_checkpoint``, ``_load_optimizer_and_scheduler``,
    ``_load_scaler``, ``_load_rng_state``, ``_load_best_model``) are those of transformers 5.x.
    """

    def __init__(
        self,
        *args: Any,
        checkpoint_manager: CheckpointManager | None = None,
        checkpoint_dir: str | os.PathLike[str] | Storage | None = None,
        retention: Retention | None = None,
        checkpoint_options: Mapping[str, Any] | None = None,
        probe: Any = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        targs: TrainingArguments = self.args  # type: ignore[attr-defined]
        _refuse_unsupported(self, targs)
        if checkpoint_manager is None:
            options = dict(checkpoint_options or {})
            options.setdefault("probe", first_batch(self) if probe == "auto" else probe)
            where: Any = checkpoint_dir if checkpoint_dir is not None else targs.output_dir
            checkpoint_manager = CheckpointManager(where, retention=retention or default_retention(targs), **options)
        self.checkpoint_manager = checkpoint_manager
        self.ckptguard_callback = CkptguardCallback()
        self.add_callback(self.ckptguard_callback)  # type: ignore[attr-defined]
        self._cg_step: int | None = None  # the step being resumed
        self._cg_rng: dict[str, Any] | None = None

    # ---- public entry -------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train`` with resume from a verified ckptguard checkpoint and a preemption guard."""
        mgr = self.checkpoint_manager
        scratch = None
        if resume_from_checkpoint:
            hint = "Pass resume_from_checkpoint=True for the newest valid checkpoint of args.output_dir"
            step = None if resume_from_checkpoint is True else checkpoint_step(str(resume_from_checkpoint), hint)
            holder: dict[str, Any] = {}
            found = mgr.restore(TrainState(model=self.model, extra=holder, capture_rng=False), step=step)  # type: ignore[attr-defined]
            if found is None:
                log.info("%s holds no checkpoint yet: training starts fresh.", mgr.storage.url)
                resume_from_checkpoint = None
            else:
                self._cg_step = found
                # The Trainer reads trainer_state.json from the folder it resumes from: give it one
                # holding the verified TrainerState (plain JSON), in a scratch folder.
                scratch = tempfile.mkdtemp(prefix="ckptguard-hf-resume-")
                with open(os.path.join(scratch, _TRAINER_STATE_FILE), "w", encoding="utf-8") as f:
                    json.dump(holder.get(TRAINER_STATE_KEY) or {}, f)
                resume_from_checkpoint = scratch
        try:
            with mgr.preemption_guard() as guard:
                self.ckptguard_callback.guard = guard
                return super().train(resume_from_checkpoint, *args, **kwargs)  # type: ignore[misc]
        finally:
            self.ckptguard_callback.guard = None
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            mgr.wait()

    def ckptguard_state(self) -> TrainState:
        """What one checkpoint holds: model, optimizer, scheduler, scaler, RNG, the TrainerState."""
        scaler = getattr(getattr(self, "accelerator", None), "scaler", None)
        opt = getattr(self, "optimizer", None)
        return TrainState(
            model=self.model,  # type: ignore[attr-defined]
            optimizer=_inner_optimizer(opt) if opt is not None else None,
            scheduler=getattr(self, "lr_scheduler", None),
            scaler=scaler,
            extra={TRAINER_STATE_KEY: _trainer_state_json(self.state), HF_CONFIG_KEY: _model_config(self.model)},  # type: ignore[attr-defined]
        )

    # ---- the Trainer's checkpoint methods, replaced ---------------------------------------------

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        state: TrainerState = self.state  # type: ignore[attr-defined]
        if getattr(self, "hp_search_backend", None) is None and trial is None:
            self.store_flos()  # type: ignore[attr-defined]
        if state.best_global_step:
            best = os.path.join(self.args.output_dir, checkpoint_name(state.best_global_step))  # type: ignore[attr-defined]
            state.best_model_checkpoint = best
        control = self.control  # type: ignore[attr-defined]
        saved: Any = state.stateful_callbacks  # as Trainer._save_checkpoint records them
        for cb in [*self.callback_handler.callbacks, control]:  # type: ignore[attr-defined]
            if isinstance(cb, ExportableState):
                name = cb.__class__.__name__
                if isinstance(saved.get(name), list):
                    saved[name].append(cb.state())
                else:
                    saved[name] = cb.state()
        self.checkpoint_manager.save(state.global_step, self.ckptguard_state(), metrics=_latest_metrics(state), force=True)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """The model was restored (verified) by ``train()``: nothing to read here."""

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or self._cg_step is None:
            return
        self.checkpoint_manager.restore(self.ckptguard_state_for_restore(), step=self._cg_step)
        self._cg_rng = capture_rng()  # the checkpoint's RNG, applied where the Trainer applies it
        self._cg_step = None

    def ckptguard_state_for_restore(self) -> TrainState:
        """As :meth:`ckptguard_state`, with a throwaway ``extra`` (the TrainerState is restored by the Trainer)."""
        ts = self.ckptguard_state()
        ts.extra = {}
        return ts

    def _load_scaler(self, checkpoint: str | None) -> None:
        """Restored with the optimizer (``_load_optimizer_and_scheduler``)."""

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is not None and self._cg_rng is not None:
            restore_rng(self._cg_rng)

    def _load_best_model(self) -> None:
        best = self.state.best_global_step  # type: ignore[attr-defined]
        if best:
            self.checkpoint_manager.restore(TrainState(model=self.model, capture_rng=False), step=best)  # type: ignore[attr-defined]


def _refuse_unsupported(trainer: Any, args: TrainingArguments) -> None:
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False) or args.world_size > 1:
        raise UnsupportedStateError(
            f"{args.output_dir}: CkptguardTrainer supports single-process training only (no DeepSpeed, "
            "FSDP or multi-process runs yet). Use the plain Trainer for those, or a ckptguard loop with "
            "CheckpointManager."
        )
    if getattr(args, "enable_jit_checkpoint", False):
        raise UnsupportedStateError(
            f"{args.output_dir}: enable_jit_checkpoint=True installs the Trainer's own SIGTERM checkpoint; "
            "CkptguardTrainer already saves at the next step on SIGTERM. Drop enable_jit_checkpoint."
        )


class CkptguardTrainer(CkptguardTrainerMixin, Trainer):
    """``transformers.Trainer`` whose checkpoints are ckptguard commits (see the module docstring)."""
