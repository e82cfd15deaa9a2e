"""The one error hierarchy of ckptguard.

Every error the library raises on purpose derives from :class:`CheckpointError`. Subclasses also
inherit the matching builtin where one exists, so ``except FileNotFoundError`` keeps working.
Messages carry the path, what was expected and what was found, and the next step to take.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "NoValidCheckpointError",
    "UnsafeCheckpointError",
    "FormatVersionError",
    "StateMismatchError",
    "UnsupportedStateError",
    "StorageError",
    "DiskFullError",
    "StoragePermissionError",
    "StorageUnavailableError",
    "CommitUnknownError",
    "RunLockedError",
    "RunLockLostError",
    "AsyncSaveError",
    "TrainingDivergedError",
    "InvalidStepError",
    "ManifestFieldError",
    "PostCommitError",
]


class CheckpointError(Exception):
    """Base of every error ckptguard raises on purpose."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A run, a checkpoint or a file inside one does not exist."""


class CorruptCheckpointError(CheckpointError):
    """Stored bytes do not match what the manifest recorded (bit rot, truncation, torn write)."""

    def __init__(self, message: str, *, path: str = "", file: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.file = file


class NoValidCheckpointError(CorruptCheckpointError):
    """A run has committed checkpoints but none can be restored (each is corrupt, marked or gone).

    ``failures`` lists ``(checkpoint path, why)`` for every checkpoint that was considered.
    A subclass of :class:`CorruptCheckpointError`, so ``except CorruptCheckpointError`` still
    catches it.
    """

    def __init__(self, message: str, *, path: str = "", failures: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message, path=path)
        self.failures = failures


class UnsafeCheckpointError(CorruptCheckpointError):
    """A checkpoint tries to escape its directory or carries a hostile header: refused."""


class FormatVersionError(CheckpointError):
    """A checkpoint was written by a newer (or unknown) format version."""


class StateMismatchError(CheckpointError, KeyError):
    """The checkpoint does not fit the objects being restored (keys, shapes, dtypes, groups)."""

    def __init__(self, message: str, report: object = None) -> None:
        super().__init__(message)
        self.report = report

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class DatasetChangedError(StateMismatchError):
    """The dataset a checkpoint's data position counts over is not today's (length, content or
    ``dataset_version`` differ; see ckptguard.capture.data_identity). A mismatch, never damage:
    nothing is marked and restore does not fall back. ``saved`` and ``now``: the two identities."""

    def __init__(self, message: str, saved: object, now: object) -> None:
        super().__init__(message)
        self.saved = saved
        self.now = now


class UnsupportedStateError(CheckpointError, TypeError):
    """A state holds something that cannot be stored without pickle (a lambda, an open file...)."""


class StorageError(CheckpointError, OSError):
    """The storage underneath failed (I/O error, missing directory, read-only filesystem)."""


class DiskFullError(StorageError):
    """No space left on the device (ENOSPC) or quota exceeded (EDQUOT)."""


class StoragePermissionError(StorageError, PermissionError):
    """The process may not read or write a path it needs."""


class StorageUnavailableError(StorageError):
    """A transient storage failure outlasted the retries (connection refused or reset, a response
    cut mid-transfer, a timeout, throttling). Nothing was damaged; saving or reading later may
    succeed. ``url`` names the object or run, ``attempts`` the tries made."""

    def __init__(self, message: str, *, url: str = "", attempts: int = 0) -> None:
        super().__init__(message)
        self.url = url
        self.attempts = attempts


class CommitUnknownError(StorageUnavailableError):
    """A checkpoint's manifest was sent but neither its arrival nor its absence could be
    confirmed. The checkpoint is whole if the manifest is there; ``ckptguard ls`` tells."""


class RunLockedError(CheckpointError):
    """Another live process is writing to the same run directory."""


class RunLockLostError(RunLockedError):
    """Another writer took the run over while this one held it; the save stopped before its commit."""


class AsyncSaveError(CheckpointError):
    """A background save failed; raised on the next save(), wait() or close()."""


class TrainingDivergedError(CheckpointError):
    """Loss or gradients went non-finite or spiked more often than the retry limit allows."""


class InvalidStepError(CheckpointError, ValueError):
    """A step number that cannot name a checkpoint (negative, fractional, not a number)."""


class ManifestFieldError(CheckpointError, ValueError):
    """A manifest field provider (``add_manifest_fields``) failed, returned a key the manifest
    itself uses, or a value that is not JSON. Raised by the save; nothing was committed."""


class PostCommitError(CheckpointError):
    """A checkpoint was committed, then what runs after its commit failed (a post-commit hook,
    retention). The checkpoint is intact and restorable; ``step`` names it. Raised by the save
    that committed it, or (async saves) by the next save (after it saved its own step),
    ``wait()`` or ``close()``; in a distributed run on every rank."""

    def __init__(self, message: str, *, step: int) -> None:
        super().__init__(message)
        self.step = step
