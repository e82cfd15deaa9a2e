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

Shared data is trusted only as far as it was checked (see :mod:`ckptguard.run.trust`). Before a save
references a stored chunk, the pack holding it must exist with its recorded size (one stat per
pack per save) and the location must not have failed a check before (the run's durable
``objects/distrusted/`` records, written by restore, ``verify``, the probe's read-back and saves);
and the chunk's bytes are read back from the pack and hashed (``IncrementalRun(reverify_every=1)``:
at every save, at most once per save; ``k`` > 1 re-reads a location at most every ``k`` saves of
the manager). A copy that fails is recorded and the next copy tried; with none left the chunk is
written again. Among copies, one referenced by a probe-verified checkpoint is preferred, then the
newest pack. The guarantee: damage to a stored chunk that the filesystem shows (a changed byte, a
truncated, resized or deleted pack) never reaches a checkpoint saved after it, so it costs at most
the checkpoints that already referenced it; with ``reverify_every=k`` a flipped byte may reach the
next ``k - 1`` saves. Bytes the OS serves from its page cache are what is checked: rot below a
cached page is found by the next read that misses the cache (restore, ``verify``).

Why packs and not one object per chunk: on this kind of machine an fsync costs ~5 ms (a disk cache
flush), so 300 tensors written as 300 files took 1.5-2.3 s where one file took 0.23 s; on object
stores each object is a request. One pack per tensor file costs what the plain format costs.
Chunks of a pack that few retained checkpoints still use are *copied forward*: when less than
``COPY_FORWARD_BELOW`` of a pack's bytes are still referenced, its chunks are written again into
the new pack instead of being referenced, so dead bytes in old packs are eventually freed.

Packs are found only through manifests, and pack names are accepted only when they match
``PACK_RE`` (never a path from a manifest). Garbage collection lives in :mod:`ckptguard.persist.gc`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO

import xxhash

from ckptguard.errors import CheckpointError, StorageError
from ckptguard.format.tensorfile import digest_bytes, plan_tensor_file, tensor_view
from ckptguard.persist.chunked_read import read_chunked, verify_chunked
from ckptguard.persist.parallel_io import ParallelTensorWriter, Segment
from ckptguard.run.catalog import BAD_STATUSES, CheckpointInfo, ManifestCache
from ckptguard.run.trust import (
    OBJECTS,
    PACK_RE,
    Distrust,
    PackStats,
    new_pack_name,
    pack_path,
    pack_time,
    read_distrust,
    read_full,
    record_distrust,
)
from ckptguard.storage.base import Storage

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
    "pack_time",
    "read_chunked",
    "trusted_index",
    "verify_chunked",
]

log = logging.getLogger(__name__)

KIND = "chunked"
CHUNK_BYTES = 64 * 1024 * 1024
COPY_FORWARD_BELOW = 0.5


# ---- manifest entries --------------------------------------------------------------------------


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


Copy = tuple[str, int, int]  # (pack, offset, size)


@dataclasses.dataclass
class ChunkIndex:
    """Chunks that committed, trusted checkpoints reference: digest -> stored copies, best first
    (referenced by a probe-verified checkpoint, then the newest pack)."""

    chunks: dict[str, list[Copy]] = dataclasses.field(default_factory=dict)
    pack_size: dict[str, int] = dataclasses.field(default_factory=dict)
    pack_live: dict[str, int] = dataclasses.field(default_factory=dict)

    def candidates(self, digest: str, size: int) -> list[tuple[str, int]]:
        """Where ``digest`` could be referenced from, best first; empty: write it (again)."""
        out = []
        for pack, offset, n in self.chunks.get(digest, ()):
            total = self.pack_size.get(pack, 0)
            if n != size or (total and self.pack_live.get(pack, 0) < COPY_FORWARD_BELOW * total):
                continue  # copy forward: let the mostly-dead pack die
            out.append((pack, offset))
        return out

    def find(self, digest: str, size: int) -> tuple[str, int] | None:
        """The best copy of ``digest`` (unchecked), or None to write it."""
        found = self.candidates(digest, size)
        return found[0] if found else None

    def add(self, digest: str, size: int, pack: str, offset: int) -> None:
        """A copy this save wrote: the newest, preferred from now on."""
        self.chunks.setdefault(digest, []).insert(0, (pack, offset, size))

    def drop(self, pack: str, offset: int | None = None) -> None:
        """Forget the copies in ``pack`` (at ``offset``, or all of them)."""
        for digest in list(self.chunks):
            kept = [c for c in self.chunks[digest] if c[0] != pack or (offset is not None and c[1] != offset)]
            if kept:
                self.chunks[digest] = kept
            else:
                del self.chunks[digest]


