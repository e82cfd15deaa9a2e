"""Lightning's checkpoint dict stored as a ckptguard commit: the ``CheckpointIO`` side.

Lightning builds one dict per checkpoint (``epoch``, ``global_step``, ``state_dict``, ``loops``,
``callbacks``, ``optimizer_states``, ``lr_schedulers``, ``hyper_parameters``...) and hands it to
its ``CheckpointIO`` plugin; on resume it asks the plugin for the dict back. Here that dict goes
through a :class:`~ckptguard.CheckpointManager`:

- the model's weights go to ``model.safetensors`` (the live ``LightningModule`` is restored in
  place, with ckptguard's key/shape checks), every other tensor (optimizer state...) to
  ``extra.safetensors``, the rest of the dict to ``state.json`` as versioned JSON
  (:data:`LIGHTNING_FORMAT`; :mod:`ckptguard.format.codec`: tuples, int keys and nan survive);
- the manifest is written last with every checksum, so a kill never leaves a torn checkpoint;
- the RNG of python, numpy and torch is captured with it (Lightning saves none) and put back when
  the checkpoint is loaded;
- loading reads only safetensors and JSON: nothing is unpickled, whatever the folder holds.

``load_checkpoint(path)`` takes a run directory or URL (the newest *valid* checkpoint: a corrupt
one is reported, marked and skipped) or one ``step-NNNNNNNNN`` directory of a run (exactly that
one). The plugin is made by :class:`ckptguard.integrations.lightning.CkptguardCallback`, which
also tells it the live module; see that module for the user-facing side.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO

from ckptguard.capture.state import TrainState
from ckptguard.errors import CheckpointNotFoundError, CorruptCheckpointError, FormatVersionError, UnsafeCheckpointError
from ckptguard.format.manifest import parse_step
from ckptguard.manager.manager import CheckpointManager
from ckptguard.storage import open_storage

__all__ = ["LIGHTNING_FORMAT", "CkptguardCheckpointIO", "LightningState", "split_checkpoint_path"]

log = logging.getLogger(__name__)

LIGHTNING_FORMAT = 1  # version of the {"lightning_format", "checkpoint"} object in state.json
MODEL_KEY = "state_dict"  # Lightning's key for the module's weights


class LightningState:
    """Lightning's checkpoint dict as a ``Stateful`` for :class:`~ckptguard.TrainState`.

    ``state_dict()`` returns the dict (from ``produce()`` when given, else the one held), minus
    the module's weights when ``without_model`` (they go to ``model.safetensors`` then);
    ``load_state_dict()`` checks the format version and keeps the dict in :attr:`checkpoint`.
    """

    def __init__(
        self,
        checkpoint: dict[str, Any] | None = None,
        *,
        produce: Callable[[], dict[str, Any]] | None = None,
        without_model: bool = True,
    ) -> None:
        self.checkpoint = checkpoint
        self.produce = produce
        self.without_model = without_model

    def state_dict(self) -> dict[str, Any]:
        ckpt = self.produce() if self.produce is not None else self.checkpoint
        if ckpt is None:
            raise RuntimeError("LightningState holds no checkpoint dict to save")
        if self.without_model:
            ckpt = {k: v for k, v in ckpt.items() if k != MODEL_KEY}
        return {"lightning_format": LIGHTNING_FORMAT, "checkpoint": ckpt}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("lightning_format")
        if not isinstance(version, int) or not isinstance(state_dict.get("checkpoint"), dict):
            raise CorruptCheckpointError(
                "state.json: the Lightning checkpoint object is malformed (no 'lightning_format' "
                "or 'checkpoint'). The checkpoint is damaged; restore falls back to an older one."
            )
        if version > LIGHTNING_FORMAT:
            raise FormatVersionError(
                f"state.json: the Lightning checkpoint has lightning_format {version}; this ckptguard "
                f"reads up to {LIGHTNING_FORMAT}. Upgrade ckptguard (pip install -U ckptguard[lightning])."
            )
        self.checkpoint = dict(state_dict["checkpoint"])


def split_checkpoint_path(path: str | os.PathLike[str]) -> tuple[str, int | None]:
    """``RUN`` -> (RUN, None); ``RUN/step-000000120`` -> (RUN, 120). Local paths become absolute."""
    text = os.fspath(path).rstrip("/")
    if "://" not in text:
        text = os.path.abspath(text)
    parent, _, base = text.rpartition("/")
    step = parse_step(base)
    if step is not None and parent:
        return parent, step
    return text, None


class CkptguardCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` whose saves are commits of ``manager``'s run.

    ``save_checkpoint(checkpoint, path)`` saves ``checkpoint`` at its ``global_step`` into the
    manager's run whatever ``path`` says (forced: the caller decided); ``load_checkpoint(path)``
    restores (see the module docstring); ``remove_checkpoint`` does nothing (retention is the
    manager's). ``module``: the live LightningModule (set by the callback) that the weights are
    restored into; without it the weights travel inside ``extra.safetensors``.
    """

    def __init__(self, manager: CheckpointManager) -> None:
        self.manager = manager
        self.module: torch.nn.Module | None = None
        self._capture: LightningState | None = None

    def state(self, holder: LightningState, config: Any = None) -> TrainState:
        """The TrainState a save or restore of ``holder`` goes through (``config``: the run's hparams)."""
        holder.without_model = self.module is not None
        return TrainState(model=self.module, config=config, lightning=holder)

    @contextlib.contextmanager
    def capturing(self, holder: LightningState) -> Iterator[None]:
        """Within the block, ``save_checkpoint`` hands the dict to ``holder`` instead of saving."""
        previous, self._capture = self._capture, holder
        try:
            yield
        finally:
            self._capture = previous

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if self._capture is not None:
            self._capture.checkpoint = checkpoint
            return
        step = int(checkpoint.get("global_step", 0))
        log.debug("Lightning saves %s: step %d of %s", path, step, self.manager.storage.url)
        self.manager.save(step, self.state(LightningState(checkpoint)), force=True)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        """The Lightning dict of the newest valid checkpoint of the run ``path`` (or of ``RUN/step-N``).

        The weights are restored into :attr:`module` in place (on its device: ``map_location`` is
        not needed), the RNG is restored, and the manager adopts the run's lineage.
        """
        run, step = split_checkpoint_path(path)
        if "://" not in run and os.path.isfile(run):
            raise UnsafeCheckpointError(
                f"{run} is a file, not a ckptguard run: a Lightning .ckpt is a pickle, which ckptguard "
                "never loads (it can run code). Pass the run directory CkptguardCallback writes."
            )
        own = open_storage(run).url == self.manager.storage.url
        manager = self.manager if own else CheckpointManager(run)
        holder = LightningState()
        try:
            restored = manager.restore(self.state(holder), step=step)
        finally:
            if not own:
                manager.close()
        if restored is None or holder.checkpoint is None:
            raise CheckpointNotFoundError(
                f"{run}: no committed ckptguard checkpoint to resume from. Start without ckpt_path "
                "(ckpt_path=callback.last is None on a fresh run), or give a run directory that "
                "CkptguardCallback wrote."
            )
        ckpt = dict(holder.checkpoint)
        if self.module is not None:
            ckpt[MODEL_KEY] = self.module.state_dict()  # restored in place above; Lightning loads it again
        elif MODEL_KEY not in ckpt:
            raise CheckpointNotFoundError(
                f"{run}: the weights are in model.safetensors and no LightningModule is attached to "
                "load them into. Add CkptguardCallback to the Trainer's callbacks."
            )
        log.info("Lightning resumes from %s/step-%09d.", manager.storage.url, restored)
        return ckpt

    def remove_checkpoint(self, path: Any) -> None:
        log.debug("Lightning asked to remove %s: retention is ckptguard's; nothing removed.", path)
