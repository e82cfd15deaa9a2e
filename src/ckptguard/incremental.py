"""Incremental checkpoints: tensor data stored once by content, referenced by every manifest.

``CheckpointManager(..., incremental=True)`` writes each tensor file as a manifest entry of kind
``"chunked"`` instead of a ``.safetensors`` file. The entry keeps the file's logical safetensors
layout (per tensor: dtype, shape, byte offsets) and, per tensor, the list of its chunks (at most
``CHUNK_BYTES`` each; small tensors are one chunk), each with its xxh3-128 digest, its size and
where its bytes live::

    RUN/objects/p-<unix ms, 13 digits>-<8 hex>.pack    chunk bytes, concatenated; immutable
    RUN/step-000001200/MANIFEST.json                   "model.safetensors": {"kind": "chunked",
        "size": <tensor bytes>, "chunk_size": 67108864, "xxh3_128": <root of the chunk digests>,
        "packs": {"p-...pack": <pack size>},
        "tensors": {"w": {"dtype": "F32", "shape": [..], "offsets": [b, e], "xxh3_128": <if one chunk>,
                          "chunks": [{"digest": <xxh3-128 hex>, "size": n, "pack": "p-...pack",
                                      "offset": o}]}}}

Saving hashes every chunk from host memory, in order; a chunk whose digest a retained, not-corrupt
checkpoint already references is referenced again, every other chunk is appended to this save's
pack, which on local disks is written (parallel, O_DIRECT) while the next chunks hash. The packs
are closed (fsync'd / uploaded) and ``objects/`` synced before the manifest is written, so a
committed manifest only ever references durable bytes.

Why packs and not one object per chunk: on this kind of machine an fsync costs ~5 ms (a disk cache
flush), so 300 tensors written as 300 files took 1.5-2.3 s where one file took 0.23 s; on object
stores each object is a request. One pack per tensor file costs what the plain format costs.
Chunks of a pack that few retained checkpoints still use are *copied forward*: when less than
``COPY_FORWARD_BELOW`` of a pack's bytes are still referenced, its chunks are written again into
the new pack instead of being referenced, so dead bytes in old packs are eventually freed.

Packs are found only through manifests, and pack names are accepted only when they match
``PACK_RE`` (never a path from a manifest). Garbage collection lives in :mod:`ckptguard.gc`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO

import xxhash

from ckptguard.catalog import BAD_STATUSES, CheckpointInfo, ManifestCache
from ckptguard.errors import CheckpointError, CorruptCheckpointError
from ckptguard.manifest import _fail, _hex, _int, validate_tensor_table
from ckptguard.parallel_io import ParallelTensorWriter, Segment, write_segments
from ckptguard.storage.base import Storage, join
from ckptguard.tensorfile import (
    destination,
    digest_bytes,
    dtype_tables,
    plan_tensor_file,
    tensor_view,
)

if TYPE_CHECKING:  # tensors arrive from callers; listing and verifying import no torch
    import torch

__all__ = [
    "CHUNK_BYTES",
    "KIND",
    "OBJECTS",
    "PACK_RE",
    "ChunkIndex",
    "IncrementalRun",
    "IncrementalSave",
    "ManifestCache",
    "build_index",
    "build_index_from",
    "chunk_refs",
    "pack_path",
    "read_chunked",
    "trusted_index",
    "validate_chunked",
    "verify_chunked",
]

log = logging.getLogger(__name__)

KIND = "chunked"
OBJECTS = "objects"
CHUNK_BYTES = 64 * 1024 * 1024
COPY_FORWARD_BELOW = 0.5
PACK_RE = re.compile(r"^p-(\d{13})-([0-9a-f]{8})\.pack$")


def pack_path(name: str) -> str:
    """The run-relative path of a pack; refuses any name that is not a pack name."""
    if not isinstance(name, str) or not PACK_RE.match(name):
        raise CorruptCheckpointError(f"refusing object name {name!r}: not a ckptguard pack name.")
    return join(OBJECTS, name)


def pack_time(name: str) -> float | None:
    """Creation time (unix seconds) encoded in a pack name, or None for other names."""
    m = PACK_RE.match(name)
    return int(m.group(1)) / 1000.0 if m else None


def new_pack_name() -> str:
    return f"p-{int(time.time() * 1000):013d}-{uuid.uuid4().hex[:8]}.pack"


# ---- manifest entries --------------------------------------------------------------------------


def validate_chunked(entry: dict[str, Any], where: str, name: str) -> None:
    """``FILE_KIND_VALIDATORS['chunked']``: every field checked; pack names must match PACK_RE."""
    size = _int(entry.get("size"), where, f"files[{name!r}].size")
    _int(entry.get("chunk_size"), where, f"files[{name!r}].chunk_size", lo=1)
    _hex(entry.get("xxh3_128"), where, f"files[{name!r}].xxh3_128")
    packs = entry.get("packs")
    if not isinstance(packs, dict):
        raise _fail(where, f"files[{name!r}].packs must be an object")
    for pname, psize in packs.items():
        if not PACK_RE.match(pname):
            raise _fail(where, f"files[{name!r}] names an object {pname!r} that is not a pack name")
        _int(psize, where, f"files[{name!r}].packs[{pname!r}]")
    data = validate_tensor_table(entry.get("tensors"), where, name)
    if data != size:
        raise _fail(where, f"files[{name!r}] size {size} != tensor bytes {data}")
    for tname, info in entry["tensors"].items():
        chunks = info.get("chunks")
        if not isinstance(chunks, list):
            raise _fail(where, f"tensor {tname!r} has no chunk list")
        total = 0
        for c in chunks:
            if not isinstance(c, dict):
                raise _fail(where, f"tensor {tname!r} has a malformed chunk {c!r}")
            _hex(c.get("digest"), where, f"tensor {tname!r} chunk digest")
            n = _int(c.get("size"), where, f"tensor {tname!r} chunk size", lo=1)
            off = _int(c.get("offset"), where, f"tensor {tname!r} chunk offset")
            if c.get("pack") not in packs or off + n > packs[c["pack"]]:
                raise _fail(where, f"tensor {tname!r} chunk lies outside its pack {c.get('pack')!r}")
            total += n
        b, e = info["offsets"]
        if total != e - b:
            raise _fail(where, f"tensor {tname!r}: chunks hold {total} bytes, the tensor {e - b}")


def chunk_refs(manifest: Mapping[str, Any]) -> Iterator[tuple[str, int, str, int]]:
    """(digest, size, pack, offset) of every chunk a validated manifest references."""
    for entry in manifest["files"].values():
        if entry.get("kind") != KIND:
            continue
        for info in entry["tensors"].values():
            for c in info["chunks"]:
                yield c["digest"], c["size"], c["pack"], c["offset"]


def pack_sizes(manifest: Mapping[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for entry in manifest["files"].values():
        if entry.get("kind") == KIND:
            out.update(entry["packs"])
    return out


# ---- the index of what retained checkpoints hold -----------------------------------------------


@dataclasses.dataclass
class ChunkIndex:
    """Chunks that committed, trusted checkpoints reference: digest -> (pack, offset, size)."""

    chunks: dict[str, tuple[str, int, int]] = dataclasses.field(default_factory=dict)
    pack_size: dict[str, int] = dataclasses.field(default_factory=dict)
    pack_live: dict[str, int] = dataclasses.field(default_factory=dict)

    def find(self, digest: str, size: int) -> tuple[str, int] | None:
        """Where to reference ``digest`` from, or None to write it (again)."""
        hit = self.chunks.get(digest)
        if hit is None or hit[2] != size:
            return None
        pack, offset, _ = hit
        total = self.pack_size.get(pack, 0)
        if total and self.pack_live.get(pack, 0) < COPY_FORWARD_BELOW * total:
            return None  # copy forward: let the mostly-dead pack die
        return pack, offset

    def add(self, digest: str, size: int, pack: str, offset: int) -> None:
        self.chunks[digest] = (pack, offset, size)


def trusted_index(manifests: ManifestCache) -> ChunkIndex:
    """The chunks that committed checkpoints not marked corrupt or failed hold."""
    from ckptguard.catalog import read_status

    infos = []
    for name, manifest in manifests.committed(strict=False):
        status = (read_status(manifests.storage, name) or {}).get("status", "committed")
        infos.append((manifest, status in BAD_STATUSES))
    return build_index_from(infos)


class IncrementalRun:
    """What a manager keeps for incremental saves: the manifest cache behind dedup and GC."""

    def __init__(self, storage: Storage, chunk_bytes: int = CHUNK_BYTES, manifests: ManifestCache | None = None) -> None:
        self.storage = storage
        self.chunk_bytes = chunk_bytes
        self.manifests = manifests if manifests is not None else ManifestCache(storage)
        self.io = ParallelTensorWriter(direct=True)  # its staging buffers serve every save

    def writer(self) -> IncrementalSave:
        """The tensor writer for the next save (indexes what committed checkpoints hold)."""
        return IncrementalSave(trusted_index(self.manifests), self.chunk_bytes, self.io)


def build_index(ckpts: Iterable[CheckpointInfo]) -> ChunkIndex:
    """Index the chunks of committed checkpoints as listed by ``catalog.scan``."""
    return build_index_from((c.manifest, c.status in BAD_STATUSES) for c in ckpts if c.manifest is not None)


def build_index_from(manifests: Iterable[tuple[Mapping[str, Any], bool]]) -> ChunkIndex:
    """Index the chunks of committed manifests, given as (manifest, marked bad). Digests that a
    checkpoint marked corrupt or failed references are never reused (writing them again costs
    space, never correctness)."""
    idx = ChunkIndex()
    distrust: set[str] = set()
    live: dict[str, set[tuple[int, int]]] = {}
    for manifest, bad in manifests:
        refs = list(chunk_refs(manifest))
        if bad:
            distrust.update(d for d, _, _, _ in refs)
            continue
        idx.pack_size.update(pack_sizes(manifest))
        for digest, size, pack, offset in refs:
            idx.chunks.setdefault(digest, (pack, offset, size))
            live.setdefault(pack, set()).add((offset, size))
    for d in distrust:
        idx.chunks.pop(d, None)
    idx.pack_live = {p: sum(n for _, n in spans) for p, spans in live.items()}
    return idx


# ---- writing -----------------------------------------------------------------------------------


class IncrementalSave:
    """The tensor-file writer of one save: ``write_checkpoint(..., tensor_writer=IncrementalSave(...))``.

    Per tensor file: hash every chunk, reference known ones, append new ones to a pack created
    for this file (written while later chunks hash), close the pack (durable), return the entry;
    ``finish`` syncs ``objects/`` once before the manifest is written.
    """

    def __init__(self, index: ChunkIndex, chunk_bytes: int = CHUNK_BYTES, io: ParallelTensorWriter | None = None) -> None:
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be >= 1")
        self.index = index
        self.chunk_bytes = chunk_bytes
        self.io = io if io is not None else ParallelTensorWriter(direct=True)
        self.written_bytes = 0
        self.reused_bytes = 0
        self.new_packs = 0

    def __call__(self, storage: Storage, rel: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        _, table = plan_tensor_file(tensors)
        pack = new_pack_name()
        packs: dict[str, int] = {}
        root = xxhash.xxh3_128()
        pos = 0

        def new_chunks() -> Iterator[Segment]:
            """Hash every chunk in order; yield those to write (what is stored is referenced).
            Lazy: on local disks the pack's first pieces are written while later chunks hash."""
            nonlocal pos
            for tname, t in tensors.items():
                view = tensor_view(t)
                chunks = []
                for start in range(0, len(view), self.chunk_bytes):
                    part = view[start : start + self.chunk_bytes]
                    digest = digest_bytes(part)
                    root.update(bytes.fromhex(digest))
                    hit = self.index.find(digest, len(part))
                    if hit is None:
                        hit = (pack, pos)
                        self.index.add(digest, len(part), pack, pos)
                        self.written_bytes += len(part)
                        yield Segment(pos, part)
                        pos += len(part)
                    else:
                        self.reused_bytes += len(part)
                        if hit[0] != pack:  # a chunk met earlier in this file lives in this pack
                            packs[hit[0]] = self.index.pack_size[hit[0]]
                    chunks.append({"digest": digest, "size": len(part), "pack": hit[0], "offset": hit[1]})
                if len(chunks) == 1:
                    table[tname]["xxh3_128"] = chunks[0]["digest"]
                table[tname]["chunks"] = chunks

        todo = new_chunks()
        first = next(todo, None)  # a pack only when something is new
        writer = None
        try:
            if first is not None:
                storage.makedirs(OBJECTS)
                writer = storage.create(pack_path(pack))
                segs = itertools.chain([first], todo)
                if hasattr(writer, "pwritev"):  # local files: the parallel O_DIRECT path
                    write_segments(writer, segs, self.io)
                else:
                    for seg in segs:
                        writer.write(seg.view)
                writer.close()
                self.new_packs += 1
        except BaseException:
            for digest in [d for d, (p, _, _) in self.index.chunks.items() if p == pack]:
                del self.index.chunks[digest]  # never reference what did not become durable
            if writer is not None:
                writer.abort()
            raise
        if writer is not None:
            packs[pack] = pos
            self.index.pack_size[pack] = pos
            self.index.pack_live[pack] = pos
        return {
            "kind": KIND,
            "size": sum(e["offsets"][1] - e["offsets"][0] for e in table.values()),
            "chunk_size": self.chunk_bytes,
            "xxh3_128": root.hexdigest(),
            "packs": packs,
            "tensors": table,
        }

    def finish(self, storage: Storage) -> None:
        """Before the manifest is written: make the new packs' names durable (one directory
        sync per save, not one per pack)."""
        if self.new_packs:
            storage.sync_dir(OBJECTS)