def trusted_index(manifests: ManifestCache, distrust: Distrust | None = None) -> ChunkIndex:
    """The chunks that committed checkpoints not marked corrupt or failed hold, less the
    locations recorded as damaged (``distrust``, default: read from the run)."""
    from ckptguard.run.catalog import read_status

    infos = []
    for name, manifest in manifests.committed(strict=False):
        status = (read_status(manifests.storage, name) or {}).get("status") or "committed"
        infos.append((manifest, status in BAD_STATUSES, status == "verified"))
    return build_index_from(infos, read_distrust(manifests.storage) if distrust is None else distrust)


class IncrementalRun:
    """What a manager keeps for incremental saves: the manifest cache behind dedup and GC, and
    when each stored chunk was last read back (``reverify_every``: re-read a reused chunk at
    most every that many saves; 1, the default, re-reads at every save)."""

    def __init__(
        self, storage: Storage, chunk_bytes: int = CHUNK_BYTES, manifests: ManifestCache | None = None,
        *, reverify_every: int = 1,
    ) -> None:
        if reverify_every < 1:
            raise ValueError(f"reverify_every must be >= 1, got {reverify_every}")
        self.storage = storage
        self.chunk_bytes = chunk_bytes
        self.manifests = manifests if manifests is not None else ManifestCache(storage)
        self.io = ParallelTensorWriter(direct=True)  # its staging buffers serve every save
        self.reverify_every = reverify_every
        self.saves = 0
        self.checked_at: dict[tuple[str, int], int] = {}  # (pack, offset) -> save that read it

    def writer(self) -> IncrementalSave:
        """The tensor writer for the next save (indexes what committed checkpoints hold)."""
        self.saves += 1
        distrust = read_distrust(self.storage)
        fresh = {k: n for k, n in self.checked_at.items() if self.saves - n < self.reverify_every}
        self.checked_at = {k: n for k, n in fresh.items() if not distrust.bad(*k)}
        return IncrementalSave(
            trusted_index(self.manifests, distrust), self.chunk_bytes, self.io, checked=self.checked_at, save_no=self.saves
        )


def build_index(ckpts: Iterable[CheckpointInfo]) -> ChunkIndex:
    """Index the chunks of committed checkpoints as listed by ``catalog.scan``."""
    return build_index_from(
        (c.manifest, c.status in BAD_STATUSES, c.status == "verified") for c in ckpts if c.manifest is not None
    )


