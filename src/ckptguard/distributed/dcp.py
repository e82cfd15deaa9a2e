"""Sharded (FSDP2 / DTensor) model and optimizer state through torch.distributed.checkpoint.

We do not write our own sharding planner: DCP plans, reshards and loads. Since this version, DCP
stores through ckptguard (:mod:`ckptguard.distributed.shard_io`): each rank's items are one tensor
file of the checkpoint (``dcp/rank-R.safetensors``, written by the run's tensor sink: checksummed,
on any storage, chunked in an incremental run) and DCP's plan is ``dcp/metadata.json``. Rank 0
commits MANIFEST.json last, as for any checkpoint.

Checkpoints written by earlier versions (``dcp/__R_0.distcp`` files and a pickled
``dcp/dcp.metadata``, local filesystems only) still restore and export: every file is checked
against the manifest (size and checksum) before DCP opens anything; the metadata is parsed with a
restricted unpickler that only builds DCP's own metadata classes (anything else raises
UnsafeCheckpointError) and must point only at files the manifest vouches for; payloads are loaded
with ``weights_only=True``.

Non-tensor items (optimizer hyper-parameters) are DCP's ``torch.save`` bytes in both layouts; our
planner loads them with ``weights_only=True`` (DCP's default planner does not).
"""

from __future__ import annotations

import copy
import io
import logging
import os
import pickle
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch import nn

from ckptguard.errors import CheckpointError, CorruptCheckpointError, StateMismatchError, UnsafeCheckpointError
from ckptguard.storage.local import open_regular

__all__ = [
    "DCP_DIR",
    "DCP_METADATA",
    "assemble_model",
    "dcp_state_dict",
    "hash_file",
    "is_legacy",
    "is_sharded",
    "legacy_storage_reader",
    "load_into",
    "read_verified_metadata",
    "safe_load_metadata",
    "safe_planner",
    "verify_dcp_files",
]

log = logging.getLogger(__name__)
DCP_DIR = "dcp"
DCP_METADATA = "dcp.metadata"  # the pickled metadata of the earlier layout
_CHUNK = 16 * 1024 * 1024

# The only globals a DCP metadata pickle may name (torch 2.4 .. 2.13).
_ALLOWED = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


