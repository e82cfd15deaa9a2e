"""The tiers of a torch.distributed run: every node holds the whole checkpoint in its own tiers.

Each node's first tier (host memory, or its local disk) is a directory of that node alone. A save
goes through the one save pipeline with that directory as every rank's target, plus two exchanges
over the checkpoint process group (point to point, gloo; the bytes are files, nothing pickled):

1. after each rank wrote its share (its rank file, its shard files) into its node's staging
   directory, the share is sent to the *leader* (lowest rank) of every other node, which writes it
   into its own node's staging directory;
2. after rank 0 committed the checkpoint in node 0's tier, it sends the files it wrote itself (the
   replicated tensors, ``state.json``, ...) and the manifest to every other leader, which writes
   them and commits the same checkpoint (same manifest, same checksums) in its node's tier.

So each node's tier holds a complete checkpoint: the peer replica of every other node's ranks.
Losing a node costs at most the hot interval; its replacement receives the newest checkpoint from
a surviving node at restore (:func:`send_checkpoint`). A replica that fails on one node is logged
and leaves that node without the checkpoint; the save itself stands (node 0 committed it).
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import struct
from collections.abc import Callable, Mapping
from typing import Any, cast

from ckptguard.distributed.coordination import Coordinator, agree, capture_exc
from ckptguard.errors import CheckpointError, CorruptCheckpointError
from ckptguard.format.manifest import MANIFEST, encode_manifest, parse_step
from ckptguard.persist.parallel_io import write_file
from ckptguard.persist.reader import verify_files
from ckptguard.persist.writer import begin_checkpoint, clean_debris, commit_staged
from ckptguard.run.catalog import mark_status, read_manifest
from ckptguard.storage.base import Storage, Writer, join

__all__ = ["Nodes", "Replicator", "nodes_of", "send_checkpoint", "unpack"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">Q")


Blob = bytes | bytearray | memoryview


def unpack(blob: Blob, where: str) -> dict[str, memoryview]:
    """The files of a :func:`_pack_files` message (views into it, nothing copied); CheckpointError for a
    malformed one or a name that would leave the checkpoint's directory."""
    view = memoryview(blob)
    try:
        (n,) = _HEADER.unpack_from(view)
        entries = json.loads(bytes(view[_HEADER.size : _HEADER.size + n]))
        out: dict[str, memoryview] = {}
        at = _HEADER.size + n
        for name, size in entries:
            if not isinstance(name, str) or name.startswith("/") or ".." in name.split("/") or not isinstance(size, int):
                raise ValueError(f"bad entry {name!r}")
            out[name] = view[at : at + size]
            at += size
        if at != len(view):
            raise ValueError(f"{len(view) - at} trailing bytes")
    except (ValueError, TypeError, struct.error) as e:
        raise CheckpointError(f"A malformed replica message for {where}: {e}") from e
    return out


class Nodes:
    """Which ranks share a node (the same first-tier directory on the same host); node 0 holds
    rank 0; each node's leader is its lowest rank."""

    def __init__(self, keys: list[str], rank: int) -> None:
        order: dict[str, list[int]] = {}
        for r, key in enumerate(keys):
            order.setdefault(key, []).append(r)
        self.groups = sorted(order.values(), key=min)
        self.rank = rank
        self.index = next(i for i, g in enumerate(self.groups) if rank in g)

    @property
    def leaders(self) -> list[int]:
        return [g[0] for g in self.groups]

    @property
    def is_leader(self) -> bool:
        return self.groups[self.index][0] == self.rank

    @property
    def count(self) -> int:
        return len(self.groups)

    def node_of(self, rank: int) -> int:
        return next(i for i, g in enumerate(self.groups) if rank in g)


def nodes_of(coord: Coordinator, first_root: str) -> Nodes:
    """Agree on the nodes (a collective: every rank calls it at the same point)."""
    key = f"{socket.gethostname()}:{os.path.realpath(first_root)}"
    return Nodes(coord.all_gather(key), coord.rank)


