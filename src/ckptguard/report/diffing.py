"""``diff(a, b)``: what changed between two checkpoints (of one run or of two runs).

Config (``config.yaml``), environment, metrics, the run's own manifest fields (from
``add_manifest_fields``, the manifest's ``extra``, and the TrainState's ``extra=`` in state.json),
probe output, tensor keys and shapes, and per
tensor the largest absolute change and the relative change ``||b - a|| / ||a||``. Tensors are
read one at a time, each verified against its manifest checksum, so memory stays at two tensors.

>>> d = diff("runs/a/step-000000400", "runs/b/step-000000400")
>>> d.tensors[0]   # TensorChange(name='head.weight', max_abs=0.012, rel=0.003, ...)

``values=False`` compares tensors by their recorded checksums only (no tensor is read, torch is
not imported): ``ckptguard diff --metadata``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

from ckptguard.capture.configdrift import config_diff
from ckptguard.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from ckptguard.format import safejson
from ckptguard.format.manifest import MANIFEST
from ckptguard.manager.extensions import custom_fields
from ckptguard.persist.reader import CheckpointReader
from ckptguard.run.catalog import read_manifest
from ckptguard.storage.base import join
from ckptguard.verification.verify import resolve_target

__all__ = ["CheckpointDiff", "TensorChange", "dict_diff", "diff"]

_ENV_IGNORE = frozenset({"pid"})
MODEL_FILE = "model.safetensors"  # ckptguard.capture.state's name (not imported: it imports torch)


@dataclasses.dataclass(frozen=True)
class TensorChange:
    name: str
    shape_a: tuple[int, ...] | None
    shape_b: tuple[int, ...] | None
    dtype_a: str | None
    dtype_b: str | None
    max_abs: float | None = None  # None when not comparable (missing, other shape or dtype)
    rel: float | None = None

    @property
    def status(self) -> str:
        if self.shape_a is None:
            return "added"
        if self.shape_b is None:
            return "removed"
        if self.shape_a != self.shape_b or self.dtype_a != self.dtype_b:
            return "reshaped" if self.shape_a != self.shape_b else "retyped"
        return "same" if self.max_abs == 0 else "changed"


@dataclasses.dataclass(frozen=True)
class CheckpointDiff:
    a: str
    b: str
    step_a: int
    step_b: int
    config: list[tuple[str, Any, Any]]
    environment: list[tuple[str, Any, Any]]
    metrics: dict[str, tuple[Any, Any]]
    probe: tuple[Any, Any]
    tensors: list[TensorChange]
    fields: list[tuple[str, Any, Any]] = dataclasses.field(default_factory=list)
    """The run's own fields that differ: provider keys, ``extra.KEY`` (the manifest's ``extra``) and
    ``state_extra.KEY`` (the TrainState's ``extra=``), as (dotted key, value in a, value in b)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a, "b": self.b, "step_a": self.step_a, "step_b": self.step_b,
            "config": [{"key": k, "a": x, "b": y} for k, x, y in self.config],
            "environment": [{"key": k, "a": x, "b": y} for k, x, y in self.environment],
            "metrics": {k: {"a": x, "b": y} for k, (x, y) in self.metrics.items()},
            "probe": {"a": self.probe[0], "b": self.probe[1]},
            "fields": [{"key": k, "a": x, "b": y} for k, x, y in self.fields],
            "tensors": [{**dataclasses.asdict(t), "status": t.status} for t in self.tensors],
        }


def dict_diff(a: Any, b: Any, ignore: frozenset[str] = frozenset()) -> list[tuple[str, Any, Any]]:
    """(dotted key, value in a, value in b) for every leaf that differs; absent is ``None``."""
    return [(c.key, c.old, c.new) for c in config_diff(a or {}, b or {}) if c.key.split(".")[0] not in ignore]


def _open(path: str | os.PathLike[str], storage_options: dict[str, Any] | None) -> CheckpointReader:
    storage, names = resolve_target(path, storage_options)
    committed = [n for n in sorted(names) if storage.exists(join(n, MANIFEST))]
    if not committed:
        raise CheckpointNotFoundError(f"No committed checkpoint at {storage.describe('')}. Pass RUN/step-N or a run.")
    name = committed[-1]
    return CheckpointReader(storage, name, read_manifest(storage, name))


def _config(r: CheckpointReader) -> Any:
    if not r.has("config.yaml"):
        return None
    try:
        return safejson.yaml_loads(r.blob("config.yaml"))
    except ValueError as e:  # checksummed, yet hostile (deep, aliases) or not YAML
        raise CorruptCheckpointError(
            f"{r.where}/config.yaml cannot be compared: {e}. The checkpoint is damaged or hostile.",
            path=r.where, file="config.yaml",
        ) from e


def _fields(r: CheckpointReader) -> dict[str, Any]:
    out = custom_fields(r.manifest)
    try:
        state = r.json("state.json") if r.has("state.json") else {}
    except CheckpointError:  # damaged: 'ckptguard verify' says so; the rest still compares
        state = {}
    if isinstance(state, dict) and state.get("extra"):
        out["state_extra"] = state["extra"]
    return out


