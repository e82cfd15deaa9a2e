"""Reading a committed checkpoint back, verifying every byte against its manifest.

The file kinds are fixed by the format (:data:`ckptguard.format.manifest.FILE_KIND_VALIDATORS`):
``READERS[kind]`` reads the tensors of a ``tensors`` (a local safetensors file) or ``chunked``
entry (an incremental checkpoint's chunks, :mod:`ckptguard.persist.chunked_read`) and
``VERIFIERS[kind]`` checks a file without keeping data; ``blob`` files are small (JSON, YAML) and
read whole. Both mappings are read-only: a new kind is added here, by hand.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import xxhash

from ckptguard.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StorageError,
    StorageUnavailableError,
    UnsafeCheckpointError,
)
from ckptguard.format import safejson
from ckptguard.format.tensorfile import CHUNK, check_header, digest_bytes, read_tensor_file
from ckptguard.persist.chunked_read import read_chunked, verify_chunked
from ckptguard.persist.parallel_io import read_ahead
from ckptguard.storage.base import Storage, join

if TYPE_CHECKING:  # reading tensors imports torch; verifying bytes does not
    import torch

__all__ = ["NOT_EVIDENCE", "CheckpointReader", "READERS", "VERIFIERS", "verify_files"]

TensorReader = Callable[..., "dict[str, torch.Tensor]"]
MAX_JSON_BYTES = 256 * 1024 * 1024  # a blob read whole (state.json, config.yaml, a rank file)


def _read_local_tensors(
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
    rel = join(ckpt, fname)
    where = _sized_blob(storage, rel, fname, entry)
    with storage.open_read(rel) as fh:
        read_ahead(fh)
        try:
            return read_tensor_file(
                fh, entry, where, targets=targets, names=names, verify=verify, keep=keep
            )
        except CorruptCheckpointError as e:
            e.file = fname
            raise


READERS: Mapping[str, TensorReader] = MappingProxyType({"tensors": _read_local_tensors, "chunked": read_chunked})


def _verify_tensors(storage: Storage, ckpt: str, fname: str, entry: Mapping[str, Any]) -> None:
    _read_local_tensors(storage, ckpt, fname, entry, keep=False)


def _verify_blob(storage: Storage, ckpt: str, fname: str, entry: Mapping[str, Any]) -> None:
    if entry["size"] <= MAX_JSON_BYTES:
        read_blob(storage, ckpt, fname, entry)
        return
    rel = join(ckpt, fname)  # a large blob (a DCP shard): hashed as it streams, never held whole
    where = _sized_blob(storage, rel, fname, entry)
    h = xxhash.xxh3_128()
    with storage.open_read(rel) as fh:
        while part := fh.read(CHUNK):
            h.update(part)
    if h.hexdigest() != entry["xxh3_128"]:
        raise _checksum_mismatch(where, fname)


def _sized_blob(storage: Storage, rel: str, fname: str, entry: Mapping[str, Any]) -> str:
    """Where a file of a checkpoint is, once it is known to be no symlink and of the size the manifest recorded."""
    where = storage.describe(rel)
    if storage.is_symlink(rel):
        raise UnsafeCheckpointError(f"{where} is a symbolic link; refusing to follow it.", path=where)
    size = storage.size(rel)
    if size != entry["size"]:
        raise CorruptCheckpointError(
            f"{where} is {size} bytes, the manifest recorded {entry['size']}: the file was truncated or "
            "overwritten.",
            path=where,
            file=fname,
        )
    return where


def _checksum_mismatch(where: str, fname: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{where} does not match its checksum in the manifest: the bytes changed after the "
        "save (bit rot or tampering).",
        path=where,
        file=fname,
    )


VERIFIERS: Mapping[str, Callable[[Storage, str, str, Mapping[str, Any]], None]] = MappingProxyType({
    "tensors": _verify_tensors,
    "blob": _verify_blob,
    "chunked": verify_chunked,
})


def read_blob(storage: Storage, ckpt: str, fname: str, entry: Mapping[str, Any]) -> bytes:
    rel = join(ckpt, fname)
    where = _sized_blob(storage, rel, fname, entry)
    data = storage.read_bytes(rel)
    if digest_bytes(data) != entry["xxh3_128"]:
        raise _checksum_mismatch(where, fname)
    return data


# How verify_files starts a problem that says nothing about the stored bytes (never marks corrupt).
NOT_EVIDENCE = "could not be read (not evidence of damage; not marked corrupt): "


def verify_files(
    storage: Storage, ckpt: str, manifest: Mapping[str, Any]
) -> list[tuple[str, str]]:
    """Check every file of a checkpoint; return ``(file, problem)`` pairs (empty when sound)."""
    problems = []
    for fname, entry in manifest["files"].items():
        try:
            VERIFIERS[entry["kind"]](storage, ckpt, fname, entry)
        except StorageUnavailableError:
            raise  # the network, not the checkpoint
        except CheckpointNotFoundError:
            problems.append((fname, f"{storage.describe(join(ckpt, fname))} is listed in the manifest but "
                             "missing (deleted or lost): the checkpoint is damaged; restore falls back "
                             "to an older one."))
        except StorageError as e:  # permissions, a path part that is a file, EIO: not evidence
            problems.append((fname, f"{NOT_EVIDENCE}{e}"))
        except CheckpointError as e:
            problems.append((fname, str(e)))
    return problems


class CheckpointReader:
    """Verified access to the files of one committed checkpoint.

    ``verify``: whether tensor reads hash every byte against the manifest (the default of
    :meth:`tensors`; ``CheckpointManager(verify_on_restore=False)`` turns it off). Small files
    (``state.json``, ``config.yaml``) are always checked.
    """

    def __init__(self, storage: Storage, name: str, manifest: dict[str, Any], *, verify: bool = True) -> None:
        self.storage = storage
        self.name = name
        self.manifest = manifest
        self.verify = verify
        self.checked: set[str] = set()  # files whose every byte was verified by a read

    def verify_unread(self) -> None:
        """Verify every file of the manifest no read has checked yet (config.yaml, extras...)."""
        for fname, entry in self.manifest["files"].items():
            if fname in self.checked:
                continue
            verifier = VERIFIERS.get(entry["kind"])
            if verifier is None:
                continue
            try:
                verifier(self.storage, self.name, fname, entry)
            except CorruptCheckpointError as e:
                e.file = e.file or fname
                raise
            self.checked.add(fname)

    def check_headers(self) -> None:
        """Check every local tensor file's safetensors header before any data is used.

        The header must match its checksum and describe exactly the manifest's tensors (dtype,
        shape, offsets); a consistent but lying manifest is refused here, before any shape in it
        is compared with a live model.
        """
        for fname, entry in self.manifest["files"].items():
            if entry["kind"] != "tensors":
                continue
            rel = join(self.name, fname)
            where = self.storage.describe(rel)
            if self.storage.is_symlink(rel):
                raise UnsafeCheckpointError(f"{where} is a symbolic link; refusing to follow it.", path=where, file=fname)
            with self.storage.open_read(rel) as fh:
                head = fh.read(int(entry["header_size"]))
            if len(head) != entry["header_size"] or digest_bytes(head) != entry["header_xxh3_128"]:
                raise CorruptCheckpointError(
                    f"{where}: the safetensors header does not match its checksum in the manifest. "
                    "The file is corrupt; restore falls back to an older checkpoint.",
                    path=where,
                    file=fname,
                )
            try:
                check_header(head, entry, where)
            except CorruptCheckpointError as e:
                e.file = fname
                raise

    @property
    def where(self) -> str:
        return self.storage.describe(self.name)

    def has(self, fname: str) -> bool:
        return fname in self.manifest["files"]

    def blob(self, fname: str) -> bytes:
        entry = self.manifest["files"].get(fname)
        if entry is None or entry["kind"] != "blob":
            raise CorruptCheckpointError(
                f"{self.where}: the manifest lists no file {fname!r}.", path=self.where, file=fname
            )
        if entry["size"] > MAX_JSON_BYTES:  # read whole: refused before reading (declared size)
            raise CorruptCheckpointError(
                f"{self.storage.describe(join(self.name, fname))} is declared as {entry['size']} bytes, "
                f"more than the {MAX_JSON_BYTES} a small file of a checkpoint (state.json, config.yaml) "
                "may have. The checkpoint is damaged or hostile; restore skips it.",
                path=self.where,
                file=fname,
            )
        data = read_blob(self.storage, self.name, fname, entry)
        self.checked.add(fname)
        return data

    def json(self, fname: str) -> Any:
        raw = self.blob(fname)
        try:
            return safejson.loads(raw)
        except ValueError as e:
            raise CorruptCheckpointError(
                f"{self.storage.describe(join(self.name, fname))} is not valid JSON ({e}).",
                path=self.where,
                file=fname,
            ) from e

    def tensor_table(self, fname: str) -> dict[str, dict[str, Any]]:
        entry = self.manifest["files"].get(fname)
        return dict(entry["tensors"]) if entry and "tensors" in entry else {}

    def tensors(
        self,
        fname: str,
        *,
        targets: Mapping[str, torch.Tensor] | None = None,
        names: Iterable[str] | None = None,
        verify: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """The tensors of ``fname`` (only ``names`` when given), read into ``targets`` where
        dtype, shape and layout match; ``verify`` (default: the reader's) hashes every byte."""
        verify = self.verify if verify is None else verify
        entry = self.manifest["files"].get(fname)
        if entry is None:
            return {}
        reader = READERS.get(entry["kind"])
        if reader is None:
            raise CorruptCheckpointError(
                f"{self.where}: {fname} is not a tensor file.", path=self.where, file=fname
            )
        out = reader(self.storage, self.name, fname, entry, targets=targets, names=names, verify=verify)
        if verify and (names is None or set(entry.get("tensors", {})) <= set(names)):
            self.checked.add(fname)
        return out
