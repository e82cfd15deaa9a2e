"""Where checkpoints live: local directories and fsspec URLs behind one small interface.

Public entry points, by module; the other names in each module's ``__all__`` serve
ckptguard's own modules and may change:

- ``base`` (the seam a backend implements and how it is called): ``Storage``, ``Writer``,
  ``translate_os_error``
- ``local`` (local filesystems): ``LocalStorage``
- ``fsspec_store`` (object stores and other fsspec filesystems): ``FsspecStorage``
- ``retry`` (transient errors retried with backoff): ``RetryPolicy``
- ``transfer`` (object stores' uploads streamed from memory, ranged reads): ``upload_streamed``, ``RangedReader``

``open_storage`` (in this package) turns a path, URL or Storage into a Storage.
"""

from __future__ import annotations

import os
from typing import Any

from ckptguard.storage.base import Storage, Writer, join, translate_os_error
from ckptguard.storage.fsspec_store import FsspecStorage
from ckptguard.storage.local import LocalStorage

__all__ = [
    "FsspecStorage",
    "LocalStorage",
    "Storage",
    "Writer",
    "join",
    "open_storage",
    "translate_os_error",
]


def open_storage(
    location: str | os.PathLike[str] | Storage, storage_options: dict[str, Any] | None = None
) -> Storage:
    """Return the storage for a local path, a ``file://`` URL, any fsspec URL, or a Storage."""
    if isinstance(location, (LocalStorage, FsspecStorage)) or (
        not isinstance(location, (str, os.PathLike)) and isinstance(location, Storage)
    ):
        return location
    text = os.fspath(location)
    if text.startswith("file://"):
        return LocalStorage(text[len("file://") :])
    if "://" in text:
        return FsspecStorage(text, storage_options)
    return LocalStorage(text)
