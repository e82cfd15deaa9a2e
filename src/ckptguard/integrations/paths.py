"""What the framework integrations share: a checkpoint folder given by path, to its step."""

from __future__ import annotations

import os

from ckptguard.errors import CheckpointError
from ckptguard.run.catalog import read_manifest
from ckptguard.storage import open_storage

__all__ = ["checkpoint_step"]


def checkpoint_step(path: str, newest_hint: str) -> int:
    """The step of the ckptguard checkpoint at ``path`` (``RUN/step-NNNNNNNNN``; its run is the parent).

    Raises CheckpointError when ``path`` is no committed ckptguard checkpoint (a framework's own
    ``checkpoint-N`` folder included: its pickles are never read); ``newest_hint`` says how to
    ask for the newest valid checkpoint instead.
    """
    parent, name = os.path.split(os.path.normpath(path))
    try:
        manifest = read_manifest(open_storage(parent or "."), name)
    except CheckpointError as e:
        raise CheckpointError(
            f"{path} is not a ckptguard checkpoint (no valid MANIFEST.json): {e}. {newest_hint}, or pass a "
            "step-NNNNNNNNN folder that 'ckptguard ls' lists."
        ) from e
    return int(manifest["step"])
