"""Sharded state stored by ckptguard: torch.distributed.checkpoint plans, ckptguard stores.

DCP decides which rank writes which shard of which tensor, and at load time which bytes each
rank needs after resharding. Where the bytes go is DCP's storage layer, a documented extension
point (``StorageWriter`` / ``StorageReader``); ours stores each rank's items as one tensor file
of the checkpoint, through the same sink as every tensor file, and DCP's plan as JSON::

    step-N/dcp/rank-00001.safetensors   rank 1's items: its shard of every tensor (one named
                                        tensor per (fqn, offset)), non-tensor items as uint8
    step-N/dcp/metadata.json            DCP's global metadata: every item, which file holds it

So the shard files get what every tensor file gets: per-tensor xxh3-128 checksums in
MANIFEST.json, parallel O_DIRECT writes on local disks, uploads with retries on object stores
(no shared filesystem needed), content-addressed chunks in an incremental run (a frozen body or
a LoRA base is referenced, not written again), and verified reads of only the items a rank needs
(ranged reads on object stores). No pickle: the metadata is JSON that we parse and validate, the
tensors are raw bytes with dtype and shape; non-tensor items (optimizer step counts,
hyper-parameters) are DCP's own ``torch.save`` bytes, loaded with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from ckptguard.distributed.dcp import DCP_DIR, assemble_model, is_legacy, legacy_storage_reader, load_into, verify_dcp_files
from ckptguard.errors import CorruptCheckpointError, UnsupportedStateError
from ckptguard.format import safejson
from ckptguard.persist.parallel_io import TensorSink
from ckptguard.persist.writer import write_blob
from ckptguard.storage.base import Storage, join

if TYPE_CHECKING:
    from ckptguard.persist.reader import CheckpointReader

__all__ = [
    "METADATA_JSON",
    "ShardItem",
    "ShardReader",
    "ShardWriter",
    "decode_metadata",
    "encode_metadata",
    "load_shards",
    "model_tensors",
    "save_shards",
    "shard_file",
]

METADATA_JSON = "metadata.json"
_FORMAT = "ckptguard-dcp-metadata"
_VERSION = 1


def shard_file(rank: int) -> str:
    """The name (inside ``dcp/``) of the tensor file holding ``rank``'s items."""
    return f"rank-{rank:05d}.safetensors"


@dataclasses.dataclass(frozen=True)
class ShardItem:
    """Where one DCP item is stored: a tensor file of ``dcp/`` and the tensor's name in it."""

    file: str
    name: str


def _item_name(index: MetadataIndex) -> str:
    if index.offset is None:
        return f"{index.fqn}|bytes"
    return f"{index.fqn}|{','.join(str(int(o)) for o in index.offset)}"


def _as_tensor(item: Any, data: Any) -> torch.Tensor:
    if item.type == WriteItemType.BYTE_IO:
        raw = bytes(data.getbuffer())
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    t: torch.Tensor = data.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.contiguous()


