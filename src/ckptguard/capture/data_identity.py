"""What a saved data position counts over: the dataset's length and a fingerprint of its content.

A sampler position ("epoch 3, sample 5120") only means something over the dataset it was counted
on. :class:`ckptguard.ResumableSampler` records, with its position, a :class:`DatasetIdentity`:

- ``length``: the number of samples the sampler counts over;
- ``version``: what the user declared (``ResumableSampler(ds, dataset_version="v3")``, or a
  ``dataset_version`` attribute of the dataset). When given, the content is never read;
- ``fingerprint``: otherwise a cheap content sample: :data:`SAMPLES` items at indices drawn from
  a fixed seed (every item when the dataset is that small), each hashed (XXH3-128) over its
  bytes (tensors, arrays, bytes, str, numbers, and lists / tuples / dicts / dataclasses of
  them). Items are read in the main process with every global generator seeded per index and
  put back afterwards, so random augmentation neither changes the fingerprint nor moves the
  training run's RNG streams. Items whose reading fails, or that come out different on a second
  read, give no fingerprint (``note`` says why): the length is then all that is compared.

On restore, :func:`dataset_change` compares the recorded identity with today's; a strict restore
raises :class:`DatasetChangedError` (nothing is marked: it is a mismatch, not damage).

>>> ident = identify(dataset, len(dataset))
>>> ident.describe()
'96 samples, content fingerprint xxh3:5d41402abc4b2a76'
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
import xxhash

from ckptguard.errors import DatasetChangedError

__all__ = [
    "SAMPLES",
    "DatasetChangedError",
    "DatasetIdentity",
    "dataset_change",
    "dataset_check",
    "fingerprint",
    "identify",
    "item_digest",
    "order_changes",
    "sample_indices",
    "saved_identity",
    "version_of",
]

log = logging.getLogger(__name__)

SAMPLES = 16  # items read for a fingerprint (all of them when the dataset has no more)
INDEX_SEED = 0x5EED  # the indices read depend on the length only
LEAF_BYTES = 8 << 20  # a larger array is hashed by its first and last 4 MiB (and its size)
MAX_LEAVES = 4096  # per item: what an exotic nested item may cost
MAX_DEPTH = 8


@dataclasses.dataclass(frozen=True)
class DatasetIdentity:
    """What a data position counts over. ``fingerprint`` is ``"xxh3:<hex>"`` or None (a
    ``version`` was given, or the items could not be fingerprinted: ``note`` says why)."""

    length: int
    fingerprint: str | None = None
    version: str | None = None
    dataset: str = ""  # the dataset's class, for messages only (never compared)
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def key(self) -> dict[str, Any]:
        """What identifies the data (no class name, no note): the part a config hash covers."""
        return {"length": self.length, "fingerprint": self.fingerprint, "version": self.version}

    @classmethod
    def from_json(cls, obj: Any) -> DatasetIdentity:
        """Parse a recorded identity; a malformed one raises ValueError (a damaged state.json)."""
        if not isinstance(obj, Mapping):
            raise ValueError(f"the dataset identity must be an object, got {type(obj).__name__}")
        length, fp, version = obj.get("length"), obj.get("fingerprint"), obj.get("version")
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise ValueError(f"the dataset length must be an integer >= 0, got {length!r}")
        for name, v in (("fingerprint", fp), ("version", version)):
            if v is not None and not isinstance(v, str):
                raise ValueError(f"the dataset {name} must be a string or null, got {v!r}")
        return cls(length, fp, version, str(obj.get("dataset") or ""), str(obj.get("note") or ""))

    def describe(self) -> str:
        what = f"{self.length} samples"
        if self.version is not None:
            return f"{what}, dataset_version {self.version!r}"
        if self.fingerprint is not None:
            return f"{what}, content fingerprint {self.fingerprint[:21]}"
        return f"{what}, no content fingerprint ({self.note or 'none recorded'})"


def version_of(dataset: Any, given: str | int | None) -> str | None:
    """The declared version: ``given``, else the dataset's ``dataset_version`` attribute."""
    v = given if given is not None else getattr(dataset, "dataset_version", None)
    return None if v is None else str(v)


def sample_indices(n: int, k: int = SAMPLES) -> list[int]:
    """The indices a fingerprint reads: every index when ``n <= k``, else ``k`` drawn from a fixed
    seed (the first and the last always among them). The same in every process."""
    if n <= k:
        return list(range(n))
    drawn = random.Random(INDEX_SEED + n).sample(range(1, n - 1), k - 2)
    return [0, *sorted(drawn), n - 1]


# ---- hashing one item --------------------------------------------------------------------------


