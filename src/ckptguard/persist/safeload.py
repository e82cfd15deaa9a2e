"""Loading a checkpoint that may be damaged or hostile: integrity checks around ``restore_state``.

``load_verified`` checks every tensor file's header against the manifest before any shape in
the manifest is compared with the live model, restores, then verifies the files restore did not
read (``config.yaml``...). Contents that pass their checksums yet make ckptguard's own decoding
fail (a hostile or malformed ``state.json``) become a :class:`CorruptCheckpointError`, so
``restore`` falls back. An exception from a ``load_state_dict`` (the user's code, or torch's
after a code change) is no evidence of damage: ``restore_state`` raises it as a
:class:`StateMismatchError`, which passes through unchanged and marks nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ckptguard.capture.state import TrainState, restore_state
from ckptguard.errors import CheckpointError, CorruptCheckpointError, FormatVersionError
from ckptguard.persist.reader import CheckpointReader
from ckptguard.run.catalog import read_manifest
from ckptguard.storage import Storage

__all__ = ["load_verified", "raise_if_newer_format"]


def raise_if_newer_format(storage: Storage, name: str) -> None:
    """A newer checkpoint than any we can read: upgrading beats silently resuming older state."""
    try:
        read_manifest(storage, name)
    except FormatVersionError:
        raise
    except CheckpointError:
        return


# What hostile-but-checksummed state.json contents make plain Python code raise.
_MALFORMED_STATE = (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError, OverflowError)


def load_verified(
    state: TrainState,
    reader: CheckpointReader,
    *,
    verify: bool,
    strict: bool,
    restore: Callable[..., Any] = restore_state,
) -> Any:
    """``restore`` (restore_state, or the distributed one) with integrity checks around it.

    Malformed contents become corruption. Returns the restore's mismatch report.
    """
    if verify:
        reader.check_headers()  # before the manifest's shapes are compared with the model
    try:
        report = restore(state, _VerifyingReader(reader, verify), strict=strict)
    except CheckpointError:
        raise
    except _MALFORMED_STATE as e:
        raise CorruptCheckpointError(
            f"{reader.where}/state.json does not describe a state ckptguard can load "
            f"({type(e).__name__}: {e}). The checkpoint is damaged or hostile; restore skips it.",
            path=reader.where,
            file="state.json",
        ) from e
    if verify:
        reader.verify_unread()  # files restore did not need (config.yaml...) too
    return report


class _VerifyingReader:
    """Passes the manager's verify_on_restore choice to tensor reads."""

    def __init__(self, inner: CheckpointReader, verify: bool) -> None:
        self._inner = inner
        self._verify = verify

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def tensors(self, fname: str, **kw: Any) -> dict[str, torch.Tensor]:
        kw.setdefault("verify", self._verify)
        return self._inner.tensors(fname, **kw)
