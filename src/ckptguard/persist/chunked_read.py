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
    where = storage.describe(ckpt)
    wanted = set(entry["tensors"]) if names is None else set(names)
    handles: dict[str, BinaryIO] = {}
    out: dict[str, torch.Tensor] = {}
    scratch: bytearray | None = None
    try:
        for tname, info in entry["tensors"].items():
            if tname not in wanted:
                continue
            shape = tuple(info["shape"])
            dest = None if not keep else destination(
                dtype_tables()[1][info["dtype"]], shape, None if targets is None else targets.get(tname)
            )
            view = tensor_view(dest) if dest is not None else None
            pos = 0
            for c in info["chunks"]:
                rel = pack_path(c["pack"])
                obj = storage.describe(rel)
                fh = handles.get(rel)
                if fh is None:
                    try:
                        size = storage.size(rel)
                    except CheckpointNotFoundError as e:
                        raise _corrupt(where, fname, tname, obj, "is missing", record=(storage, c["pack"], None, None)) from e
                    except StorageUnavailableError:
                        raise  # the network, not the data: nothing is recorded or marked
                    except CheckpointError as e:  # not evidence about the bytes: skip, never mark
                        raise StorageError(f"{where}: tensor {tname!r} of {fname}: shared object {obj} could not be read ({e})") from e
                    if size != entry["packs"][c["pack"]]:
                        raise _corrupt(
                            where, fname, tname, obj, f"is {size} bytes, the manifest recorded {entry['packs'][c['pack']]}",
                            record=(storage, c["pack"], None, None),
                        )
                    fh = handles[rel] = storage.open_read(rel)
                n = c["size"]
                if view is not None:
                    part = view[pos : pos + n]
                else:
                    if scratch is None or len(scratch) < n:
                        scratch = bytearray(n)
                    part = memoryview(scratch)[:n]
                fh.seek(c["offset"])
                if read_full(fh, part) != n:
                    raise _corrupt(
                        where, fname, tname, obj, f"is truncated at chunk {c['digest']}",
                        record=(storage, c["pack"], None, None),
                    )
                if verify and digest_bytes(part) != c["digest"]:
                    raise _corrupt(
                        where, fname, tname, obj,
                        f"does not match chunk {c['digest']} (offset {c['offset']}, {n} bytes): the "
                        "bytes changed after the save (bit rot or tampering)",
                        record=(storage, c["pack"], c["offset"], c["digest"]),
                    )
                pos += n
            if dest is not None:
                out[tname] = dest
    finally:
        for fh in handles.values():
            fh.close()
    return out


def verify_chunked(storage: Storage, ckpt: str, fname: str, entry: Mapping[str, Any]) -> None:
    """``VERIFIERS['chunked']``: read and hash every chunk without keeping it."""
    read_chunked(storage, ckpt, fname, entry, keep=False)