class ShardWriter(StorageWriter):
    """DCP's storage writer for one rank: its items become ``dcp/rank-R.safetensors`` (written
    by ``sink``, so checksummed, and chunked in an incremental run); the coordinator writes
    ``dcp/metadata.json``. ``entries``: the manifest entries of what this rank wrote."""

    def __init__(self, storage: Storage, directory: str, sink: TensorSink) -> None:
        super().__init__()
        self.storage = storage
        self.directory = directory
        self.sink = sink
        self.entries: dict[str, dict[str, Any]] = {}

    def reset(self, checkpoint_id: Any = None) -> None:
        self.entries = {}

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [dataclasses.replace(p, storage_data=shard_file(rank)) for rank, p in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        fname = str(plan.storage_data)
        tensors: dict[str, torch.Tensor] = {}
        results = []
        for item in plan.items:
            name = _item_name(item.index)
            if name in tensors:
                raise UnsupportedStateError(f"Two items of the sharded state are both named {name!r}; rename one.")
            t = _as_tensor(item, planner.resolve_data(item))
            tensors[name] = t
            results.append(WriteResult(index=item.index, size_in_bytes=t.numel() * t.element_size(),
                                       storage_data=ShardItem(fname, name)))
        self.storage.makedirs(self.directory)
        self.entries[f"{DCP_DIR}/{fname}"] = self.sink(self.storage, join(self.directory, fname), tensors)
        finish: Callable[[Storage], None] | None = getattr(self.sink, "finish", None)
        if finish is not None:  # an incremental save: its chunk packs are made durable now
            finish(self.storage)
        done: Future[list[WriteResult]] = Future()
        done.set_result(results)
        return done

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.storage_data = {r.index: r.storage_data for rs in results for r in rs}
        raw = encode_metadata(metadata)
        self.entries[f"{DCP_DIR}/{METADATA_JSON}"] = write_blob(self.storage, join(self.directory, METADATA_JSON), raw)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def encode_metadata(md: Metadata) -> bytes:
    """DCP's global metadata as JSON (what ``dcp/metadata.json`` holds)."""
    state: dict[str, Any] = {}
    for fqn, m in md.state_dict_metadata.items():
        if isinstance(m, TensorStorageMetadata):
            state[fqn] = {
                "type": "tensor", "dtype": _dtype_name(m.properties.dtype), "size": list(m.size),
                "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes)} for c in m.chunks],
            }
        elif isinstance(m, BytesStorageMetadata):
            state[fqn] = {"type": "bytes"}
        else:
            raise UnsupportedStateError(f"Sharded state item {fqn!r} is a {type(m).__name__}, which ckptguard cannot store.")
    planner = md.planner_data if isinstance(md.planner_data, dict) else {}
    storage = [
        {"fqn": idx.fqn, "offset": None if idx.offset is None else list(idx.offset), "file": s.file, "name": s.name}
        for idx, s in (md.storage_data or {}).items()
    ]
    doc = {
        "format": _FORMAT, "version": _VERSION, "dcp_version": md.version, "state_dict": state,
        "planner_data": {k: list(v) for k, v in planner.items()}, "storage": storage,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def _ints(v: Any, what: str) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        raise ValueError(f"{what} must be a list of integers >= 0")
    return v


def _dtype(name: Any) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _item_meta(fqn: str, m: Any) -> TensorStorageMetadata | BytesStorageMetadata:
    if not isinstance(m, dict) or m.get("type") not in ("tensor", "bytes"):
        raise ValueError(f"item {fqn!r} is neither a tensor nor bytes")
    if m["type"] == "bytes":
        return BytesStorageMetadata()
    size = _ints(m.get("size"), f"{fqn}.size")
    chunks = m.get("chunks")
    if not isinstance(chunks, list):
        raise ValueError(f"{fqn}.chunks must be a list")
    cs = []
    for c in chunks:
        offsets, sizes = _ints(c.get("offsets") if isinstance(c, dict) else None, f"{fqn} chunk offsets"), _ints(c.get("sizes"), f"{fqn} chunk sizes")
        if len(offsets) != len(size) or len(sizes) != len(size) or any(o + n > s for o, n, s in zip(offsets, sizes, size)):
            raise ValueError(f"{fqn}: a chunk lies outside the tensor")
        cs.append(ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)))
    return TensorStorageMetadata(properties=TensorProperties(dtype=_dtype(m.get("dtype"))), size=torch.Size(size), chunks=cs)


def decode_metadata(raw: bytes, reader: CheckpointReader) -> Metadata:
    """Parse and validate ``dcp/metadata.json`` of the checkpoint ``reader`` reads: every item it
    names must be a tensor of a ``dcp/`` tensor file the manifest lists (nothing else is ever read)."""
    where = reader.where
    try:
        doc = safejson.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise ValueError("not ckptguard's DCP metadata")
        if doc.get("version") != _VERSION:
            raise ValueError(f"version {doc.get('version')!r} is not one this ckptguard reads ({_VERSION})")
        state = doc["state_dict"]
        planner = doc["planner_data"]
        if not isinstance(state, dict) or not isinstance(planner, dict) or not isinstance(doc["storage"], list):
            raise ValueError("state_dict, planner_data and storage have the wrong types")
        md = Metadata(
            state_dict_metadata={str(k): _item_meta(str(k), v) for k, v in state.items()},
            planner_data={str(k): tuple(v) for k, v in planner.items() if isinstance(v, list)},
            version=doc.get("dcp_version") if isinstance(doc.get("dcp_version"), str) else None,
        )
        storage: dict[MetadataIndex, ShardItem] = {}
        for s in doc["storage"]:
            offset = None if s["offset"] is None else torch.Size(_ints(s["offset"], "offset"))
            item = ShardItem(str(s["file"]), str(s["name"]))
            if reader.tensor_table(f"{DCP_DIR}/{item.file}").get(item.name) is None:
                raise ValueError(f"item {item.name!r} of {item.file!r} is not a tensor the manifest vouches for")
            storage[MetadataIndex(str(s["fqn"]), offset)] = item
        md.storage_data = storage
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CorruptCheckpointError(
            f"{where}/{DCP_DIR}/{METADATA_JSON} is not valid sharded-state metadata ({e}). The checkpoint "
            "is damaged or hostile; restore falls back to an older one.",
            path=where, file=f"{DCP_DIR}/{METADATA_JSON}",
        ) from e
    return md