def _probe(m: Mapping[str, Any]) -> Any:
    p = m.get("probe") or None
    return None if p is None else {k: p.get(k) for k in ("hash", "mean", "std", "max_abs")}


def _digest(e: Mapping[str, Any]) -> Any:
    return e.get("xxh3_128") or tuple(c.get("digest") for c in e.get("chunks") or ()) or None


def tensor_changes(
    ra: CheckpointReader, rb: CheckpointReader, progress: Callable[[str], None] | None = None, values: bool = True
) -> list[TensorChange]:
    if _sharded(ra) or _sharded(rb):
        return _assembled_changes(ra, rb, progress)
    ta, tb = ra.tensor_table(MODEL_FILE), rb.tensor_table(MODEL_FILE)
    out = []
    for name in sorted(set(ta) | set(tb)):
        ea, eb = ta.get(name), tb.get(name)
        sa = tuple(ea["shape"]) if ea else None
        sb = tuple(eb["shape"]) if eb else None
        da, db = (ea or {}).get("dtype"), (eb or {}).get("dtype")
        if ea is None or eb is None or sa != sb or da != db:
            out.append(TensorChange(name, sa, sb, da, db))
            continue
        if progress is not None:
            progress(name)
        if _digest(ea) is not None and _digest(ea) == _digest(eb):
            out.append(TensorChange(name, sa, sb, da, db, 0.0, 0.0))
            continue
        if not values:
            out.append(TensorChange(name, sa, sb, da, db))  # differs by checksum; magnitude not read
            continue
        x = ra.tensors(MODEL_FILE, names=[name])[name]
        y = rb.tensors(MODEL_FILE, names=[name])[name]
        out.append(TensorChange(name, sa, sb, da, db, *_magnitude(x, y)))
    return out


def _magnitude(x: Any, y: Any) -> tuple[float, float]:
    """(max |y - x|, ||y - x|| / ||x||) of two tensors of one shape and dtype."""
    if not (x.is_floating_point() or x.is_complex()):
        x, y = x.double(), y.double()
    d = (y - x).abs()
    max_abs = float(d.max()) if d.numel() else 0.0
    norm = float(x.double().norm())
    diff_norm = float((y.double() - x.double()).norm())
    return max_abs, diff_norm / norm if norm > 0 else (0.0 if diff_norm == 0 else math.inf)


def _sharded(r: CheckpointReader) -> bool:
    info = r.manifest.get("distributed")
    return not r.has(MODEL_FILE) and isinstance(info, dict) and info.get("mode") == "dcp"


def _assembled_changes(
    ra: CheckpointReader, rb: CheckpointReader, progress: Callable[[str], None] | None
) -> list[TensorChange]:
    """Model tensors compared whole when a checkpoint holds sharded (FSDP2/DCP) state: each side's
    shards are assembled (every byte checked against its checksum) and compared in memory."""
    from ckptguard.distributed.shard_io import model_tensors  # imports torch.distributed.checkpoint
    from ckptguard.format.tensorfile import DTYPE_TO_ST

    xa = model_tensors(ra) if _sharded(ra) else ra.tensors(MODEL_FILE)
    xb = model_tensors(rb) if _sharded(rb) else rb.tensors(MODEL_FILE)
    out = []
    for name in sorted(set(xa) | set(xb)):
        x, y = xa.get(name), xb.get(name)
        sa, sb = (None if t is None else tuple(t.shape) for t in (x, y))
        da, db = (None if t is None else DTYPE_TO_ST.get(t.dtype, str(t.dtype)) for t in (x, y))
        if x is None or y is None or sa != sb or da != db:
            out.append(TensorChange(name, sa, sb, da, db))
            continue
        if progress is not None:
            progress(name)
        out.append(TensorChange(name, sa, sb, da, db, *_magnitude(x, y)))
    return out


def diff(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
    values: bool = True,
) -> CheckpointDiff:
    """Compare two checkpoints (paths or URLs; a run means its newest checkpoint).

    ``values=False``: tensors are compared by checksum only (nothing read, no torch).
    """
    ra, rb = _open(a, storage_options), _open(b, storage_options)
    ma, mb = ra.manifest, rb.manifest
    metrics_a, metrics_b = ma.get("metrics") or {}, mb.get("metrics") or {}
    return CheckpointDiff(
        a=ra.where, b=rb.where, step_a=int(ma["step"]), step_b=int(mb["step"]),
        config=dict_diff(_config(ra), _config(rb)),
        environment=dict_diff(ma.get("environment"), mb.get("environment"), _ENV_IGNORE)
        + [(k, ma.get(k), mb.get(k)) for k in ("format_version", "config_hash") if ma.get(k) != mb.get(k)],
        metrics={k: (metrics_a.get(k), metrics_b.get(k)) for k in sorted(set(metrics_a) | set(metrics_b))},
        probe=(_probe(ma), _probe(mb)),
        tensors=tensor_changes(ra, rb, progress, values),
        fields=dict_diff(_fields(ra), _fields(rb)),
    )