def is_sharded(model: nn.Module | None) -> bool:
    """True when the model holds DTensor parameters (FSDP2 ``fully_shard``, tensor parallel)."""
    if model is None:
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def hash_file(path: str | os.PathLike[str]) -> tuple[int, str]:
    """(size, xxh3-128 hex) of a file, streamed; equal to ``digest_bytes`` of its content."""
    h = xxhash.xxh3_128()
    size = 0
    fd = open_regular(str(path), str(path), doing="hashing")  # never a FIFO or device: it could block
    with os.fdopen(fd, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in DCP metadata")


def safe_load_metadata(data: bytes, where: str) -> Any:
    """Parse DCP metadata without running code; UnsafeCheckpointError on anything unexpected."""
    try:
        return _SafeUnpickler(io.BytesIO(data)).load()
    except Exception as e:
        raise UnsafeCheckpointError(
            f"{where}: the DCP metadata is not plain DCP metadata ({e}); refusing to load it. "
            "The checkpoint is damaged or hostile; restore falls back to an older one.",
            path=where,
        ) from e


def _state_dicts(model: nn.Module, optimizers: Iterable[torch.optim.Optimizer], **opts: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opt_list = list(optimizers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        msd, osd = get_state_dict(model, opt_list, options=StateDictOptions(**opts))
    out: dict[str, Any] = {"model": msd}
    if opt_list:
        out["optim"] = osd
    return out


def dcp_state_dict(model: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> dict[str, Any]:
    """The sharded model (+ optimizer) state dict that DCP saves (DTensors, no copy)."""
    return _state_dicts(model, optimizers)


def is_legacy(files: Mapping[str, Any]) -> bool:
    """Whether a checkpoint's sharded state has the earlier layout (pickled ``dcp/dcp.metadata``)."""
    return f"{DCP_DIR}/{DCP_METADATA}" in files


def verify_dcp_files(root: str, files: Mapping[str, Mapping[str, Any]], where: str) -> None:
    """Check size and checksum of every ``dcp/`` file the manifest lists (before DCP reads one)."""
    for rel, entry in files.items():
        if not rel.startswith(DCP_DIR + "/"):
            continue
        path = os.path.join(root, rel)
        if os.path.islink(path):
            raise UnsafeCheckpointError(f"{path} is a symbolic link; refusing to follow it.", path=where, file=rel)
        try:
            size, digest = hash_file(path)
        except OSError as e:
            raise CorruptCheckpointError(
                f"{path} cannot be read ({e.strerror}); the sharded state is incomplete.",
                path=where, file=rel,
            ) from e
        if size != entry["size"] or digest != entry["xxh3_128"]:
            raise CorruptCheckpointError(
                f"{path} does not match the manifest (size {size} vs {entry['size']}, checksum "
                f"{digest} vs {entry['xxh3_128']}): a shard changed after the save (bit rot, "
                "truncation or tampering). Restore falls back to an older checkpoint.",
                path=where, file=rel,
            )


def read_verified_metadata(directory: str, allowed: frozenset[str], where: str) -> Any:
    """DCP's metadata, parsed without running code, pointing only at files in ``allowed``."""
    path = str(Path(directory) / DCP_METADATA)
    with os.fdopen(open_regular(path, path, doing="reading"), "rb") as f:  # never a FIFO or device
        md = safe_load_metadata(f.read(), where)
    if type(md).__name__ != "Metadata":
        raise UnsafeCheckpointError(f"{where}: the DCP metadata holds a {type(md).__name__}, not Metadata.", path=where)
    for info in (getattr(md, "storage_data", None) or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel not in allowed:
            raise UnsafeCheckpointError(
                f"{where}: the DCP metadata points at {rel!r}, a file the manifest does not vouch "
                "for; refusing to read it. The checkpoint is damaged or hostile.",
                path=where,
            )
    return md


def _reader_cls(metadata: Any) -> type:
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _Reader(FileSystemReader):
        """Hands DCP the metadata we already verified and parsed; never unpickles anything."""

        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            md = copy.copy(metadata)
            md.storage_meta = copy.copy(getattr(md, "storage_meta", None)) or StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return _Reader


def safe_planner(allow_partial_load: bool) -> Any:
    """DCP's default load planner, loading non-tensor items with ``weights_only=True``."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.planner import ReadItem

    class _SafePlanner(DefaultLoadPlanner):
        """DCP's planner loads non-tensor items with ``weights_only=False``; we never do."""

        def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element as _set

                _set(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return _SafePlanner(allow_partial_load=allow_partial_load)


def legacy_storage_reader(root: str, files: Mapping[str, Mapping[str, Any]], where: str) -> Any:
    """DCP's reader of a ``dcp/`` directory of the earlier layout, with metadata we parsed ourselves.
    Call :func:`verify_dcp_files` first."""
    allowed = frozenset(rel[len(DCP_DIR) + 1:] for rel in files if rel.startswith(DCP_DIR + "/"))
    directory = os.path.join(root, DCP_DIR)
    return _reader_cls(read_verified_metadata(directory, allowed, where))(directory)


def load_into(
    model: nn.Module,
    optimizers: Iterable[torch.optim.Optimizer],
    storage_reader: Any,
    where: str,
    *,
    strict: bool = True,
    process_group: Any = None,
) -> None:
    """Load sharded state through ``storage_reader`` into ``model`` (+ optimizers), resharding as
    needed. Collective on ``process_group`` (None: the default group, when one is initialized);
    works with a plain module in a single process too. ``strict=False`` leaves entries the
    checkpoint lacks as they are."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load

    opt_list = list(optimizers)
    sd = _state_dicts(model, opt_list)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process"
            load(sd, storage_reader=storage_reader, planner=safe_planner(not strict), process_group=process_group)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:
        cause = _checkpoint_error(e)
        if cause is not None:  # raised by our reader on one rank (a damaged shard), relayed by DCP
            raise cause from e
        inner = _inner(e)
        raise StateMismatchError(
            f"{where}: the sharded state does not fit the model/optimizer ({type(inner).__name__}: "
            f"{str(inner)[:500]}). Was the model or optimizer changed? Build the same model to restore."
        ) from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        set_state_dict(model, opt_list, model_state_dict=sd["model"], optim_state_dict=sd.get("optim", {}))


def _inner(e: BaseException) -> BaseException:
    """The exception a rank raised inside DCP: DCP wraps it in a CheckpointException holding
    ``failures`` by rank, each an (exception, stack) pair; ``e`` itself otherwise."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        for f in failures.values():
            inner = f[0] if isinstance(f, tuple) and f else f
            if isinstance(inner, BaseException):
                return inner
    return e


def _checkpoint_error(e: BaseException) -> CheckpointError | None:
    """The CheckpointError our storage reader raised inside DCP (a damaged shard), if any."""
    inner = _inner(e)
    return inner if isinstance(inner, CheckpointError) else None


def assemble_model(metadata: Any, storage_reader: Any, where: str) -> dict[str, torch.Tensor]:
    """The full (consolidated) model tensors of sharded state, without the model's code: every
    ``model.*`` tensor ``metadata`` describes, assembled in one process from all ranks' shards
    (what ``ckptguard export`` writes for a sharded checkpoint)."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import load

    model: dict[str, torch.Tensor] = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        if fqn.startswith("model.") and isinstance(meta, TensorStorageMetadata):
            model[fqn[len("model."):]] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    if not model:
        raise CheckpointError(f"{where}: the sharded state holds no model tensors to export.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process"
            load({"model": model}, storage_reader=storage_reader, planner=safe_planner(True))
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP's own errors, on bytes the manifest vouched for
        cause = _checkpoint_error(e)
        if cause is not None:
            raise cause from e
        inner = _inner(e)
        raise CorruptCheckpointError(
            f"{where}: the sharded model state could not be assembled ({type(inner).__name__}: {str(inner)[:300]}).", path=where
        ) from e
    return model
