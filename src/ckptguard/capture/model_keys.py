"""Model keys: the names a checkpoint gives a model's tensors and an optimizer's parameters.

A checkpoint stores canonical keys, so a model saved inside DDP, DataParallel or torch.compile
restores into the plain model and back: wrappers are stripped (:func:`unwrap_model`) and the
``_orig_mod`` segments torch.compile inserts are dropped (:func:`canonical_key`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["canonical_key", "model_state_dict", "param_names", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel / torch.compile wrappers to reach the user's module."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DataParallel, DistributedDataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def canonical_key(key: str) -> str:
    """Drop the ``_orig_mod`` segments torch.compile inserts into nested module names."""
    return ".".join(p for p in key.split(".") if p != "_orig_mod")


def model_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
    """(canonical key -> tensor, canonical -> actual key, non-tensor entries)."""
    inner = unwrap_model(model)
    sd = inner.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    actual: dict[str, str] = {}
    other: dict[str, Any] = {}
    for k, v in sd.items():
        ck = canonical_key(k)
        actual[ck] = k
        if isinstance(v, torch.Tensor):
            tensors[ck] = v
        else:
            other[ck] = v
    return tensors, actual, other


def param_names(model: nn.Module | None, opt: torch.optim.Optimizer) -> list[str | None]:
    """The canonical model key of each parameter ``opt`` holds, in its order (None for a
    parameter the model does not hold, or when there is no model)."""
    names: dict[int, str] = {}
    if model is not None:
        for n, p in unwrap_model(model).named_parameters(remove_duplicate=False):
            names.setdefault(id(p), canonical_key(n))
    return [names.get(id(p)) for g in opt.param_groups for p in g["params"]]