# ---- reading -----------------------------------------------------------------------------------


def _corrupt(ckpt_where: str, fname: str, tname: str, obj: str, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{ckpt_where}: tensor {tname!r} of {fname}: shared object {obj} {what}. Every checkpoint "
        "that references this chunk is affected ('ckptguard verify RUN' lists them); restore "
        "falls back to an older checkpoint that does not use it.",
        path=obj,
        file=fname,
    )


def _readinto(fh: BinaryIO, view: memoryview) -> int:
    pos = 0
    while pos < len(view):
        n = fh.readinto(view[pos:])  # type: ignore[attr-defined]
        if not n:
            break
        pos += n
    return pos


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
                    except CheckpointError as e:
                        raise _corrupt(where, fname, tname, obj, "is missing") from e
                    if size != entry["packs"][c["pack"]]:
                        raise _corrupt(where, fname, tname, obj, f"is {size} bytes, the manifest recorded {entry['packs'][c['pack']]}")
                    fh = handles[rel] = storage.open_read(rel)
                n = c["size"]
                if view is not None:
                    part = view[pos : pos + n]
                else:
                    if scratch is None or len(scratch) < n:
                        scratch = bytearray(n)
                    part = memoryview(scratch)[:n]
                fh.seek(c["offset"])
                if _readinto(fh, part) != n:
                    raise _corrupt(where, fname, tname, obj, f"is truncated at chunk {c['digest']}")
                if verify and digest_bytes(part) != c["digest"]:
                    raise _corrupt(
                        where, fname, tname, obj,
                        f"does not match chunk {c['digest']} (offset {c['offset']}, {n} bytes): the "
                        "bytes changed after the save (bit rot or tampering)",
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