def build_index_from(
    manifests: Iterable[tuple[Mapping[str, Any], bool] | tuple[Mapping[str, Any], bool, bool]],
    distrust: Distrust | None = None,
) -> ChunkIndex:
    """Index the chunks of committed manifests, given as (manifest, marked bad[, verified]).
    Locations that a checkpoint marked corrupt or failed references, or that ``distrust`` names,
    are never reused (writing them again costs space, never correctness)."""
    idx = ChunkIndex()
    bad: set[tuple[str, int]] = set()
    best: dict[str, dict[tuple[str, int], tuple[bool, float, int]]] = {}
    live: dict[str, set[tuple[int, int]]] = {}
    for item in manifests:
        manifest, is_bad, verified = item[0], item[1], bool(item[2]) if len(item) > 2 else False
        refs = list(chunk_refs(manifest))
        if is_bad:
            bad.update((p, o) for _, _, p, o in refs)
            continue
        idx.pack_size.update(pack_sizes(manifest))
        for digest, size, pack, offset in refs:
            copies = best.setdefault(digest, {})
            prev = copies.get((pack, offset))
            rank = (verified or bool(prev and prev[0]), pack_time(pack) or 0.0, size)
            copies[(pack, offset)] = rank
            live.setdefault(pack, set()).add((offset, size))
    for digest, copies in best.items():
        ok = [(r, p, o) for (p, o), r in copies.items() if (p, o) not in bad and not (distrust and distrust.bad(p, o))]
        if ok:
            ok.sort(key=lambda x: (x[0][0], x[0][1], x[1]), reverse=True)
            idx.chunks[digest] = [(p, o, r[2]) for r, p, o in ok]
    idx.pack_live = {p: sum(n for _, n in spans) for p, spans in live.items()}
    return idx


# ---- writing -----------------------------------------------------------------------------------


