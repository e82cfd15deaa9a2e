"""Hyper-parameter and LR-schedule drift between a checkpoint and the current code.

Restoring an optimizer or a scheduler overwrites the current objects' settings with the saved
ones (``load_state_dict`` copies every param-group field and every scheduler attribute). A learning
rate, a weight decay or a schedule length changed in the code is therefore silently ignored on
resume; these functions say so before it happens.

>>> diffs = optimizer_hparam_diffs(saved_entry["state_dict"], optimizer)   # [(group, key, saved, now)]
>>> lr_then, lr_now = lr_at_step(saved_sched_state, scheduler)             # LR at the saved step
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["flatten", "lr_at_step", "optimizer_hparam_diffs", "scheduler_diffs", "values_differ"]

# Implementation switches, not hyper-parameters: changing them does not change the maths.
_IMPL_KEYS = frozenset({"params", "foreach", "fused", "capturable", "differentiable", "maximize_impl"})
# Scheduler progress (not configuration): differs by design between a saved and a fresh scheduler.
_PROGRESS_KEYS = frozenset({
    "last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "verbose", "_is_initial",
    "optimizer", "_initial_step", "cooldown_counter", "num_bad_epochs", "best", "_cycle_count",
})
MAX_REPLAY_STEPS = 2_000_000


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    return v


def values_differ(a: Any, b: Any) -> bool:
    """Compare plain values; floats with a relative tolerance of 1e-9, tuples equal to lists."""
    a, b = _plain(a), _plain(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a != b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return not math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-15)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) != len(b) or any(values_differ(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() != b.keys() or any(values_differ(a[k], b[k]) for k in a)
    return bool(a != b)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts/lists to ``{"a.b.0": value}`` (lists of scalars stay whole)."""
    obj = _plain(obj)
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}.{i}" if prefix else str(i)))
    else:
        out[prefix] = obj
    return out


def optimizer_hparam_diffs(
    saved_sd: Mapping[str, Any], opt: torch.optim.Optimizer, groups: Sequence[int | None] | None = None
) -> list[tuple[int, str, Any, Any]]:
    """(current group index, key, saved value, current value) for every differing hyper-parameter.

    ``groups`` maps current groups to saved ones (default: by position). ``lr`` is compared
    through ``initial_lr`` when a scheduler set one (the live ``lr`` is the scheduled value).
    """
    saved_groups = [g for g in saved_sd.get("param_groups", []) if isinstance(g, Mapping)]
    out = []
    for gi, g in enumerate(opt.param_groups):
        src = groups[gi] if groups is not None and gi < len(groups) else (gi if gi < len(saved_groups) else None)
        if src is None or src >= len(saved_groups):
            continue
        sg = saved_groups[src]
        keys = (set(sg) | set(g)) - _IMPL_KEYS
        if "initial_lr" in sg or "initial_lr" in g:
            keys.discard("lr")
        for k in sorted(keys):
            if k not in sg or k not in g:
                continue
            if values_differ(sg[k], g[k]):
                out.append((gi, k, _plain(sg[k]), _plain(g[k])))
    return out


def _config(sd: Mapping[str, Any]) -> dict[str, Any]:
    flat = flatten({k: v for k, v in sd.items() if k not in _PROGRESS_KEYS})
    return {k: v for k, v in flat.items() if k.rsplit(".", 1)[-1] not in _PROGRESS_KEYS}


def scheduler_diffs(saved_sd: Mapping[str, Any], sched: Any) -> list[tuple[str, Any, Any]]:
    """(key, saved, current) for every differing configuration entry of a scheduler."""
    then, now = _config(saved_sd), _config(sched.state_dict())
    out = []
    for k in sorted(set(then) | set(now)):
        a, b = then.get(k, "<absent>"), now.get(k, "<absent>")
        if values_differ(a, b):
            out.append((k, a, b))
    return out


def _light_copy(sched: Any) -> Any:
    """Deep-copy a scheduler with its optimizer's parameters and state replaced by 1-element stubs."""
    opt = getattr(sched, "optimizer", None)
    memo: dict[int, Any] = {}
    if opt is not None:
        for g in opt.param_groups:
            for p in g["params"]:
                memo[id(p)] = nn.Parameter(torch.zeros(1))
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    memo[id(v)] = torch.zeros(1)
    return copy.deepcopy(sched, memo)


def lr_at_step(saved_sd: Mapping[str, Any], sched: Any) -> tuple[list[float], list[float]] | None:
    """LRs at the saved step: (as saved, as the current scheduler computes them), or None.

    The current scheduler is copied (cheaply) and stepped to the saved ``last_epoch``; the live
    one is untouched.
    """
    step = saved_sd.get("last_epoch")
    saved_lr = saved_sd.get("_last_lr")
    if not isinstance(step, int) or saved_lr is None or not hasattr(sched, "get_last_lr"):
        return None
    try:
        twin = _light_copy(sched)
        todo = step - int(getattr(twin, "last_epoch", 0))
        if todo < 0 or todo > MAX_REPLAY_STEPS:
            return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(todo):
                twin.step()
        now = [float(x) for x in twin.get_last_lr()]
    except Exception:  # noqa: BLE001 - a scheduler that cannot be replayed is only not compared
        return None
    return [float(x) for x in _plain(saved_lr)], now
