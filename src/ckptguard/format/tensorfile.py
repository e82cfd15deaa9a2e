"""Tensor files: safetensors on disk, xxh3-128 digests computed on the bytes as they are written.

A tensor file is a standard safetensors file (any safetensors reader loads it). Its manifest entry
records the header's digest and one digest per tensor; the file's ``xxh3_128`` is the digest of
those digests in file order (a two-level Merkle root), so one hashing pass over the bytes gives
both a whole-file checksum and per-tensor checksums (which incremental saves reuse as content
addresses). Reading verifies every byte it reads against those digests.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

import xxhash

from ckptguard.errors import CorruptCheckpointError, UnsupportedStateError
from ckptguard.format import safejson

if TYPE_CHECKING:  # torch is imported where tensors are made: verifying and listing need no torch
    import torch

__all__ = [
    "ByteSink",
    "CHUNK",
    "check_header",
    "destination",
    "DTYPE_TO_ST",
    "ST_ITEMSIZE",
    "ST_TO_DTYPE",
    "dtype_tables",
    "digest_bytes",
    "merkle_root",
    "plan_tensor_file",
    "read_tensor_file",
    "tensor_file_entry",
    "tensor_view",
    "write_tensor_file",
]

CHUNK = 16 * 1024 * 1024
MAX_HEADER = 100 * 1024 * 1024

# safetensors dtype name -> (torch attribute, bytes per element); torch dtypes are looked up lazily
_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8), "F32": ("float32", 4), "F16": ("float16", 2), "BF16": ("bfloat16", 2),
    "I64": ("int64", 8), "I32": ("int32", 4), "I16": ("int16", 2), "I8": ("int8", 1),
    "U8": ("uint8", 1), "BOOL": ("bool", 1), "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1), "U16": ("uint16", 2), "U32": ("uint32", 4), "U64": ("uint64", 8),
}
ST_ITEMSIZE: dict[str, int] = {k: size for k, (_, size) in _DTYPES.items()}
DTYPE_TO_ST: dict[torch.dtype, str]  # provided by __getattr__ below (built on first use)
ST_TO_DTYPE: dict[str, torch.dtype]
_tables: tuple[dict[Any, str], dict[str, Any]] | None = None


class ByteSink(Protocol):
    """Where a tensor file's bytes go, in order (a storage ``Writer`` is one)."""

    def write(self, data: memoryview | bytes) -> None: ...


def dtype_tables() -> tuple[dict[torch.dtype, str], dict[str, torch.dtype]]:
    """``(DTYPE_TO_ST, ST_TO_DTYPE)``, built (importing torch) on first use."""
    global _tables
    if _tables is None:
        import torch

        to_st = {getattr(torch, attr): st for st, (attr, _) in _DTYPES.items()}
        _tables = (to_st, {v: k for k, v in to_st.items()})
    return _tables


def __getattr__(name: str) -> Any:  # PEP 562: DTYPE_TO_ST / ST_TO_DTYPE stay importable names
    if name == "DTYPE_TO_ST":
        return dtype_tables()[0]
    if name == "ST_TO_DTYPE":
        return dtype_tables()[1]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def digest_bytes(data: bytes | memoryview) -> str:
    return xxhash.xxh3_128(data).hexdigest()


def merkle_root(header_digest: str, tensor_digests: Iterable[str]) -> str:
    h = xxhash.xxh3_128(bytes.fromhex(header_digest))
    for d in tensor_digests:
        h.update(bytes.fromhex(d))
    return h.hexdigest()


