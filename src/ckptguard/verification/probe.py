"""The probe batch: a fixed input frozen at the first save, and the model's output on it.

The Checkpoint Rot pattern: pick a few samples once, store them beside the run, and record the
hash of the model's output on them in every manifest. A checkpoint whose weights, loaded back,
do not reproduce that output is wrong, however cleanly it loads.

>>> inputs = freeze_probe(storage, batch)        # RUN/probe.safetensors, written once
>>> out = run_probe(model, inputs)               # eval mode, no grad, training RNG untouched
>>> record = summarize(out)                      # {"hash": xxh3-128, "mean", "std", "max_abs", ...}

A probe is a tensor (``model(x)``), a tuple/list of tensors (``model(*xs)``), a dict of tensors
(``model(**kw)``) or a callable returning one of those (called once, at the first save).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import struct
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import xxhash
from torch import nn

from ckptguard.capture.state import unwrap_model
from ckptguard.errors import CorruptCheckpointError, UnsupportedStateError
from ckptguard.format import safejson
from ckptguard.format.tensorfile import (
    DTYPE_TO_ST,
    ST_TO_DTYPE,
    digest_bytes,
    tensor_view,
    write_tensor_file,
)
from ckptguard.storage.base import read_capped

__all__ = [
    "PROBE_FILE",
    "ProbeInputs",
    "compare_probe",
    "freeze_probe",
    "load_probe",
    "output_tensors",
    "probe_bytes",
    "relative_change",
    "run_probe",
    "summarize",
]

log = logging.getLogger(__name__)
PROBE_FILE = "probe.safetensors"
MAX_PROBE_BYTES = 1024**3  # a probe is one batch
_KIND_KEY = "ckptguard_probe_kind"
# Outputs computed on different device types (GPU at save, CPU in the verifier) cannot be compared
# bit for bit; their summaries must then agree within this relative tolerance.
CROSS_DEVICE_RTOL = 1e-3

ProbeInputs = tuple[str, dict[str, torch.Tensor]]  # (kind: tensor|tuple|dict, name -> tensor)


# ---- the frozen batch ----------------------------------------------------------------------------


def normalize_probe(probe: Any) -> ProbeInputs:
    """Turn a user probe (tensor, tuple/list, dict, or a callable returning one) into inputs."""
    if callable(probe) and not isinstance(probe, torch.Tensor):
        with torch.random.fork_rng(devices=[]):
            probe = probe()
    if isinstance(probe, torch.Tensor):
        return "tensor", {"input": probe.detach().cpu().contiguous()}
    if isinstance(probe, (tuple, list)) and probe and all(isinstance(t, torch.Tensor) for t in probe):
        return "tuple", {str(i): t.detach().cpu().contiguous() for i, t in enumerate(probe)}
    if isinstance(probe, Mapping) and probe and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in probe.items()
    ):
        return "dict", {k: v.detach().cpu().contiguous() for k, v in probe.items()}
    raise UnsupportedStateError(
        f"probe= must be a tensor, a tuple/list of tensors, a dict of str -> tensor, or a callable "
        f"returning one of those; got {type(probe).__name__}."
    )


class _BytesWriter:
    def __init__(self) -> None:
        self.buf = io.BytesIO()

    def write(self, data: memoryview | bytes) -> None:
        self.buf.write(data)

    def close(self) -> None:  # pragma: no cover - nothing to flush
        pass

    def abort(self) -> None:  # pragma: no cover
        pass


def probe_bytes(inputs: ProbeInputs) -> bytes:
    """The safetensors bytes of a probe (deterministic for the same inputs)."""
    kind, tensors = inputs
    w = _BytesWriter()
    write_tensor_file(w, tensors, metadata={_KIND_KEY: kind})
    return w.buf.getvalue()


def _parse_probe(data: bytes, where: str) -> ProbeInputs:
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = safejson.loads(data[8 : 8 + n])
        kind = header.pop("__metadata__", {}).get(_KIND_KEY, "tensor")
        tensors: dict[str, torch.Tensor] = {}
        base = 8 + n
        for name, info in header.items():
            begin, end = info["data_offsets"]
            dtype = ST_TO_DTYPE[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            raw = bytearray(data[base + begin : base + end])
            if len(raw) != math.prod(shape) * torch.empty((), dtype=dtype).element_size():
                raise ValueError(f"tensor {name!r} has {len(raw)} bytes for shape {shape}")
            t = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            tensors[name] = t.view(dtype).reshape(shape).clone()
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(
            f"{where} is not a readable probe file ({e}). Delete it to freeze a new probe (probe "
            "hashes of older checkpoints then cannot be checked).",
            path=where,
        ) from e
    if kind not in ("tensor", "tuple", "dict"):
        raise CorruptCheckpointError(f"{where}: unknown probe kind {kind!r}.", path=where)
    return kind, tensors


def load_probe(storage: Any, expected_digest: str | None = None) -> ProbeInputs | None:
    """Read ``RUN/probe.safetensors`` (None when absent), checked against ``expected_digest``."""
    where = storage.describe(PROBE_FILE)
    if not storage.exists(PROBE_FILE):
        return None
    data = read_capped(storage, PROBE_FILE, MAX_PROBE_BYTES, "a probe batch")
    if expected_digest is not None and digest_bytes(data) != expected_digest:
        raise CorruptCheckpointError(
            f"{where} does not match the probe digest recorded in the manifest (expected "
            f"{expected_digest}, found {digest_bytes(data)}): the frozen probe batch was changed or "
            "damaged, so probe hashes cannot be compared.",
            path=where,
        )
    return _parse_probe(data, where)


def freeze_probe(storage: Any, probe: Any) -> tuple[ProbeInputs, str]:
    """Return the run's frozen probe and its file digest, writing it on the first call.

    An existing ``probe.safetensors`` wins over ``probe``: hashes of every checkpoint of the run
    are computed on the same batch. It is written atomically (temp file + rename).
    """
    existing = load_probe(storage)
    if existing is not None:
        data = storage.read_bytes(PROBE_FILE)
        if probe is not None and not callable(probe):
            given = normalize_probe(probe)
            if probe_bytes(given) != data:
                log.warning(
                    "%s already holds the run's frozen probe; the probe= given differs and is "
                    "ignored (delete the file to freeze a new one).", storage.describe(PROBE_FILE)
                )
        return existing, digest_bytes(data)
    inputs = normalize_probe(probe)
    data = probe_bytes(inputs)
    storage.replace_file(PROBE_FILE, data)
    log.info("Froze the probe batch in %s", storage.describe(PROBE_FILE))
    return inputs, digest_bytes(data)


# ---- running it ------------------------------------------------------------------------------------


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def output_tensors(out: Any, prefix: str = "out") -> list[tuple[str, torch.Tensor]]:
    """Flatten a model output (tensor, tuple/list, dict, dataclass-like) into named tensors."""
    if isinstance(out, torch.Tensor):
        return [(prefix, out)]
    if isinstance(out, Mapping):
        return [p for k in sorted(out, key=str) for p in output_tensors(out[k], f"{prefix}.{k}")]
    if isinstance(out, (tuple, list)):
        return [p for i, v in enumerate(out) for p in output_tensors(v, f"{prefix}.{i}")]
    if hasattr(out, "__dict__"):
        return output_tensors(vars(out), prefix)
    return []


def run_probe(model: nn.Module, inputs: ProbeInputs, *, isolate_rng: bool = True) -> list[tuple[str, torch.Tensor]]:
    """The model's output on the probe: eval mode, no grad.

    ``isolate_rng`` (the training thread): run under a forked, fixed-seed RNG so the training RNG
    stream is untouched. Off another thread (the async verifier) it must be False: the global
    RNG is shared by all threads, and forking it there would rewind draws the training thread
    makes meanwhile. The forward must then be deterministic in eval mode (it is for dropout).
    """
    inner = unwrap_model(model)
    device = _device_of(inner)
    kind, tensors = inputs
    moved = {k: v.to(device) for k, v in tensors.items()}
    devices = [device.index or 0] if device.type == "cuda" else []
    with contextlib.ExitStack() as stack:
        if isolate_rng:
            stack.enter_context(torch.random.fork_rng(devices=devices))
            torch.manual_seed(0)
        stack.enter_context(torch.no_grad())
        stack.enter_context(_eval_mode(inner))
        if kind == "tensor":
            out = inner(moved["input"])
        elif kind == "tuple":
            out = inner(*(moved[str(i)] for i in range(len(moved))))
        else:
            out = inner(**moved)
    outs = [(n, t.detach().cpu()) for n, t in output_tensors(out)]
    if not outs:
        raise UnsupportedStateError(
            f"The model's output on the probe holds no tensor (got {type(out).__name__}); the probe "
            "cannot be hashed."
        )
    return outs


def summarize(outs: list[tuple[str, torch.Tensor]], device: str = "cpu") -> dict[str, Any]:
    """Hash (xxh3-128 over names, dtypes, shapes and bytes) and summary statistics of outputs."""
    h = xxhash.xxh3_128()
    floats = []
    for name, t in outs:
        h.update(f"{name}|{DTYPE_TO_ST.get(t.dtype, str(t.dtype))}|{list(t.shape)}|".encode())
        h.update(tensor_view(t))
        floats.append(t.detach().reshape(-1).double())
    flat = torch.cat(floats) if floats else torch.zeros(0, dtype=torch.float64)
    finite = bool(torch.isfinite(flat).all()) if flat.numel() else True
    return {
        "hash": h.hexdigest(),
        "outputs": [{"name": n, "dtype": DTYPE_TO_ST.get(t.dtype, str(t.dtype)), "shape": list(t.shape)} for n, t in outs],
        "numel": int(flat.numel()),
        "mean": float(flat.mean()) if flat.numel() else 0.0,
        "std": float(flat.std()) if flat.numel() > 1 else 0.0,
        "max_abs": float(flat.abs().max()) if flat.numel() else 0.0,
        "finite": finite,
        "device": device,
    }


def flat_output(outs: list[tuple[str, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).double() for _, t in outs]) if outs else torch.zeros(0)


def relative_change(now: torch.Tensor, before: torch.Tensor) -> float:
    """||now - before|| / ||before|| of two flattened outputs (inf when shapes differ)."""
    if now.shape != before.shape:
        return math.inf
    denom = float(before.norm())
    diff = float((now - before).norm())
    return diff / denom if denom > 0 else (0.0 if diff == 0 else math.inf)


def _num(v: Any) -> float:
    """A statistic from an (untrusted) manifest as a float; NaN when it is not a number."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _close(a: float, b: float, scale: float) -> bool:
    return abs(a - b) <= CROSS_DEVICE_RTOL * max(scale, 1e-12)


