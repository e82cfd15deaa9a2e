"""MANIFEST.json: the commit marker and single source of truth of a checkpoint.

The manifest is versioned JSON. It is written last; a checkpoint exists if and only if its
manifest exists and checks out. Everything read from it is validated before use: a manifest is
untrusted input (no path may leave the checkpoint directory, no size may exceed the file, no
dtype or shape may disagree with the byte ranges).

Schema (``format_version`` 1)::

    {"format": "ckptguard", "format_version": 1, "step": 1200, "name": "step-000001200",
     "created": "2026-11-23T14:00:00Z", "created_unix": 1.8e9, "save_seconds": 0.4,
     "reason": "periodic" | "forced" | "preemption" | ...,
     "checksum": "xxh3-128",
     "files": {"model.safetensors": {"kind": "tensors", "size": ..., "header_size": ...,
                                     "header_xxh3_128": ..., "xxh3_128": ...,
                                     "tensors": {"w": {"dtype": "F32", "shape": [2, 3],
                                                       "offsets": [0, 24], "xxh3_128": ...}}},
               "state.json": {"kind": "blob", "size": ..., "xxh3_128": ...}},
     "metrics": {...}, "config_hash": "sha256:..." | null, "environment": {...},
     "probe": null | {...}, "verification": {"status": "unverified" | "verified" | "failed"},
     "extra": {...},
     "manifest_xxh3_128": "<xxh3-128 of every byte of the file before this member>"}
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from ckptguard.errors import (
    CheckpointError,
    CorruptCheckpointError,
    FormatVersionError,
    InvalidStepError,
    UnsafeCheckpointError,
)
from ckptguard.format import safejson
from ckptguard.format.tensorfile import MAX_HEADER, digest_bytes, numel

__all__ = [
    "FILE_KIND_VALIDATORS",
    "FORMAT_VERSION",
    "MANIFEST",
    "PACK_RE",
    "STATUS",
    "as_step",
    "check_hex",
    "check_int",
    "checkpoint_name",
    "encode_manifest",
    "malformed",
    "parse_manifest",
    "parse_step",
    "safe_relpath",
    "validate_chunked",
    "validate_manifest",
    "validate_tensor_table",
]

FORMAT = "ckptguard"
FORMAT_VERSION = 1
MANIFEST = "MANIFEST.json"
STATUS = "STATUS.json"
# Parse limits (a manifest is untrusted input), far above any real checkpoint: a few files, or
# ~260 bytes per tensor in an incremental one (64 MiB is 80,000 tensors with their optimizer
# state). Checked before parsing, so a hostile manifest costs a stat, or one read and a byte
# count, never seconds or gigabytes. encode_manifest refuses to write what would be refused.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_MANIFEST_FILES = 100_000
_NAME_RE = re.compile(r"^step-(\d{9,})$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
# The name of a pack of shared chunks (``RUN/objects/``): creation time in unix ms, 8 random hex.
# Only such names are read or deleted: never a path taken from a manifest.
PACK_RE = re.compile(r"^p-(\d{13})-([0-9a-f]{8})\.pack$")

ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


def as_step(step: object, where: str = "") -> int:
    """``step`` as a checkpoint's step number: an integer >= 0 (a numpy integer, an integer
    0-dim tensor or a whole float such as ``5.0`` count); InvalidStepError otherwise."""
    if not isinstance(step, bool):
        if isinstance(step, float) and step.is_integer():
            step = int(step)
        try:
            value = operator.index(step)  # type: ignore[arg-type]
        except TypeError:
            value = None
        if value is not None and value >= 0:
            return int(value)
    raise InvalidStepError(
        f"{where + ': ' if where else ''}save(step={step!r}): a checkpoint's step must be a whole number >= 0 (the count of "
        "optimizer steps or batches so far); pass int(step). Nothing was saved."
    )


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


def parse_step(name: str) -> int | None:
    m = _NAME_RE.match(name)
    return int(m.group(1)) if m else None


def safe_relpath(name: object, where: str) -> str:
    """Accept only plain relative paths inside the checkpoint directory."""
    if not isinstance(name, str) or not name or len(name) > 512:
        raise UnsafeCheckpointError(f"{where}: file name {name!r} is not a valid name.", path=where)
    parts = name.split("/")
    for part in parts:
        if part in ("", ".", "..") or not _SEGMENT_RE.match(part):
            raise UnsafeCheckpointError(
                f"{where}: refusing file path {name!r}: it is absolute, climbs out of the "
                "checkpoint directory or has unsafe characters. The manifest is hostile or "
                "damaged; do not load this checkpoint.",
                path=where,
            )
    return name


def malformed(where: str, what: str) -> CorruptCheckpointError:
    """The error for a manifest (or a manifest-like record) at ``where`` that breaks the schema:
    ``what`` names the field and what was found."""
    return CorruptCheckpointError(
        f"{where}: malformed manifest: {what}. The checkpoint is damaged or was not written by "
        "ckptguard; restore skips it ('ckptguard verify' gives details).",
        path=where,
    )


def check_int(v: object, where: str, what: str, lo: int = 0) -> int:
    """``v`` when it is an integer >= ``lo`` (a bool is not); :func:`malformed` otherwise."""
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise malformed(where, f"{what} must be an integer >= {lo}, found {v!r}")
    return v


def check_hex(v: object, where: str, what: str) -> str:
    """``v`` when it is a 128-bit lowercase hex digest (xxh3-128); :func:`malformed` otherwise."""
    if not isinstance(v, str) or not _HEX32.match(v):
        raise malformed(where, f"{what} must be a 128-bit hex digest, found {v!r}")
    return v


def _validate_blob(entry: dict[str, Any], where: str, name: str) -> None:
    check_int(entry.get("size"), where, f"files[{name!r}].size")
    check_hex(entry.get("xxh3_128"), where, f"files[{name!r}].xxh3_128")


def validate_tensor_table(table: object, where: str, name: str) -> int:
    """Check a tensor table; return the data length it covers."""
    if not isinstance(table, dict):
        raise malformed(where, f"files[{name!r}].tensors must be an object")
    pos = 0
    ordered = []
    for tname, info in table.items():
        if not isinstance(info, dict):
            raise malformed(where, f"tensor {tname!r} entry must be an object")
        dtype = info.get("dtype")
        if dtype not in ITEMSIZE:
            raise malformed(where, f"tensor {tname!r} has unknown dtype {dtype!r}")
        shape = info.get("shape")
        if not isinstance(shape, list) or len(shape) > 64:
            raise malformed(where, f"tensor {tname!r} has a bad shape {shape!r}")
        for d in shape:
            check_int(d, where, f"tensor {tname!r} dimension")
        offsets = info.get("offsets")
        if not isinstance(offsets, list) or len(offsets) != 2:
            raise malformed(where, f"tensor {tname!r} has bad offsets {offsets!r}")
        b, e = (check_int(x, where, f"tensor {tname!r} offset") for x in offsets)
        if e - b != numel(shape) * ITEMSIZE[dtype]:
            raise malformed(
                where,
                f"tensor {tname!r}: byte range {b}..{e} does not hold a {dtype} tensor of shape "
                f"{shape}",
            )
        if "xxh3_128" in info:
            check_hex(info["xxh3_128"], where, f"tensor {tname!r} digest")
        ordered.append((b, e, tname))
    for b, e, tname in sorted(ordered):
        if b != pos:
            raise malformed(where, f"tensor {tname!r} starts at {b}, expected {pos} (gap or overlap)")
        pos = e
    return pos


def _validate_tensors(entry: dict[str, Any], where: str, name: str) -> None:
    size = check_int(entry.get("size"), where, f"files[{name!r}].size")
    header = check_int(entry.get("header_size"), where, f"files[{name!r}].header_size", lo=8)
    if header > MAX_HEADER + 8:
        raise malformed(where, f"files[{name!r}] header of {header} bytes is implausibly large")
    check_hex(entry.get("header_xxh3_128"), where, f"files[{name!r}].header_xxh3_128")
    check_hex(entry.get("xxh3_128"), where, f"files[{name!r}].xxh3_128")
    data = validate_tensor_table(entry.get("tensors"), where, name)
    for tname, info in entry["tensors"].items():
        if "xxh3_128" not in info:
            raise malformed(where, f"tensor {tname!r} has no digest")
    if header + data != size:
        raise malformed(where, f"files[{name!r}] size {size} != header {header} + data {data}")


def validate_chunked(entry: dict[str, Any], where: str, name: str) -> None:
    """A ``chunked`` entry (an incremental checkpoint's tensor file, see
    :mod:`ckptguard.persist.incremental`): every field checked; pack names must match PACK_RE and
    every chunk must lie inside its pack."""
    size = check_int(entry.get("size"), where, f"files[{name!r}].size")
    check_int(entry.get("chunk_size"), where, f"files[{name!r}].chunk_size", lo=1)
    check_hex(entry.get("xxh3_128"), where, f"files[{name!r}].xxh3_128")
    packs = entry.get("packs")
    if not isinstance(packs, dict):
        raise malformed(where, f"files[{name!r}].packs must be an object")
    for pname, psize in packs.items():
        if not PACK_RE.match(pname):
            raise malformed(where, f"files[{name!r}] names an object {pname!r} that is not a pack name")
        check_int(psize, where, f"files[{name!r}].packs[{pname!r}]")
    data = validate_tensor_table(entry.get("tensors"), where, name)
    if data != size:
        raise malformed(where, f"files[{name!r}] size {size} != tensor bytes {data}")
    for tname, info in entry["tensors"].items():
        _validate_chunks(info.get("chunks"), packs, info["offsets"], where, tname)


def _validate_chunks(chunks: object, packs: dict[str, Any], offsets: list[int], where: str, tname: str) -> None:
    if not isinstance(chunks, list):
        raise malformed(where, f"tensor {tname!r} has no chunk list")
    total = 0
    for c in chunks:
        if not isinstance(c, dict):
            raise malformed(where, f"tensor {tname!r} has a malformed chunk {c!r}")
        check_hex(c.get("digest"), where, f"tensor {tname!r} chunk digest")
        n = check_int(c.get("size"), where, f"tensor {tname!r} chunk size", lo=1)
        off = check_int(c.get("offset"), where, f"tensor {tname!r} chunk offset")
        if c.get("pack") not in packs or off + n > packs[c["pack"]]:
            raise malformed(where, f"tensor {tname!r} chunk lies outside its pack {c.get('pack')!r}")
        total += n
    b, e = offsets
    if total != e - b:
        raise malformed(where, f"tensor {tname!r}: chunks hold {total} bytes, the tensor {e - b}")


# The file kinds a manifest may list, each with the check of its entry (a new kind is added here).
FILE_KIND_VALIDATORS: Mapping[str, Callable[[dict[str, Any], str, str], None]] = MappingProxyType({
    "blob": _validate_blob,
    "tensors": _validate_tensors,
    "chunked": validate_chunked,
})


def _check_version(version: object, where: str) -> None:
    if not isinstance(version, int) or isinstance(version, bool):
        raise malformed(where, f"format_version must be an integer, found {version!r}")
    if version > FORMAT_VERSION or version < 1:
        raise FormatVersionError(
            f"{where} was written in checkpoint format version {version}; this ckptguard reads "
            f"up to version {FORMAT_VERSION}. Upgrade ckptguard ('pip install -U ckptguard') to "
            "read it."
        )


def validate_manifest(data: object, where: str) -> dict[str, Any]:
    """Validate parsed manifest data; return it or raise a CheckpointError subclass."""
    if not isinstance(data, dict):
        raise malformed(where, "top level must be an object")
    if data.get("format") != FORMAT:
        raise malformed(where, f"'format' must be {FORMAT!r}, found {data.get('format')!r}")
    _check_version(data.get("format_version"), where)
    check_int(data.get("step"), where, "step")
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        raise malformed(where, "'files' must be a non-empty object")
    if len(files) > MAX_MANIFEST_FILES:
        raise _too_many_files(where, len(files))
    for name, entry in files.items():
        safe_relpath(name, where)
        if name in ("MANIFEST.json", "STATUS.json"):
            raise malformed(where, f"files lists the reserved name {name!r}")
        if not isinstance(entry, dict):
            raise malformed(where, f"files[{name!r}] must be an object")
        kind = entry.get("kind")
        validator = FILE_KIND_VALIDATORS.get(kind)  # type: ignore[arg-type]
        if validator is None:
            raise malformed(where, f"files[{name!r}] has unknown kind {kind!r}")
        validator(entry, where, name)
    for key, typ in (("metrics", dict), ("environment", dict), ("extra", dict)):
        if key in data and data[key] is not None and not isinstance(data[key], typ):
            raise malformed(where, f"{key!r} must be an object")
    return data


# The manifest checksums itself: its last member is the xxh3-128 of every byte before it, so a
# flipped byte anywhere in MANIFEST.json (a digit of a metric, a space) is detected too.
SELF_DIGEST_KEY = "manifest_xxh3_128"
_TAIL = re.compile(rb',\n "' + SELF_DIGEST_KEY.encode() + rb'": "([0-9a-f]{32})"\n\}\n\Z')


def encode_manifest(manifest: dict[str, Any]) -> bytes:
    """The bytes of MANIFEST.json: one line per field and per file, ending with its own checksum.

    Only the two outer levels are indented: a file entry's tensor table is one compact line.
    ``json.dumps(indent=...)`` runs the pure-Python encoder, 2-5x slower than the C one on the
    thousands of entries an incremental manifest holds (30-50 ms per save measured).
    """
    body = {k: v for k, v in manifest.items() if k != SELF_DIGEST_KEY}
    assert body, "a manifest is a non-empty JSON object"

    def compact(v: Any) -> str:
        return json.dumps(v, separators=(",", ":"))

    def field(k: str, v: Any) -> str:
        if k == "files" and isinstance(v, dict) and v:
            inner = ",\n".join(f"  {compact(name)}: {compact(entry)}" for name, entry in v.items())
            return f" {compact(k)}: {{\n{inner}\n }}"
        return f" {compact(k)}: {compact(v)}"

    prefix = ("{\n" + ",\n".join(field(k, v) for k, v in body.items())).encode()
    if len(prefix) > MAX_MANIFEST_BYTES - 100 or len(body.get("files") or ()) > MAX_MANIFEST_FILES:
        raise CheckpointError(
            f"The manifest of step {body.get('step')} would be {len(prefix)} bytes with "
            f"{len(body.get('files') or ())} files, over what ckptguard reads back "
            f"({MAX_MANIFEST_BYTES} bytes, {MAX_MANIFEST_FILES} files); nothing was committed. "
            "Store fewer, larger files (or tensors) per checkpoint."
        )
    return prefix + b',\n "' + SELF_DIGEST_KEY.encode() + b'": "' + digest_bytes(prefix).encode() + b'"\n}\n'


def _check_self_digest(raw: bytes, where: str) -> None:
    m = _TAIL.search(raw)
    if m is None:
        raise malformed(
            where,
            f"it does not end with its own checksum ({SELF_DIGEST_KEY!r}): the file was truncated, "
            "extended or edited",
        )
    if digest_bytes(raw[: m.start()]) != m.group(1).decode():
        raise CorruptCheckpointError(
            f"{where} does not match its own checksum: bytes of the manifest changed after the "
            "save (bit rot or an edit). Restore skips this checkpoint; 'ckptguard verify' gives "
            "details.",
            path=where,
            file=MANIFEST,
        )


def _too_many_files(where: str, n: int) -> CorruptCheckpointError:
    return malformed(
        where,
        f"it lists {n} or more files, more than the {MAX_MANIFEST_FILES} any checkpoint "
        "ckptguard writes has (refused before reading them)",
    )


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """Parse and validate MANIFEST.json bytes (untrusted input), within the parse limits."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise malformed(where, f"{len(raw)} bytes is larger than any manifest ckptguard writes ({MAX_MANIFEST_BYTES})")
    if raw.count(b'"kind":') > MAX_MANIFEST_FILES:  # every file entry has one: count before parsing
        raise _too_many_files(where, raw.count(b'"kind":'))
    try:
        data = safejson.loads(raw)
    except ValueError as e:
        raise malformed(where, f"not valid JSON ({e})") from e
    # The checksum first: nothing in the manifest, format_version included, is believed before
    # it checks out (one flipped bit in the version must read as corruption, not as "upgrade").
    try:
        _check_self_digest(raw, where)
    except CorruptCheckpointError as e:
        declared = data.get("format_version") if isinstance(data, dict) else None
        if isinstance(declared, int) and not isinstance(declared, bool) and declared > FORMAT_VERSION:
            e.args = (
                f"{e} It declares format version {declared} (this ckptguard reads up to "
                f"{FORMAT_VERSION}); only if a newer ckptguard wrote it would upgrading help.",
            )
        raise
    return validate_manifest(data, where)
