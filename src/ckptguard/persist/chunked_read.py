"""Reading the ``chunked`` tensor files of incremental checkpoints (see :mod:`ckptguard.persist.incremental`).

Chunks are read from their packs straight into the target tensors and each one is hashed
against its digest. A missing, resized or truncated pack, or a chunk whose bytes changed, raises
:class:`~ckptguard.errors.CorruptCheckpointError` naming the checkpoint, the tensor and the pack,
and is first recorded in the run (:func:`ckptguard.run.trust.record_distrust`) so that no later save
references it again, even after every checkpoint that failed was pruned.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO

from ckptguard.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError, StorageError, StorageUnavailableError
from ckptguard.format.tensorfile import destination, digest_bytes, dtype_tables, tensor_view
from ckptguard.run.trust import pack_path, read_full, record_distrust
from ckptguard.storage.base import Storage

if TYPE_CHECKING:  # tensors arrive from callers; verifying imports no torch
    import torch

__all__ = ["read_chunked", "verify_chunked"]


def _corrupt(
    ckpt_where: str, fname: str, tname: str, obj: str, what: str, *, record: tuple[Storage, str, int | None, str | None] | None = None
) -> CorruptCheckpointError:
    """The error for a damaged shared chunk; ``record``: (storage, pack, offset or None for the
    whole pack, digest) to remember durably, so that no later save references it again."""
    if record is not None:
        storage, pack, offset, digest = record
        record_distrust(storage, pack, offset, digest=digest, reason=f"{ckpt_where}: {fname}: {what}")
    return CorruptCheckpointError(
        f"{ckpt_where}: tensor {tname!r} of {fname}: shared object {obj} {what}. Every checkpoint "
        "that references this chunk is affected ('ckptguard verify RUN' lists them); restore "
        "falls back to an older checkpoint that does not use it.",
        path=obj,
        file=fname,
    )


class _Packs:
    """The pack files one read opens, each size-checked against the manifest once; closed together."""

    def __init__(self, storage: Storage, where: str, fname: str, sizes: Mapping[str, int]) -> None:
        self.storage, self.where, self.fname, self.sizes = storage, where, fname, sizes
        self.handles: dict[str, BinaryIO] = {}

    def open(self, pack: str, tname: str) -> BinaryIO:
        rel = pack_path(pack)
        fh = self.handles.get(rel)
        if fh is not None:
            return fh
        obj = self.storage.describe(rel)
        try:
            size = self.storage.size(rel)
        except CheckpointNotFoundError as e:
            raise _corrupt(self.where, self.fname, tname, obj, "is missing", record=(self.storage, pack, None, None)) from e
        except StorageUnavailableError:
            raise  # the network, not the data: nothing is recorded or marked
        except CheckpointError as e:  # not evidence about the bytes: skip, never mark
            raise StorageError(f"{self.where}: tensor {tname!r} of {self.fname}: shared object {obj} could not be read ({e})") from e
        if size != self.sizes[pack]:
            raise _corrupt(
                self.where, self.fname, tname, obj, f"is {size} bytes, the manifest recorded {self.sizes[pack]}",
                record=(self.storage, pack, None, None),
            )
        fh = self.handles[rel] = self.storage.open_read(rel)
        return fh

    def read_chunk(self, c: Mapping[str, Any], tname: str, part: memoryview, *, verify: bool) -> None:
        """Read chunk ``c`` into ``part`` (its size), checking its length and, with ``verify``, its digest."""
        fh = self.open(c["pack"], tname)
        obj = self.storage.describe(pack_path(c["pack"]))
        fh.seek(c["offset"])
        if read_full(fh, part) != len(part):
            raise _corrupt(self.where, self.fname, tname, obj, f"is truncated at chunk {c['digest']}", record=(self.storage, c["pack"], None, None))
        if verify and digest_bytes(part) != c["digest"]:
            raise _corrupt(
                self.where, self.fname, tname, obj,
                f"does not match chunk {c['digest']} (offset {c['offset']}, {len(part)} bytes): the "
                "bytes changed after the save (bit rot or tampering)",
                record=(self.storage, c["pack"], c["offset"], c["digest"]),
            )

    def close(self) -> None:
        for fh in self.handles.values():
            fh.close()


def read_chunked(
    storage: Storage,
    ckpt: str,
    fname: str,
    entry: Mapping[str, Any],
    *,
    targets: Mapping[str, torch.Tensor] | None = None,
    names: Iterable[str] | None = None,
    verify: bool = True,
    keep: bool = True,
) -> dict[str, torch.Tensor]:
    """``READERS['chunked']``: read chunks straight into the target tensors, verifying each."""
    wanted = set(entry["tensors"]) if names is None else set(names)
    packs = _Packs(storage, storage.describe(ckpt), fname, entry["packs"])
    out: dict[str, torch.Tensor] = {}
    scratch = bytearray()
    try:
        for tname, info in entry["tensors"].items():
            if tname not in wanted:
                continue
            dest = None if not keep else destination(
                dtype_tables()[1][info["dtype"]], tuple(info["shape"]), None if targets is None else targets.get(tname)
            )
            view = tensor_view(dest) if dest is not None else None
            pos = 0
            for c in info["chunks"]:
                n = c["size"]
                if view is None and len(scratch) < n:
                    scratch = bytearray(n)
                packs.read_chunk(c, tname, view[pos : pos + n] if view is not None else memoryview(scratch)[:n], verify=verify)
                pos += n
            if dest is not None:
                out[tname] = dest
    finally:
        packs.close()
    return out


def verify_chunked(storage: Storage, ckpt: str, fname: str, entry: Mapping[str, Any]) -> None:
    """``VERIFIERS['chunked']``: read and hash every chunk without keeping it."""
    read_chunked(storage, ckpt, fname, entry, keep=False)