def compare_probe(recorded: Mapping[str, Any], got: Mapping[str, Any]) -> tuple[bool, str]:
    """(match, explanation) of two :func:`summarize` records.

    Same device type: the hashes must be equal (bit-identical outputs). Different device types
    (saved on GPU, checked on CPU): shapes must agree and mean/std/max-abs be within
    ``CROSS_DEVICE_RTOL`` of the output's scale.
    """
    if recorded.get("hash") == got.get("hash"):
        return True, "output hash matches"
    shapes_then = [(o.get("name"), o.get("shape")) for o in recorded.get("outputs") or [] if isinstance(o, Mapping)]
    shapes_now = [(o.get("name"), o.get("shape")) for o in got.get("outputs") or [] if isinstance(o, Mapping)]
    stats = (
        f"recorded mean {_num(recorded.get('mean')):.6g}, std {_num(recorded.get('std')):.6g}, max|x| "
        f"{_num(recorded.get('max_abs')):.6g}; now mean {_num(got.get('mean')):.6g}, std "
        f"{_num(got.get('std')):.6g}, max|x| {_num(got.get('max_abs')):.6g}"
    )
    if shapes_then != shapes_now:
        return False, f"output shapes differ: recorded {shapes_then}, now {shapes_now}"
    dev_then = str(recorded.get("device", "cpu")).split(":")[0]
    dev_now = str(got.get("device", "cpu")).split(":")[0]
    if dev_then == dev_now:
        return False, f"output hash differs ({stats})"
    scale = max(abs(_num(recorded.get("max_abs"))), abs(_num(recorded.get("std"))))
    if all(_close(_num(recorded.get(k)), _num(got.get(k)), scale) for k in ("mean", "std", "max_abs")):
        return True, f"matches within {CROSS_DEVICE_RTOL:g} (saved on {dev_then}, checked on {dev_now})"
    return False, f"outputs differ beyond {CROSS_DEVICE_RTOL:g} ({stats})"

