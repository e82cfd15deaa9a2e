"""A pickle-free codec for state trees: JSON for structure, tensors set aside for safetensors.

``encode`` walks a nested state (dicts, lists, tuples, numbers, strings, tensors, numpy arrays)
and returns plain JSON data where every tensor is replaced by a reference
``{"__tensor__": key}``; the tensors go into a dict the caller writes to a safetensors file.
``decode`` is the inverse and can only build these plain types: decoding never runs code.

Tags: ``__tensor__``, ``__tuple__``, ``__float__`` (nan/inf), ``__map__`` (dicts with
non-string keys or keys that look like tags), ``__bytes__`` (base64), ``__ndarray__``.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch

from ckptguard.errors import CorruptCheckpointError, UnsupportedStateError

__all__ = ["ShapeOnly", "decode", "encode", "load_into"]

_TAGS = frozenset({"__tensor__", "__tuple__", "__float__", "__map__", "__bytes__", "__ndarray__"})


def encode(obj: Any, tensors: dict[str, torch.Tensor], prefix: str, where: str = "") -> Any:
    """Encode ``obj`` to JSON data; tensors are added to ``tensors`` under ``prefix``-based keys."""
    return _enc(obj, tensors, prefix, where or prefix)


def _key(prefix: str, part: object) -> str:
    return f"{prefix}.{part}" if prefix else str(part)


def _enc(obj: Any, tensors: dict[str, torch.Tensor], prefix: str, where: str) -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, enum.Enum):
        raise UnsupportedStateError(
            f"{where} holds an enum value {obj!r}; store its .value instead (no pickle is used)."
        )
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return {"__float__": repr(obj)}
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return _enc_array(obj, tensors, prefix)
    if isinstance(obj, np.generic):
        return _enc(obj.item(), tensors, prefix, where)
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(obj)).decode()}
    if isinstance(obj, tuple):
        return {
            "__tuple__": [
                _enc(v, tensors, _key(prefix, i), f"{where}[{i}]") for i, v in enumerate(obj)
            ]
        }
    if isinstance(obj, list):
        return [_enc(v, tensors, _key(prefix, i), f"{where}[{i}]") for i, v in enumerate(obj)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _enc(dataclasses.asdict(obj), tensors, prefix, where)
    if isinstance(obj, Mapping):
        return _enc_mapping(obj, tensors, prefix, where)
    raise _unsupported(obj, where)


def _enc_array(obj: torch.Tensor | np.ndarray[Any, Any], tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, str]:
    """Set a tensor (or a numpy array, as a tensor sharing its memory) aside under a free key."""
    is_tensor = isinstance(obj, torch.Tensor)
    key = prefix or ("tensor" if is_tensor else "array")
    while key in tensors:
        key += "_"
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj
        return {"__tensor__": key}
    tensors[key] = torch.from_numpy(np.ascontiguousarray(obj))
    return {"__ndarray__": key}


def _enc_mapping(obj: Mapping[Any, Any], tensors: dict[str, torch.Tensor], prefix: str, where: str) -> Any:
    """A dict with plain string keys stays a dict; any other keys make a ``__map__`` of pairs."""
    plain = all(isinstance(k, str) and k not in _TAGS for k in obj)
    if plain:
        return {
            k: _enc(v, tensors, _key(prefix, k), f"{where}[{k!r}]") for k, v in obj.items()
        }
    items = []
    for k, v in obj.items():
        if not isinstance(k, (str, int, float, bool)) and k is not None:
            raise UnsupportedStateError(
                f"{where} has a key of type {type(k).__name__}; only str/int/float/bool keys "
                "can be stored without pickle."
            )
        items.append([k, _enc(v, tensors, _key(prefix, k), f"{where}[{k!r}]")])
    return {"__map__": items}


def _unsupported(obj: Any, where: str) -> UnsupportedStateError:
    """The error for a value that cannot be stored without pickle (a function is code, not data)."""
    if callable(obj):
        name = getattr(obj, "__qualname__", type(obj).__name__)
        return UnsupportedStateError(
            f"{where} holds a function ({name}). ckptguard stores data, never code: a checkpoint "
            "must not be able to run anything when loaded. Recreate the function in your code "
            "(e.g. build LambdaLR with a module-level function, which its state_dict skips, or "
            "keep only plain numbers in the object's state)."
        )
    return UnsupportedStateError(
        f"{where} holds a {type(obj).__module__}.{type(obj).__qualname__}, which cannot be stored "
        "without pickle. Keep state to numbers, strings, lists, dicts and tensors (override "
        "state_dict()/load_state_dict() to convert it)."
    )


class ShapeOnly(Mapping[str, torch.Tensor]):
    """A tensor lookup that reads a state's structure without its tensors: every tensor reference
    decodes to a 0-d placeholder, e.g. ``decode(entry["state_dict"], ShapeOnly(), what)`` to plan a
    load (which parameters have optimizer state) before reading any tensor file."""

    def __getitem__(self, key: str) -> torch.Tensor:
        return torch.empty(())

    def __contains__(self, key: object) -> bool:
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def decode(data: Any, tensors: Mapping[str, torch.Tensor], where: str = "state") -> Any:
    """Rebuild a state tree from JSON data and the tensors it references."""
    try:
        return _dec(data, tensors, where, 0)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise CorruptCheckpointError(
            f"{where}: malformed state data ({type(e).__name__}: {e}). The checkpoint is damaged "
            "or was not written by ckptguard."
        ) from e


def _dec(data: Any, tensors: Mapping[str, torch.Tensor], where: str, depth: int) -> Any:
    if depth > 200:
        raise ValueError("nesting deeper than 200 levels")
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [_dec(v, tensors, where, depth + 1) for v in data]
    if not isinstance(data, dict):
        raise TypeError(f"unexpected {type(data).__name__}")
    if len(data) == 1:
        (tag, value), = data.items()
        if tag == "__tensor__" or tag == "__ndarray__":
            if not isinstance(value, str) or value not in tensors:
                raise KeyError(f"tensor {value!r} is referenced but not stored")
            t = tensors[value]
            return t.numpy() if tag == "__ndarray__" else t
        if tag == "__tuple__":
            return tuple(_dec(v, tensors, where, depth + 1) for v in value)
        if tag == "__float__":
            if value not in ("nan", "inf", "-inf"):
                raise ValueError(f"bad float {value!r}")
            return float(value)
        if tag == "__bytes__":
            return base64.b64decode(value, validate=True)
        if tag == "__map__":
            out = {}
            for k, v in value:
                if not isinstance(k, (str, int, float, bool)) and k is not None:
                    raise TypeError("bad map key")
                out[k] = _dec(v, tensors, where, depth + 1)
            return out
    return {k: _dec(v, tensors, where, depth + 1) for k, v in data.items()}


def load_into(live: dict[str, Any], saved: Mapping[str, Any]) -> None:
    """Make ``live`` equal ``saved`` (a decoded tree) while keeping the user's objects: a nested
    dict or list stays the same object, and a tensor or numpy array of the same shape, dtype and
    device is overwritten in place. A training loop that holds a reference to something inside
    ``TrainState(extra=...)`` (an EMA tensor, a dict of counters) keeps updating what is saved."""
    for k in [k for k in live if k not in saved]:
        del live[k]
    for k, v in saved.items():
        if k in live:
            merged = _merged(live[k], v)
            if merged is live[k]:
                continue
        live[k] = v


def _merged(old: Any, new: Any) -> Any:
    """``old`` updated in place to equal ``new`` when their kinds allow it, else ``new``."""
    if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor):
        if type(old) is torch.Tensor and old.shape == new.shape and old.dtype == new.dtype and old.device.type == new.device.type:
            with torch.no_grad():
                old.copy_(new)
            return old
        return new
    if isinstance(old, np.ndarray) and isinstance(new, np.ndarray):
        if old.shape == new.shape and old.dtype == new.dtype and old.flags.writeable:
            old[...] = new
            return old
        return new
    if isinstance(old, dict) and isinstance(new, Mapping):  # a defaultdict or Counter keeps its type
        load_into(old, new)
        return old
    if isinstance(old, list) and isinstance(new, list):
        if len(old) == len(new):
            old[:] = [_merged(a, b) for a, b in zip(old, new, strict=True)]
        else:
            old[:] = new
        return old
    return new
