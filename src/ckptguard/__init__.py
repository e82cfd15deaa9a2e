"""ckptguard: checkpoints that survive failure and stay trustworthy over months.

Public API (see README.md)::

    import ckptguard as cg
    state = cg.TrainState(model=model, optimizer=opt, scheduler=sched, dataloader=loader)
    mgr = cg.CheckpointManager("runs/exp1", every_steps=500, retention=cg.Retention(keep_last=3))
    step = mgr.restore(state)

The top level holds what DESIGN.md names (``TrainState``, ``ResumableSampler``,
``CheckpointManager``, ``Retention``, ``verify``, ``CheckpointError``), the two other classes the
README's code uses (``LossGuard``, ``LockPolicy``, ``Tiers``) and the errors the README says a training loop
meets. Everything else lives in its subpackage, for example:

- ``ckptguard.errors``: every error class (``InvalidStepError``,
  ``TrainingDivergedError``...);
- ``ckptguard.policies.retention``: ``KeepLast``, ``KeepBest``, ``KeepEvery``, ``KeepPhased``,
  ``KeepBeforeConfigChange``; ``ckptguard.policies.schedule``: the save-interval formula;
- ``ckptguard.capture.state``: ``Stateful``; ``ckptguard.run.catalog``: ``CheckpointInfo``,
  ``scan``; ``ckptguard.verification.verify``: ``VerifyReport``;
- ``ckptguard.storage``: ``LocalStorage``, ``FsspecStorage``, ``open_storage``;
  ``ckptguard.testing``: ``FaultyStorage`` (fault injection for tests).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ckptguard.version import __version__

# Public name -> the module that defines it. Imported on first use (PEP 562), so that commands
# that only read metadata (``ckptguard ls``, ``verify``...) start without importing torch.
_LAZY: dict[str, str] = {
    "CheckpointManager": "ckptguard.manager.manager",
    "LockPolicy": "ckptguard.run.lock",
    "LossGuard": "ckptguard.verification.health",
    "ResumableSampler": "ckptguard.capture.sampler",
    "Retention": "ckptguard.policies.retention",
    "TrainState": "ckptguard.capture.state",
    "Tiers": "ckptguard.tiers.options",
    "verify": "ckptguard.verification.verify",
    # errors (all of them: ckptguard.errors)
    "AsyncSaveError": "ckptguard.errors",
    "CheckpointError": "ckptguard.errors",
    "CheckpointNotFoundError": "ckptguard.errors",
    "CorruptCheckpointError": "ckptguard.errors",
    "DatasetChangedError": "ckptguard.errors",
    "DiskFullError": "ckptguard.errors",
    "FormatVersionError": "ckptguard.errors",
    "NoValidCheckpointError": "ckptguard.errors",
    "RunLockedError": "ckptguard.errors",
    "RunLockLostError": "ckptguard.errors",
    "StateMismatchError": "ckptguard.errors",
    "StorageError": "ckptguard.errors",
    "StorageUnavailableError": "ckptguard.errors",
    "CommitUnknownError": "ckptguard.errors",
    "StoragePermissionError": "ckptguard.errors",
    "UnsafeCheckpointError": "ckptguard.errors",
    "UnsupportedStateError": "ckptguard.errors",
}

if TYPE_CHECKING:  # type checkers and IDEs see the names eagerly
    from ckptguard.capture.sampler import ResumableSampler
    from ckptguard.capture.state import TrainState
    from ckptguard.errors import (
        AsyncSaveError,
        CheckpointError,
        CheckpointNotFoundError,
        CommitUnknownError,
        CorruptCheckpointError,
        DatasetChangedError,
        DiskFullError,
        FormatVersionError,
        NoValidCheckpointError,
        RunLockedError,
        RunLockLostError,
        StateMismatchError,
        StorageError,
        StoragePermissionError,
        StorageUnavailableError,
        UnsafeCheckpointError,
        UnsupportedStateError,
    )
    from ckptguard.manager.manager import CheckpointManager
    from ckptguard.policies.retention import Retention
    from ckptguard.run.lock import LockPolicy
    from ckptguard.tiers.options import Tiers
    from ckptguard.verification.health import LossGuard
    from ckptguard.verification.verify import verify


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
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "DatasetChangedError",
    "DiskFullError",
    "FormatVersionError",
    "LockPolicy",
    "LossGuard",
    "NoValidCheckpointError",
    "ResumableSampler",
    "Retention",
    "RunLockLostError",
    "RunLockedError",
    "StateMismatchError",
    "StorageError",
    "StorageUnavailableError",
    "CommitUnknownError",
    "StoragePermissionError",
    "Tiers",
    "TrainState",
    "UnsafeCheckpointError",
    "UnsupportedStateError",
    "__version__",
    "verify",
]