class IncrementalSave:
    """The tensor-file writer of one save: ``write_checkpoint(..., tensor_writer=IncrementalSave(...))``.

    Per tensor file: hash every chunk, reference known ones that pass their checks (pack present
    with its size, location never found damaged, bytes read back hash right), append the others
    to a pack created for this file (written while later chunks hash), close the pack (durable),
    return the entry; ``finish`` syncs ``objects/`` once before the manifest is written.
    ``checked``: (pack, offset) locations read back recently enough to skip (shared across saves
    by :class:`IncrementalRun`; those this save reads are added with ``save_no``).
    """

    def __init__(
        self, index: ChunkIndex, chunk_bytes: int = CHUNK_BYTES, io: ParallelTensorWriter | None = None,
        *, checked: dict[tuple[str, int], int] | None = None, save_no: int = 0,
    ) -> None:
        if chunk_bytes < 1:
            raise ValueError("chunk_bytes must be >= 1")
        self.index = index
        self.chunk_bytes = chunk_bytes
        self.io = io if io is not None else ParallelTensorWriter(direct=True)
        self.checked = checked if checked is not None else {}
        self.save_no = save_no
        self.written_bytes = 0
        self.reused_bytes = 0
        self.reverified_bytes = 0
        self.new_packs = 0
        self._stats: PackStats | None = None
        self._handles: dict[str, BinaryIO] = {}

    # -- checks before a stored chunk is referenced --

    def _pack_ok(self, storage: Storage, pack: str) -> bool:
        if self._stats is None:
            self._stats = PackStats(storage)
        expected = self.index.pack_size.get(pack)
        problem = self._stats.problem(pack, expected) if expected is not None else "has no recorded size"
        if problem is None:
            return True
        if expected is not None and self._stats.missing_or_resized(pack, expected):
            record_distrust(storage, pack, None, reason=f"save: {problem}")
            self.index.drop(pack)
        else:  # could not even stat it: do not reference it in this save
            log.warning("Not reusing chunks of %s in this save: %s", storage.describe(pack_path(pack)), problem)
            self.index.drop(pack)
        return False

    def _bytes_ok(self, storage: Storage, pack: str, offset: int, size: int, digest: str) -> bool:
        rel = pack_path(pack)
        try:
            fh = self._handles.get(rel)
            if fh is None:
                fh = self._handles[rel] = storage.open_read(rel)
            buf = bytearray(size)
            fh.seek(offset)
            got = read_full(fh, memoryview(buf))
        except (CheckpointError, OSError) as e:
            log.warning("Not reusing a chunk of %s in this save: reading it back failed (%s)", storage.describe(rel), e)
            self.index.drop(pack, offset)
            return False
        self.reverified_bytes += got
        if got == size and digest_bytes(memoryview(buf)) == digest:
            return True
        what = "is truncated" if got != size else "does not match its digest"
        record_distrust(storage, pack, offset, digest=digest, reason=f"save: the chunk at offset {offset} {what}")
        self.index.drop(pack, offset)
        return False

    def _reuse(self, storage: Storage, digest: str, size: int, pack_now: str) -> tuple[str, int] | None:
        """The first copy of ``digest`` that passes its checks, or None (write it again)."""
        for pack, offset in self.index.candidates(digest, size):
            if pack == pack_now:  # written earlier in this very file
                return pack, offset
            if not self._pack_ok(storage, pack):
                continue
            if (pack, offset) in self.checked or self._bytes_ok(storage, pack, offset, size, digest):
                self.checked.setdefault((pack, offset), self.save_no)
                return pack, offset
        return None

    def _close_handles(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()

    # -- one tensor file --

    def __call__(self, storage: Storage, rel: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        _, table = plan_tensor_file(tensors)
        pack = new_pack_name()
        packs: dict[str, int] = {}  # every pack the entry references
        root = xxhash.xxh3_128()
        written: list[int] = []  # offsets of the chunks written into ``pack``
        try:
            size = self._write_pack(storage, pack, self._new_chunks(storage, tensors, table, pack, packs, root, written))
        except BaseException:
            self.index.drop(pack)  # never reference what did not become durable
            raise
        finally:
            self._close_handles()
        if size is not None:
            packs[pack] = self.index.pack_size[pack] = self.index.pack_live[pack] = size
            self.checked.update(((pack, o), self.save_no) for o in written)  # hashed as written
        return {
            "kind": KIND,
            "size": sum(e["offsets"][1] - e["offsets"][0] for e in table.values()),
            "chunk_size": self.chunk_bytes,
            "xxh3_128": root.hexdigest(),
            "packs": packs,
            "tensors": table,
        }

    def _new_chunks(
        self, storage: Storage, tensors: Mapping[str, torch.Tensor], table: dict[str, dict[str, Any]], pack: str,
        packs: dict[str, int], root: Any, written: list[int],
    ) -> Iterator[Segment]:
        """Hash every chunk in order, fill ``table``'s chunk lists and ``root``; yield the chunks
        to write into ``pack`` (what is stored is referenced; ``packs`` gets the other packs).
        Lazy: on local disks the pack's first pieces are written while later chunks hash."""
        pos = 0
        for tname, t in tensors.items():
            view = tensor_view(t)
            chunks = []
            for start in range(0, len(view), self.chunk_bytes):
                part = view[start : start + self.chunk_bytes]
                digest = digest_bytes(part)
                root.update(bytes.fromhex(digest))
                hit = self._reuse(storage, digest, len(part), pack)
                if hit is None:
                    hit = (pack, pos)
                    self.index.add(digest, len(part), pack, pos)
                    written.append(pos)
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

    def _write_pack(self, storage: Storage, pack: str, todo: Iterator[Segment]) -> int | None:
        """Write what ``todo`` yields into the new pack ``pack``, durably (created only when
        something is new: None when nothing was); its size."""
        first = next(todo, None)
        if first is None:
            return None
        storage.makedirs(OBJECTS)
        if storage.is_symlink(OBJECTS):  # the packs would land in another folder (run)
            raise StorageError(
                f"{storage.describe(OBJECTS)} is a symbolic link; ckptguard never writes "
                "through a link inside a run (the packs would land in another run's folder "
                "and be read back by none). Replace the link by a real folder, then save again."
            )
        writer = storage.create(pack_path(pack))
        try:  # local files: the parallel O_DIRECT path; elsewhere one stream
            size = self.io.write_segments_to(writer, itertools.chain([first], todo))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        self.new_packs += 1
        return size

    def finish(self, storage: Storage) -> None:
        """Before the manifest is written: make the new packs' names durable (one directory
        sync per save, not one per pack)."""
        if self.new_packs:
            storage.sync_dir(OBJECTS)
