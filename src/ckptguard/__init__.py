"""ckptguard: checkpoints that survive failure and stay trustworthy over months.

Public API (see README.md)::

    import ckptguard as cg
    state = cg.TrainState(model=model, optimizer=opt, scheduler=sched, dataloader=loader)
    mgr = cg.CheckpointManager("runs/exp1", every_steps=500, retention=cg.Retention(keep_last=3))
    step = mgr.restore(state)
"""

from __future__ import annotations

__version__ = "0.1.0"

from ckptguard.catalog import CheckpointInfo
from ckptguard.errors import (
    AsyncSaveError,
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DiskFullError,
    FormatVersionError,
    NoValidCheckpointError,
    RunLockedError,
    StateMismatchError,
    StorageError,
    StoragePermissionError,
    TrainingDivergedError,
    UnsafeCheckpointError,
    UnsupportedStateError,
)
from ckptguard.health import LossGuard
from ckptguard.manager import CheckpointManager
from ckptguard.retention import KeepBeforeConfigChange, KeepBest, KeepEvery, KeepLast, KeepPhased, Retention
from ckptguard.sampler import ResumableSampler
from ckptguard.state import Stateful, TrainState
from ckptguard.verify import VerifyReport, verify

__all__ = [
    "AsyncSaveError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "DiskFullError",
    "FormatVersionError",
    "KeepBeforeConfigChange",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "KeepPhased",
    "LossGuard",
    "NoValidCheckpointError",
    "ResumableSampler",
    "Retention",
    "RunLockedError",
    "StateMismatchError",
    "Stateful",
    "StorageError",
    "StoragePermissionError",
    "TrainState",
    "TrainingDivergedError",
    "UnsafeCheckpointError",
    "UnsupportedStateError",
    "VerifyReport",
    "__version__",
    "verify",
]