class _Feed:
    """Feeds an item's content into a hash; counts what had no content to hash (opaque)."""

    def __init__(self) -> None:
        self.h = xxhash.xxh3_128()
        self.leaves = 0
        self.opaque = 0

    def tag(self, *parts: object) -> None:
        self.h.update(repr(parts).encode())

    def raw(self, tag: str, data: bytes | memoryview) -> None:
        self.tag(tag, len(data))
        if len(data) > LEAF_BYTES:
            half = LEAF_BYTES // 2
            data = bytes(data[:half]) + bytes(data[-half:])
        self.h.update(data)

    def item(self, obj: Any, depth: int = 0) -> None:
        self.leaves += 1
        if self.leaves > MAX_LEAVES or depth > MAX_DEPTH:
            self.tag("cut")
            return
        if obj is None or isinstance(obj, (bool, int, str, complex)):
            self.raw(type(obj).__name__, repr(obj).encode() if not isinstance(obj, str) else obj.encode("utf-8", "surrogatepass"))
        elif isinstance(obj, float):
            self.raw("float", struct.pack("<d", obj))
        elif isinstance(obj, (bytes, bytearray, memoryview)):
            self.raw("bytes", bytes(obj))
        elif isinstance(obj, torch.Tensor):
            self.tensor(obj)
        elif isinstance(obj, (np.ndarray, np.generic)):
            self.array(np.asarray(obj), depth)
        elif isinstance(obj, Mapping):
            self.tag("map", len(obj))
            for key in sorted(obj, key=repr):
                self.item(key, depth + 1)
                self.item(obj[key], depth + 1)
        elif isinstance(obj, (list, tuple)):
            self.tag(type(obj).__name__, len(obj))
            for x in obj:
                self.item(x, depth + 1)
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            self.tag("dataclass", type(obj).__qualname__)
            for f in dataclasses.fields(obj):
                self.item(getattr(obj, f.name), depth + 1)
        elif hasattr(obj, "__array_interface__") or hasattr(obj, "__array__"):  # PIL images, array-likes
            self.array(np.asarray(obj), depth)
        else:  # an object we cannot see into: only its type counts
            self.tag("opaque", type(obj).__module__, type(obj).__qualname__)
            self.opaque += 1

    def tensor(self, t: torch.Tensor) -> None:
        t = t.detach()
        if t.layout != torch.strided or t.is_meta or t.is_quantized or t.is_nested:
            self.tag("tensor", str(t.layout), str(t.dtype), tuple(t.shape))
            return
        flat = t.resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
        self.tag("tensor", str(t.dtype), tuple(t.shape))
        self.raw("data", flat.view(torch.uint8).numpy().data if flat.numel() else b"")

    def array(self, a: np.ndarray[Any, Any], depth: int) -> None:
        if a.dtype.hasobject:
            self.tag("objarray", a.shape)
            self.item(a.tolist(), depth + 1)
            return
        self.tag("array", a.dtype.str, a.shape)
        self.raw("data", np.ascontiguousarray(a).tobytes())


def item_digest(item: Any) -> tuple[bytes, bool]:
    """A 16-byte digest of ``item``'s content, and whether anything but opaque objects went in."""
    feed = _Feed()
    feed.item(item)
    return feed.h.digest(), feed.leaves > feed.opaque


# ---- a dataset's fingerprint -------------------------------------------------------------------


@contextlib.contextmanager
def _isolated_rng() -> Iterator[None]:
    """Every global generator a ``__getitem__`` may draw from is put back afterwards."""
    py, npy = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)


def _read_all(dataset: Any, indices: list[int]) -> tuple[list[bytes], bool]:
    digests, content = [], False
    for i in indices:
        random.seed(i)
        np.random.seed(i % 2**32)
        torch.default_generator.manual_seed(i)  # CPU only: CUDA generators are left alone
        d, c = item_digest(dataset[i])
        digests.append(d)
        content = content or c
    return digests, content


def fingerprint(dataset: Any, n: int, k: int = SAMPLES) -> tuple[str | None, str]:
    """``("xxh3:<hex>", "")``, or ``(None, why)`` when the sampled items cannot be fingerprinted.
    Never raises for what a dataset does: a failing ``__getitem__`` is a note."""
    indices = sample_indices(n, k)
    try:
        with _isolated_rng():
            first, content = _read_all(dataset, indices)
            second, _ = _read_all(dataset, indices)
    except Exception as e:  # noqa: BLE001 - any dataset, any item: never break a save for it
        return None, f"reading items failed ({type(e).__name__}: {str(e)[:120]})"
    if first != second:
        return None, "items differ between two reads (randomness the global generators do not drive)"
    if not content and indices:
        return None, "the items hold nothing ckptguard can hash (opaque objects)"
    h = xxhash.xxh3_128()
    h.update(repr((n, indices)).encode())
    for d in first:
        h.update(d)
    return "xxh3:" + h.hexdigest(), ""


