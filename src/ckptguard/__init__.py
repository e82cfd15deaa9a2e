"""ckptguard: checkpoints that survive failure and stay trustworthy over months.

Public API (see README.md)::

    import ckptguard as cg
    state = cg.TrainState(model=model, optimizer=opt, scheduler=sched, dataloader=loader)
    mgr = cg.CheckpointManager("runs/exp1", every_steps=500, retention=cg.Retention(keep_last=3))
    step = mgr.restore(state)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ckptguard.version import __version__

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
    "CheckpointInfo": "ckptguard.run.catalog",
    "LossGuard": "ckptguard.verification.health",
    "LockPolicy": "ckptguard.run.lock",
    "CheckpointManager": "ckptguard.manager.manager",
    "KeepBeforeConfigChange": "ckptguard.policies.retention",
    "KeepBest": "ckptguard.policies.retention",
    "KeepEvery": "ckptguard.policies.retention",
    "KeepLast": "ckptguard.policies.retention",
    "KeepPhased": "ckptguard.policies.retention",
    "Retention": "ckptguard.policies.retention",
    "ResumableSampler": "ckptguard.capture.sampler",
    "Stateful": "ckptguard.capture.state",
    "TrainState": "ckptguard.capture.state",
    "VerifyReport": "ckptguard.verification.verify",
    "verify": "ckptguard.verification.verify",
}

if TYPE_CHECKING:  # type checkers and IDEs see the names eagerly
    from ckptguard.capture.sampler import ResumableSampler
    from ckptguard.capture.state import Stateful, TrainState
    from ckptguard.errors import (
        AsyncSaveError,
        CheckpointError,
        CheckpointNotFoundError,
        CorruptCheckpointError,
        DiskFullError,
        FormatVersionError,
        InvalidStepError,
        NoValidCheckpointError,
        RunLockedError,
        RunLockLostError,
        StateMismatchError,
        StorageError,
        StoragePermissionError,
        TrainingDivergedError,
        UnsafeCheckpointError,
        UnsupportedStateError,
    )
    from ckptguard.manager.manager import CheckpointManager
    from ckptguard.policies.retention import KeepBeforeConfigChange, KeepBest, KeepEvery, KeepLast, KeepPhased, Retention
    from ckptguard.run.catalog import CheckpointInfo
    from ckptguard.run.lock import LockPolicy
    from ckptguard.verification.health import LossGuard
    from ckptguard.verification.verify import VerifyReport, verify



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
