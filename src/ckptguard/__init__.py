"""ckptguard: checkpoints that survive failure and stay trustworthy over months.

Public API (see README.md)::

    import ckptguard as cg
    state = cg.TrainState(model=model, optimizer=opt, scheduler=sched, dataloader=loader)
    mgr = cg.CheckpointManager("runs/exp1", every_steps=500, retention=cg.Retention(keep_last=3))
    step = mgr.restore(state)
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING, Any

# Public name -> the module that defines it. Imported on first use (PEP 562), so that commands
# that only read metadata (``ckptguard ls``, ``verify``...) start without importing torch.
_LAZY: dict[str, str] = {
    "AsyncSaveError": "ckptguard.errors",
    "CheckpointError": "ckptguard.errors",
    "CheckpointNotFoundError": "ckptguard.errors",
    "CorruptCheckpointError": "ckptguard.errors",
    "DiskFullError": "ckptguard.errors",
    "FormatVersionError": "ckptguard.errors",
    "InvalidStepError": "ckptguard.errors",
    "NoValidCheckpointError": "ckptguard.errors",
    "RunLockedError": "ckptguard.errors",
    "RunLockLostError": "ckptguard.errors",
    "StateMismatchError": "ckptguard.errors",
    "StorageError": "ckptguard.errors",
    "StoragePermissionError": "ckptguard.errors",
    "TrainingDivergedError": "ckptguard.errors",
    "UnsafeCheckpointError": "ckptguard.errors",
    "UnsupportedStateError": "ckptguard.errors",
    "CheckpointInfo": "ckptguard.catalog",
    "LossGuard": "ckptguard.health",
    "LockPolicy": "ckptguard.lock",
    "CheckpointManager": "ckptguard.manager",
    "KeepBeforeConfigChange": "ckptguard.retention",
    "KeepBest": "ckptguard.retention",
    "KeepEvery": "ckptguard.retention",
    "KeepLast": "ckptguard.retention",
    "KeepPhased": "ckptguard.retention",
    "Retention": "ckptguard.retention",
    "ResumableSampler": "ckptguard.sampler",
    "Stateful": "ckptguard.state",
    "TrainState": "ckptguard.state",
}

if TYPE_CHECKING:  # type checkers and IDEs see the names eagerly
    from ckptguard.catalog import CheckpointInfo
    from ckptguard.errors import (
        AsyncSaveError,
        CheckpointError,
        CheckpointNotFoundError,
        CorruptCheckpointError,
        DiskFullError,
        FormatVersionError,
        InvalidStepError,
        NoValidCheckpointError,
        RunLockLostError,
        RunLockedError,
        StateMismatchError,
        StorageError,
        StoragePermissionError,
        TrainingDivergedError,
        UnsafeCheckpointError,
        UnsupportedStateError,
    )
    from ckptguard.health import LossGuard
    from ckptguard.lock import LockPolicy
    from ckptguard.manager import CheckpointManager
    from ckptguard.retention import KeepBeforeConfigChange, KeepBest, KeepEvery, KeepLast, KeepPhased, Retention
    from ckptguard.sampler import ResumableSampler
    from ckptguard.state import Stateful, TrainState

# Imported eagerly: ``ckptguard.verify`` is also a submodule, and importing a submodule binds its
# name on the package; binding the function here first keeps ``ckptguard.verify(...)`` callable.
# (verify needs no torch.)
from ckptguard.verify import VerifyReport, verify  # noqa: E402


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ckptguard' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "AsyncSaveError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "DiskFullError",
    "FormatVersionError",
    "InvalidStepError",
    "KeepBeforeConfigChange",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "KeepPhased",
    "LockPolicy",
    "LossGuard",
    "NoValidCheckpointError",
    "ResumableSampler",
    "Retention",
    "RunLockedError",
    "RunLockLostError",
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
