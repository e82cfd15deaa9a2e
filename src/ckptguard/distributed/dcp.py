"""Sharded (FSDP2 / DTensor) model and optimizer state through torch.distributed.checkpoint.

We do not write our own sharded format: DCP plans, reshards and writes the shards. This module
puts DCP *inside* ckptguard's commit protocol and trust model:

* Save: ``dcp.save`` writes into ``<staging>/dcp/`` (``__<rank>_0.distcp`` shard files and the
  global metadata, renamed here ``dcp.metadata`` because manifest paths may not start with a dot).
  Afterwards every file of that directory is hashed (xxh3-128, streamed; the files are split
  round-robin between the ranks) and listed in our MANIFEST.json as a ``blob`` entry, which rank 0
  writes last, as for any checkpoint. An uncommitted DCP directory is debris like any other.
* Load: BEFORE DCP opens anything, every ``dcp/`` file is checked against the manifest (size and
  checksum). Then we parse the metadata ourselves with a restricted unpickler that only builds
  DCP's own metadata classes (anything else raises UnsafeCheckpointError instead of running
  code), check that every file it points at is one the manifest vouches for, and hand the parsed
  object to DCP through our reader: DCP never unpickles the metadata itself. Shard payloads are
  read by DCP with ``torch.load(weights_only=True)``, and non-tensor items (optimizer
  hyper-parameters) with our planner, which also uses ``weights_only=True`` (DCP's default
  planner does not).

Trust boundary, stated plainly: DCP's on-disk format is torch's (a pickle-based metadata file and
``torch.save`` shard payloads), not safetensors. Our MANIFEST.json (JSON, validated) is the trust
anchor: checksums detect corruption; the restricted unpickler and ``weights_only`` loads keep a
hostile checkpoint from executing code. Resharding (2 ranks -> 1 rank, a plain module, no process
group, and back) is DCP's planner's job; ``get_state_dict``/``set_state_dict`` map the module and
optimizer states to and from fully-qualified names.
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
    "dcp_model_tensors",
    "DCP_DIR",
    "DCP_METADATA",
    "dcp_load",
    "dcp_save",
    "dcp_state_dict",
    "hash_file",
    "is_sharded",
    "read_verified_metadata",
    "safe_load_metadata",
    "verify_dcp_files",
]

log = logging.getLogger(__name__)
DCP_DIR = "dcp"
DCP_METADATA = "dcp.metadata"
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


def _writer_cls() -> type:
    from torch.distributed.checkpoint.filesystem import FileSystemWriter

    class _Writer(FileSystemWriter):
        def _get_metadata_path(self, rank: int | None = None) -> os.PathLike[str]:
            return Path(self.path) / (DCP_METADATA if rank is None else f"__{rank}_{DCP_METADATA}")

    return _Writer


def dcp_state_dict(model: nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> dict[str, Any]:
    """The sharded model (+ optimizer) state dict that :func:`dcp_save` writes (DTensors, no copy)."""
    return _state_dicts(model, optimizers)


def dcp_save(state_dict: dict[str, Any], directory: str, process_group: Any = None) -> None:
    """Write a :func:`dcp_state_dict` (or a host copy of it) into ``directory`` (collective on
    all ranks of ``process_group``; None: the default group)."""
    from torch.distributed.checkpoint.state_dict_saver import save

    save(state_dict, storage_writer=_writer_cls()(directory, sync_files=True, overwrite=True), process_group=process_group)


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


def _planner(allow_partial_load: bool) -> Any:
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


def dcp_load(
    model: nn.Module,
    optimizers: Iterable[torch.optim.Optimizer],
    root: str,
    files: Mapping[str, Mapping[str, Any]],
    where: str,
    *,
    strict: bool = True,
) -> None:
    """Load a verified ``dcp/`` directory into ``model`` (+ optimizers), resharding as needed.

    Works with any world size (collective when a process group is initialized) and with a plain
    module in a single process. Call :func:`verify_dcp_files` first. ``strict=False`` leaves
    entries the checkpoint lacks as they are.
    """
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict
    from torch.distributed.checkpoint.state_dict_loader import load

    opt_list = list(optimizers)
    allowed = frozenset(rel[len(DCP_DIR) + 1:] for rel in files if rel.startswith(DCP_DIR + "/"))
    sd = _state_dicts(model, opt_list)
    directory = os.path.join(root, DCP_DIR)
    reader = _reader_cls(read_verified_metadata(directory, allowed, where))(directory)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process"
            load(sd, storage_reader=reader, planner=_planner(not strict))
    except (Exception, CheckpointException) as e:
        raise StateMismatchError(
            f"{where}: the sharded state does not fit the model/optimizer ({type(e).__name__}: "
            f"{str(e)[:500]}). Was the model or optimizer changed? Build the same model to restore."
        ) from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        set_state_dict(model, opt_list, model_state_dict=sd["model"], optim_state_dict=sd.get("optim", {}))


def dcp_model_tensors(root: str, files: Mapping[str, Mapping[str, Any]], where: str) -> dict[str, torch.Tensor]:
    """The full (consolidated) model tensors of a verified ``dcp/`` directory, without the model's
    code: every ``model.*`` tensor the metadata describes, assembled from all ranks' shards in one
    process (what ``ckptguard export`` writes for a sharded checkpoint). Call
    :func:`verify_dcp_files` first."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import load

    allowed = frozenset(rel[len(DCP_DIR) + 1:] for rel in files if rel.startswith(DCP_DIR + "/"))
    directory = os.path.join(root, DCP_DIR)
    md = read_verified_metadata(directory, allowed, where)
    model: dict[str, torch.Tensor] = {}
    for fqn, meta in md.state_dict_metadata.items():
        if fqn.startswith("model.") and isinstance(meta, TensorStorageMetadata):
            model[fqn[len("model."):]] = torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    if not model:
        raise CheckpointError(f"{where}: the sharded state holds no model tensors to export.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "assuming ... a single process"
            load({"model": model}, storage_reader=_reader_cls(md)(directory), planner=_planner(True))
    except (Exception, CheckpointException) as e:  # DCP's own errors, on bytes the manifest vouched for
        raise CorruptCheckpointError(f"{where}: the sharded model state could not be assembled ({type(e).__name__}: {str(e)[:300]}).", path=where) from e
    return model