def tensor_view(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor as a flat memoryview (zero-copy when contiguous)."""
    import torch

    if t.dtype not in dtype_tables()[0]:
        raise UnsupportedStateError(
            f"Tensor dtype {t.dtype} cannot be stored in safetensors. Convert it (e.g. complex to "
            "torch.view_as_real) before saving."
        )
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return t.view(torch.uint8).numpy().data.cast("B")


def plan_tensor_file(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, dict[str, dict[str, Any]]]:
    """Build the safetensors header and the manifest's tensor table (offsets, dtype, shape)."""
    to_st = dtype_tables()[0]
    header: dict[str, Any] = {}
    table: dict[str, dict[str, Any]] = {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in to_st:
            raise UnsupportedStateError(
                f"Tensor {name!r} has dtype {t.dtype}, which safetensors cannot store. Convert it "
                "before saving."
            )
        nbytes = t.numel() * t.element_size()
        info = {"dtype": to_st[t.dtype], "shape": list(t.shape)}
        header[name] = {**info, "data_offsets": [offset, offset + nbytes]}
        table[name] = {**info, "offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, table


def write_tensor_file(
    writer: ByteSink,
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Write ``tensors`` as safetensors through ``writer`` and return the manifest entry.

    The caller closes the writer (which makes the file durable).
    """
    head, table = plan_tensor_file(tensors, metadata)
    writer.write(head)
    for name, t in tensors.items():
        view = tensor_view(t)
        table[name]["xxh3_128"] = digest_bytes(view)
        writer.write(view)
    return tensor_file_entry(head, table)


def tensor_file_entry(head: bytes, table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest entry of a written tensor file; ``table`` holds every tensor's digest."""
    header_digest = digest_bytes(head)
    size = len(head) + sum(e["offsets"][1] - e["offsets"][0] for e in table.values())
    return {
        "kind": "tensors",
        "size": size,
        "header_size": len(head),
        "header_xxh3_128": header_digest,
        "xxh3_128": merkle_root(header_digest, (e["xxh3_128"] for e in table.values())),
        "tensors": table,
    }


def _read_exact_into(fh: BinaryIO, view: memoryview, where: str) -> None:
    pos = 0
    while pos < len(view):
        n = fh.readinto(view[pos:])  # type: ignore[attr-defined]
        if not n:
            raise CorruptCheckpointError(
                f"{where} is truncated: expected {len(view) - pos} more bytes. The file was cut "
                "short (torn write or storage loss); restore falls back to an older checkpoint.",
                path=where,
            )
        pos += n


def read_tensor_file(
    fh: BinaryIO,
    entry: Mapping[str, Any],
    where: str,
    *,
    targets: Mapping[str, torch.Tensor] | None = None,
    names: Iterable[str] | None = None,
    verify: bool = True,
    keep: bool = True,
) -> dict[str, torch.Tensor]:
    """Read (and verify) tensors described by a validated manifest ``entry``.

    ``targets``: tensors to read into in place when dtype, shape and layout match (no second copy).
    ``names``: read only these tensors (all by default). ``keep=False`` only verifies.
    """
    header_size = int(entry["header_size"])
    head = fh.read(header_size)
    if len(head) != header_size:
        raise CorruptCheckpointError(f"{where} is truncated inside its header.", path=where)
    if verify:
        if digest_bytes(head) != entry["header_xxh3_128"]:
            raise CorruptCheckpointError(
                f"{where}: the safetensors header does not match its checksum in the manifest. The "
                "file is corrupt; restore falls back to an older checkpoint.",
                path=where,
            )
        check_header(head, entry, where)
    wanted = set(entry["tensors"]) if names is None else set(names)
    out: dict[str, torch.Tensor] = {}
    scratch: list[bytearray] = []  # one buffer reused for the tensors that are only verified
    for name, info in sorted(entry["tensors"].items(), key=lambda kv: kv[1]["offsets"][0]):
        if name not in wanted:
            continue
        begin, end = info["offsets"]
        fh.seek(header_size + begin)
        dtype = dtype_tables()[1][info["dtype"]] if keep else None
        dest = None if dtype is None else destination(dtype, tuple(info["shape"]), None if targets is None else targets.get(name))
        if dest is not None:
            out[name] = dest
        into = None if dest is None else tensor_view(dest) if end > begin else memoryview(b"")
        found = _read_tensor(fh, into, end - begin, where, scratch, hashing=verify)
        if verify and found != info["xxh3_128"]:
            raise CorruptCheckpointError(
                f"{where}: tensor {name!r} does not match its checksum (expected "
                f"{info['xxh3_128']}, found {found}). The bytes changed after the save "
                "(bit rot or tampering); restore falls back to an older checkpoint.",
                path=where,
            )
    return out


def _read_tensor(
    fh: BinaryIO, into: memoryview | None, nbytes: int, where: str, scratch: list[bytearray], *, hashing: bool
) -> str:
    """Read a tensor's ``nbytes`` into ``into`` (None: through the reused ``scratch`` buffer, at
    most CHUNK bytes); return their xxh3-128 ("" when not ``hashing``)."""
    h = xxhash.xxh3_128()
    for pos in range(0, nbytes, CHUNK):
        n = min(CHUNK, nbytes - pos)
        if into is not None:
            part = into[pos : pos + n]
        else:
            if not scratch or len(scratch[0]) < n:
                scratch[:] = [bytearray(n)]
            part = memoryview(scratch[0])[:n]
        _read_exact_into(fh, part, where)
        if hashing:
            h.update(part)
    return h.hexdigest() if hashing else ""


def destination(
    dtype: torch.dtype, shape: tuple[int, ...], target: torch.Tensor | None, *, keep: bool = True
) -> torch.Tensor | None:
    """Where a tensor read from a checkpoint lands: ``target`` itself when its dtype, shape and
    layout match (read in place, no second copy), else a new CPU tensor; None when only
    verifying (``keep=False``)."""
    if not keep:
        return None
    import torch

    if (
        target is not None
        and target.dtype == dtype
        and tuple(target.shape) == shape
        and target.device.type == "cpu"
        and target.is_contiguous()
    ):
        return target.detach()
    return torch.empty(shape, dtype=dtype)


def check_header(head: bytes, entry: Mapping[str, Any], where: str) -> None:
    """The file's own safetensors header must describe exactly what the manifest says.

    Other safetensors readers trust the file's header, so a manifest whose dtypes, shapes or
    offsets disagree with it is refused (a hostile or mismatched checkpoint).
    """
    def bad(what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{where}: the safetensors header disagrees with the manifest ({what}). The "
            "checkpoint is damaged or hostile; do not load it.",
            path=where,
        )

    (length,) = struct.unpack("<Q", head[:8])
    if length != len(head) - 8:
        raise bad(f"header length field says {length} bytes, the manifest {len(head) - 8}")
    try:
        header = safejson.loads(head[8:])
    except ValueError as e:
        raise bad(f"header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    names = set(header) - {"__metadata__"}
    if names != set(entry["tensors"]):
        raise bad(f"tensor names differ: {sorted(names ^ set(entry['tensors']))[:5]}")
    for name, info in entry["tensors"].items():
        h = header[name]
        if not isinstance(h, dict) or (h.get("dtype"), h.get("shape"), h.get("data_offsets")) != (
            info["dtype"], list(info["shape"]), list(info["offsets"])
        ):
            raise bad(f"tensor {name!r}: file says {h!r}, manifest says {info['dtype']} {info['shape']} at {info['offsets']}")


def numel(shape: Iterable[int]) -> int:
    return math.prod(int(s) for s in shape)