def identify(dataset: Any, n: int, version: str | int | None = None) -> DatasetIdentity:
    """The identity of ``dataset`` (None: only the length ``n`` is known)."""
    name = type(dataset).__qualname__ if dataset is not None else ""
    v = version_of(dataset, version)
    if v is not None:
        return DatasetIdentity(n, None, v, name)
    if dataset is None:
        return DatasetIdentity(n, None, None, name, "the sampler was given a length, not the dataset")
    if not hasattr(type(dataset), "__getitem__"):
        return DatasetIdentity(n, None, None, name, "the dataset has no __getitem__")
    fp, note = fingerprint(dataset, n)
    if fp is None:
        log.info("Dataset %s: no content fingerprint (%s); only its length is checked on resume. "
                 "Pass ResumableSampler(..., dataset_version=...) to declare its version.", name, note)
    return DatasetIdentity(n, fp, None, name, note)


# ---- on resume ---------------------------------------------------------------------------------


def dataset_change(saved: DatasetIdentity, now: DatasetIdentity) -> str | None:
    """How the dataset changed, or None (the same, or nothing comparable beyond an equal length).

    Versions are compared when both sides declare one (the content is then not looked at);
    otherwise fingerprints when both have one (a fingerprint over another length always differs)."""
    diffs = []
    if saved.length != now.length:
        diffs.append(f"{saved.length} -> {now.length} samples")
    if saved.version is not None and now.version is not None:
        if saved.version != now.version:
            diffs.append(f"dataset_version {saved.version!r} -> {now.version!r}")
    elif saved.fingerprint is not None and now.fingerprint is not None and saved.fingerprint != now.fingerprint:
        if not diffs:  # another length samples other indices: its fingerprint differs anyway
            diffs.append("other content")
    return ", ".join(diffs) or None


def saved_identity(sampler_state: Any) -> DatasetIdentity | None:
    """The identity a sampler state records; None for a checkpoint from before it was recorded."""
    if not isinstance(sampler_state, Mapping) or sampler_state.get("dataset") is None:
        return None
    return DatasetIdentity.from_json(sampler_state["dataset"])


def _sampler_state(state: Mapping[str, Any]) -> tuple[Any, str]:
    if isinstance(state.get("dataloader"), Mapping):
        return state["dataloader"].get("sampler"), "TrainState(dataloader=...)"
    return state.get("sampler"), "TrainState(sampler=...)"


def dataset_check(sampler: Any, state: Mapping[str, Any], where: str, *, strict: bool) -> str | None:
    """Compare the identity recorded in ``state`` (a checkpoint's state.json) with ``sampler``'s
    dataset today. Strict: raise :class:`DatasetChangedError`; else return the change (the
    sampler's ``load_state_dict`` logs the warning) or None."""
    saved_state, label = _sampler_state(state)
    saved = saved_identity(saved_state)
    if sampler is None or saved is None:
        return None
    now: DatasetIdentity = sampler.identity()
    change = dataset_change(saved, now)
    if change is None or not strict:
        return change
    pos = f"epoch {saved_state.get('epoch')}, sample {saved_state.get('start')}"
    raise DatasetChangedError(
        f"{where}: the dataset of the data position ({label}, over {now.dataset or 'a dataset'}) changed "
        f"since the save ({change}): saved over {saved.describe()}; today {now.describe()}. The saved "
        f"position ({pos}) counts over the old dataset's order: resuming would silently skip or repeat "
        "samples. The checkpoint is intact and nothing was marked. If the change is intended, "
        "restore(state, strict=False) resumes at the same epoch and position in the new dataset's order "
        "(with a warning); declare the data a run uses with ResumableSampler(..., dataset_version=...) "
        "(or a dataset_version attribute of the dataset) and change it with the data.",
        saved, now,
    )


def order_changes(saved: Mapping[str, Any], now: Mapping[str, Any], identity: DatasetIdentity) -> list[str]:
    """Warnings for a sampler state loaded over another data order: the dataset (identity, or
    the length for an older checkpoint), ``seed`` and ``shuffle``. ``now`` is today's sampler's
    state; the resumed position is described from ``saved``."""
    out = []
    recorded = saved_identity(saved)
    if recorded is not None:
        change = dataset_change(recorded, identity)
        if change is not None:
            out.append(
                f"Sampler: the dataset changed since the save ({change}): saved over {recorded.describe()}, "
                f"today {identity.describe()}; resuming at epoch {saved.get('epoch')}, position "
                f"{saved.get('start')} of the new dataset's order: this epoch may repeat or skip samples, "
                "later epochs visit each sample once."
            )
    elif int(saved.get("dataset_len", identity.length)) != identity.length:
        out.append(
            f"Sampler: the dataset had {saved.get('dataset_len')} samples when saved and has "
            f"{identity.length} now; the resumed epoch order differs from the original run."
        )
    for field in ("seed", "shuffle"):
        if field in saved and saved[field] != now.get(field):
            out.append(f"Sampler: {field} was {saved[field]!r} when saved and is {now.get(field)!r} now; the data order changes.")
    return out
