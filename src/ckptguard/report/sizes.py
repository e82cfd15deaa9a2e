"""Logical and physical sizes of checkpoints and runs (``ckptguard ls``).

- *logical* size of a checkpoint: the bytes it would take as plain files, i.e. every file entry's
  size in its manifest (for ``chunked`` entries the tensor bytes). ``CheckpointInfo.size_bytes``
  is this figure; ``ckptguard export`` writes about this much.
- *physical* size of a checkpoint: the bytes it added to the run: its own files plus the chunks it
  references that no *older* listed checkpoint references. Summed over the listed checkpoints this
  is what they hold on storage; the first checkpoint of a fine-tuning run carries the frozen body,
  later ones only what changed. For plain checkpoints physical == logical.
- *physical* size of a run: bytes actually on storage: the checkpoints' own files plus every pack
  under ``objects/`` (including bytes no checkpoint references any more, until GC frees them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ckptguard.errors import CheckpointError
from ckptguard.persist.incremental import KIND, OBJECTS, PACK_RE, chunk_refs, pack_path
from ckptguard.run.catalog import CheckpointInfo
from ckptguard.storage.base import Storage

__all__ = ["CheckpointSizes", "RunSizes", "run_sizes"]


@dataclasses.dataclass(frozen=True)
class CheckpointSizes:
    name: str
    logical: int
    physical: int


@dataclasses.dataclass(frozen=True)
class RunSizes:
    checkpoints: dict[str, CheckpointSizes]
    logical: int
    physical: int


def _own_file_bytes(c: CheckpointInfo) -> int:
    if c.manifest is None:
        return 0
    return sum(int(e.get("size", 0)) for e in c.manifest["files"].values() if e.get("kind") != KIND)


def run_sizes(storage: Storage, ckpts: Sequence[CheckpointInfo]) -> RunSizes:
    """Sizes of ``ckpts`` (as listed by ``catalog.scan``, oldest first) and of the whole run."""
    seen: set[tuple[str, int]] = set()
    out: dict[str, CheckpointSizes] = {}
    for c in sorted(ckpts, key=lambda c: c.step):
        added = _own_file_bytes(c)
        if c.manifest is not None:
            for _, size, pack, offset in chunk_refs(c.manifest):
                if (pack, offset) not in seen:
                    seen.add((pack, offset))
                    added += size
        out[c.name] = CheckpointSizes(c.name, c.size_bytes, added)
    physical = sum(_own_file_bytes(c) for c in ckpts)
    for name in storage.listdir(OBJECTS):
        if PACK_RE.match(name):
            try:
                physical += storage.size(pack_path(name))
            except CheckpointError:
                continue
    return RunSizes(out, sum(c.size_bytes for c in ckpts), physical)