def _pack_files(storage: Storage, base: str, names: list[str], extra: Mapping[str, bytes] | None = None) -> bytearray:
    """The files ``base/name`` (and ``extra``) as one message, read straight into it: an 8-byte
    header length, a JSON list of [name, size], the bytes."""
    sizes = {name: storage.size(join(base, name)) for name in names}
    header = json.dumps([[n, size] for n, size in sizes.items()] + [[n, len(d)] for n, d in (extra or {}).items()]).encode()
    out = bytearray(_HEADER.size + len(header) + sum(sizes.values()) + sum(len(d) for d in (extra or {}).values()))
    _HEADER.pack_into(out, 0, len(header))
    view, at = memoryview(out), _HEADER.size
    view[at : at + len(header)] = header
    at += len(header)
    for name, size in sizes.items():
        with storage.open_read(join(base, name)) as f:
            end = at + size
            while at < end:
                got = cast(io.RawIOBase, f).readinto(view[at:end])  # unbuffered (see Storage.open_read)
                if not got:
                    raise CheckpointError(f"{storage.describe(join(base, name))} is shorter than it was ({size} bytes)")
                at += got
    for data in (extra or {}).values():
        view[at : at + len(data)] = data
        at += len(data)
    return out


def _write_files(storage: Storage, base: str, files: Mapping[str, Blob]) -> None:
    """Write ``files`` (their checksums are in the manifest that comes with them: not hashed here)."""
    for name, data in files.items():
        if "/" in name:  # a sharded checkpoint's dcp/ files
            storage.makedirs(join(base, name.rsplit("/", 1)[0]))
        write_file(storage, join(base, name), _writer(data))


def _writer(data: Blob) -> Callable[[Writer], None]:
    def body(w: Writer) -> None:
        w.write(memoryview(data))

    return body


class Replicator:
    """The two exchanges of a distributed tiered save (see the module docstring), for one rank.

    ``target``: this node's first tier; ``on_commit(name)``: a checkpoint was committed in it by
    this leader (not rank 0: its own commit goes through the pipeline's bookkeeping)."""

    def __init__(self, target: Storage, nodes: Nodes, on_commit: Callable[[str], None]) -> None:
        self.target = target
        self.nodes = nodes
        self.on_commit = on_commit
        self._cleaned = False

    def prepare(self, coord: Coordinator, staging: str) -> None:
        """Every leader but rank 0 (which created it) creates ``staging`` in its node's tier,
        cleaning the debris of cut-short saves there first (once); then the ranks agree."""
        def make() -> None:
            if self.nodes.is_leader and coord.rank != 0:
                if not self._cleaned:
                    clean_debris(self.target)
                    self._cleaned = True
                self.target.makedirs(staging)

        _, exc = capture_exc(make)
        if exc is not None:
            self._cleaned = False
        agree(coord, exc, self.target.describe(staging), "save")

    def send_shares(self, coord: Coordinator, staging: str, share: Mapping[str, Any]) -> None:
        """Exchange 1: this rank's share to every other node's leader; a leader writes the shares
        of other nodes' ranks into its staging directory. A failure raises on every rank."""
        nodes = self.nodes
        blob, exc = capture_exc(lambda: _pack_files(self.target, staging, sorted(share)))
        sizes = coord.all_gather(-1 if blob is None else len(blob))
        agree(coord, exc or (CheckpointError("another rank could not read its share") if min(sizes) < 0 else None),
              self.target.describe(staging), "save")
        assert blob is not None
        mine = nodes.index
        outgoing = {leader: blob for i, leader in enumerate(nodes.leaders) if i != mine}
        incoming = ({r: sizes[r] for r in range(coord.world_size) if nodes.node_of(r) != mine} if nodes.is_leader else {})
        received = coord.exchange(outgoing, incoming)

        def write() -> None:
            for src, data in sorted(received.items()):
                _write_files(self.target, staging, unpack(data, f"rank {src}'s share"))

        _, exc = capture_exc(write)
        if exc is not None:
            self._cleaned = False
        agree(coord, exc, self.target.describe(staging), "save")

    def send_commit(self, coord: Coordinator, staging: str, manifest: Mapping[str, Any], shared: set[str]) -> None:
        """Exchange 2: rank 0 sends the committed checkpoint's files other nodes lack (not in
        ``shared``: the ranks' shares) and its manifest; each other leader commits the same
        checkpoint in its node's tier. A node that fails is logged (the checkpoint stands)."""
        nodes = self.nodes
        name = str(manifest.get("name", ""))
        blob: bytearray | None = None
        if coord.rank == 0:
            names = sorted(set(manifest["files"]) - shared)
            blob, exc = capture_exc(lambda: _pack_files(self.target, name, names, {MANIFEST: encode_manifest(dict(manifest))}))
            if exc is not None:
                log.error("Could not read %s to replicate it to the other nodes: %s", self.target.describe(name), exc)
        size = coord.broadcast(len(blob) if blob is not None else -1)  # rank 0's
        if size < 0:
            return
        outgoing = {leader: blob for leader in nodes.leaders[1:]} if coord.rank == 0 and blob is not None else {}
        incoming = {0: size} if nodes.is_leader and coord.rank != 0 else {}
        received = coord.exchange(outgoing, incoming)
        if 0 in received:
            _, exc = capture_exc(lambda: self._commit(staging, name, received[0]))
            if exc is not None:
                self._cleaned = False
                log.error("Node %d (rank %d) could not commit its replica of %s: %s", nodes.index, coord.rank, name, exc)
            else:
                self.on_commit(name)

    def _commit(self, staging: str, name: str, blob: memoryview) -> None:
        files = unpack(blob, self.target.describe(name))
        manifest = json.loads(bytes(files.pop(MANIFEST)))
        _write_files(self.target, staging, files)
        commit_staged(self.target, name, staging, manifest)