def _narrow(t: torch.Tensor, offsets: Any, lengths: Any) -> torch.Tensor:
    for dim, (o, n) in enumerate(zip(offsets, lengths)):
        if o + n > t.shape[dim]:
            raise CorruptCheckpointError(f"a stored shard is smaller than the metadata says (dim {dim}: {o}+{n} > {t.shape[dim]})")
        t = t.narrow(dim, o, n)
    return t


class ShardReader(StorageReader):
    """DCP's storage reader over one committed checkpoint (``reader``): hands DCP the verified
    metadata, reads each needed item through ``reader`` (verified against its checksum)."""

    def __init__(self, reader: CheckpointReader, metadata: Metadata) -> None:
        super().__init__()
        self.reader = reader
        self.metadata = metadata

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        items: Mapping[MetadataIndex, ShardItem] = self.metadata.storage_data
        per_file: dict[str, list[Any]] = {}
        for req in plan.items:
            per_file.setdefault(items[req.storage_index].file, []).append(req)
        for fname, reqs in sorted(per_file.items()):
            names = {items[r.storage_index].name for r in reqs}
            stored = self.reader.tensors(f"{DCP_DIR}/{fname}", names=names)
            for req in reqs:
                t = stored[items[req.storage_index].name]
                if req.type == LoadItemType.BYTE_IO:
                    planner.load_bytes(req, io.BytesIO(t.numpy().tobytes()))
                    continue
                target = planner.resolve_tensor(req).detach()
                target.copy_(_narrow(t, req.storage_offsets, req.lengths))  # a shape mismatch raises
                planner.commit_tensor(req, target)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False


def save_shards(
    state_dict: dict[str, Any], storage: Storage, directory: str, sink: TensorSink, process_group: Any = None
) -> dict[str, dict[str, Any]]:
    """Write sharded state (:func:`~ckptguard.distributed.dcp.dcp_state_dict`, or a host copy of
    it) into ``directory`` of ``storage``; return the manifest entries of what this rank wrote.
    Collective on ``process_group`` (DCP's plan exchange)."""
    from torch.distributed.checkpoint.state_dict_saver import save

    writer = ShardWriter(storage, directory, sink)
    save(state_dict, storage_writer=writer, process_group=process_group)
    return writer.entries


def _storage_reader(reader: CheckpointReader) -> Any:
    """The DCP storage reader of a committed checkpoint (verified metadata, verified reads)."""
    files = reader.manifest["files"]
    if is_legacy(files):
        root = reader.storage.describe(reader.name)
        if not reader.storage.atomic_rename:  # the earlier layout was written to local filesystems only
            raise UnsupportedStateError(f"{reader.where}: sharded state of the earlier layout is read from local filesystems only.")
        verify_dcp_files(root, files, reader.where)
        reader.checked.update(f for f in files if f.startswith(DCP_DIR + "/"))
        return legacy_storage_reader(root, files, reader.where)
    return ShardReader(reader, decode_metadata(reader.blob(f"{DCP_DIR}/{METADATA_JSON}"), reader))


def load_shards(
    model: torch.nn.Module, optimizers: Any, reader: CheckpointReader, *, strict: bool, process_group: Any = None
) -> None:
    """Load the sharded state of ``reader``'s checkpoint into ``model`` (+ optimizers), resharded
    to today's layout. Every item a rank uses is verified against its checksum as it is read;
    the ``dcp/`` files count as checked afterwards (bytes this rank does not use cannot reach it;
    ``ckptguard verify`` checks every byte)."""
    load_into(model, optimizers, _storage_reader(reader), reader.where, strict=strict, process_group=process_group)
    reader.checked.update(f for f in reader.manifest["files"] if f.startswith(DCP_DIR + "/"))


def model_tensors(reader: CheckpointReader) -> dict[str, torch.Tensor]:
    """The consolidated model tensors of a sharded checkpoint (``ckptguard export``)."""
    sr = _storage_reader(reader)
    return assemble_model(sr.read_metadata(), sr, reader.where)