def send_checkpoint(
    coord: Coordinator, name: str, sender: int, receivers: list[int], source: Storage | None, dest: Storage
) -> None:
    """At restore: ``sender`` (a leader whose node holds ``name`` in ``source``) checks it against
    its checksums and sends it whole to the ``receivers`` (leaders of nodes without it), which
    commit it in ``dest`` (their node's first tier). Raises on every rank when the sender's copy
    is damaged (it is marked corrupt there) or a receiver failed; the ranks then agree again."""
    blob: bytearray | None = None
    exc: BaseException | None = None
    if coord.rank == sender:
        assert source is not None

        def read() -> bytearray:
            manifest = read_manifest(source, name)
            problems = verify_files(source, name, manifest)
            if problems:
                why = f"{problems[0][0]}: {problems[0][1]}"
                mark_status(source, name, "corrupt", why)
                raise CorruptCheckpointError(f"{source.describe(name)} fails its checksums ({why}); not sent to the other nodes.",
                                             path=source.describe(name), file=problems[0][0])
            return _pack_files(source, name, sorted(manifest["files"]), {MANIFEST: encode_manifest(manifest)})

        blob, exc = capture_exc(read)
    size = coord.all_gather(len(blob) if blob is not None else 0)[sender]
    agree(coord, exc, f"{name} on rank {sender}'s node", "restore")
    outgoing = {r: blob for r in receivers} if coord.rank == sender and blob is not None else {}
    received = coord.exchange(outgoing, {sender: size} if coord.rank in receivers else {})
    exc = None
    if sender in received:
        def commit() -> None:
            files = unpack(received[sender], dest.describe(name))
            manifest = json.loads(bytes(files.pop(MANIFEST)))
            step = parse_step(name)
            if step is None or manifest.get("name") != name:
                raise CheckpointError(f"rank {sender} sent {manifest.get('name')!r}, not {name!r}")
            staging = begin_checkpoint(dest, step)
            _write_files(dest, staging, files)
            commit_staged(dest, name, staging, manifest)
            log.info("Received %s from rank %d's node (its replica): %d bytes, committed in %s", name, sender,
                     len(received[sender]), dest.describe(name))

        _, exc = capture_exc(commit)
    agree(coord, exc, dest.describe(name), "restore")
