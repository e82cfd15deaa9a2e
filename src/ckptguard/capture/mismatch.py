"""What does not fit between a checkpoint and today's code, and how it is reported and loaded.

:class:`MismatchReport` collects the differences (``compare_model`` for the model's tensors,
``check_optimizers`` for optimizer state); ``mismatch_error`` is the error of a strict restore.
``restore_state`` (:mod:`ckptguard.capture.state`) uses these; this module knows nothing of it.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ckptguard.capture.model_keys import param_names
from ckptguard.errors import StateMismatchError
from ckptguard.format.codec import ShapeOnly, decode
from ckptguard.format.tensorfile import dtype_tables

__all__ = [
    "MismatchReport",
    "OptimizerPlan",
    "check_optimizers",
    "compare_model",
    "format_mismatch",
    "likely_renames",
    "load_optimizers",
    "mismatch_error",
    "optimizer_plan",
    "optimizer_structure",
]

log = logging.getLogger(__name__)
Optimizers = Mapping[str, torch.optim.Optimizer]


@dataclasses.dataclass
class MismatchReport:
    """Differences between a checkpoint and the objects being restored."""

    missing: list[str] = dataclasses.field(default_factory=list)  # in the model, not saved
    unexpected: list[str] = dataclasses.field(default_factory=list)  # saved, not in the model
    reshaped: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = dataclasses.field(default_factory=list)
    retyped: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    renames: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (saved, model) likely renames
    cold: list[str] = dataclasses.field(default_factory=list)  # trainable params without saved optimizer state
    refused: list[str] = dataclasses.field(default_factory=list)  # other differences strict refuses

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.reshaped or self.retyped or self.refused)

    def table(self) -> str:
        return format_mismatch(self)


def compare_model(table: Mapping[str, Mapping[str, Any]], tensors: Mapping[str, torch.Tensor]) -> MismatchReport:
    """Compare a checkpoint's tensor table (key -> dtype, shape) with a model's tensors."""
    rep = MismatchReport()
    rep.missing = sorted(k for k in tensors if k not in table)
    rep.unexpected = sorted(k for k in table if k not in tensors)
    for k in sorted(set(table) & set(tensors)):
        saved_shape = tuple(table[k]["shape"])
        if saved_shape != tuple(tensors[k].shape):
            rep.reshaped.append((k, saved_shape, tuple(tensors[k].shape)))
        elif dtype_tables()[1][table[k]["dtype"]] != tensors[k].dtype:
            rep.retyped.append((k, table[k]["dtype"], str(tensors[k].dtype).replace("torch.", "")))
    rep.renames = likely_renames(rep, {k: tuple(v["shape"]) for k, v in table.items()}, {k: tuple(t.shape) for k, t in tensors.items()})
    return rep


def likely_renames(
    report: MismatchReport,
    saved_shapes: Mapping[str, tuple[int, ...]] | None = None,
    model_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> list[tuple[str, str]]:
    """Pairs (saved key, model key) among unexpected/missing keys: similar names, same shape.

    When shapes are given, only keys of equal shape pair up (a rename keeps the shape).
    """
    pairs = []
    pool = list(report.missing)
    for old in report.unexpected:
        cands = pool
        if saved_shapes is not None and model_shapes is not None:
            cands = [k for k in pool if model_shapes.get(k) == saved_shapes.get(old)]
        match = difflib.get_close_matches(old, cands, n=1, cutoff=0.5)
        if match:
            pairs.append((old, match[0]))
            pool.remove(match[0])
    return pairs


def format_mismatch(report: MismatchReport) -> str:
    lines = []
    if report.missing:
        lines.append("  missing from the checkpoint (in the model now): " + ", ".join(report.missing[:20]))
    if report.unexpected:
        lines.append("  unexpected in the checkpoint (not in the model): " + ", ".join(report.unexpected[:20]))
    for k, saved, now in report.reshaped[:20]:
        lines.append(f"  shape of {k!r}: checkpoint has {saved}, model has {now}")
    for k, saved_dtype, now_dtype in report.retyped[:20]:
        lines.append(f"  dtype of {k!r}: checkpoint has {saved_dtype}, model has {now_dtype}")
    for old, new in report.renames or likely_renames(report):
        lines.append(f"  likely rename: {old!r} -> {new!r}")
    lines.extend(f"  {r}" for r in report.refused)
    if report.cold:
        lines.append("  optimizer state starts cold for: " + ", ".join(report.cold[:20]))
    lines.extend(f"  {n}" for n in report.notes)
    return "\n".join(lines)


def mismatch_error(where: str, report: MismatchReport) -> StateMismatchError:
    """The error of a strict restore (only raised when strict, so strict=False is the way out)."""
    return StateMismatchError(
        f"{where} does not fit the objects being restored (strict restore):\n{format_mismatch(report)}\n"
        "Was the code changed since the save? Nothing was loaded and the checkpoint is left as it "
        "is. Run 'ckptguard doctor <checkpoint> --model module:factory' for a full report, or "
        "restore(state, strict=False) to load what fits and log each difference.",
        report,
    )


@dataclasses.dataclass
class OptimizerPlan:
    """How saved per-parameter optimizer state maps onto the current optimizer's parameters.

    ``mapping``: current state index -> saved state index. ``new``: trainable parameters that the
    saved optimizer did not hold (staged training / unfreezing: their state starts cold).
    ``unstepped``: parameters the saved optimizer held but had no state for (frozen at save time,
    trainable now: also cold). ``dropped``: saved state for parameters the optimizer no longer
    holds. ``structural``: the parameter groups differ, so a plain ``load_state_dict`` cannot work.
    """

    label: str
    mapping: dict[int, int]
    new: list[str]
    unstepped: list[str]
    dropped: list[str]
    reshaped: list[str]
    structural: bool
    by_name: bool
    groups: list[int | None]  # current group -> saved group whose hyper-parameters it takes
    group_problems: list[str] = dataclasses.field(default_factory=list)  # layouts that do not map 1:1


def _flat_ids(groups: Any) -> list[Any]:
    return [pid for g in groups if isinstance(g, dict) for pid in g.get("params", [])]


def optimizer_plan(model: Any, opt: torch.optim.Optimizer, entry: Mapping[str, Any], sd: Mapping[str, Any], label: str) -> OptimizerPlan:
    """Match saved optimizer state (``sd`` decoded, ``entry`` from state.json) to ``opt``."""
    saved_groups = sd.get("param_groups", []) if isinstance(sd, Mapping) else []
    saved_state = sd.get("state", {}) if isinstance(sd, Mapping) else {}
    saved_ids = _flat_ids(saved_groups)
    saved_names = list(entry.get("param_names") or [])
    now_params = [p for g in opt.param_groups for p in g["params"]]
    now_names = param_names(model, opt) if model is not None else [None] * len(now_params)
    sizes_then = [len(g.get("params", [])) for g in saved_groups if isinstance(g, dict)]
    sizes_now = [len(g["params"]) for g in opt.param_groups]
    by_name = (
        len(saved_names) == len(saved_ids) and all(isinstance(n, str) for n in saved_names)
        and all(isinstance(n, str) for n in now_names)
    )
    if by_name:
        where_saved = {n: i for i, n in enumerate(saved_names)}
        pairs = [(i, where_saved.get(n)) for i, n in enumerate(now_names)]
        structural = [n for n in now_names] != saved_names or sizes_then != sizes_now
    else:
        pairs = [(i, i if i < len(saved_ids) else None) for i in range(len(now_params))]
        structural = sizes_then != sizes_now
    mapping: dict[int, int] = {}
    new: list[str] = []
    unstepped: list[str] = []
    reshaped: list[str] = []
    for i, j in pairs:
        name = now_names[i] or f"{label} param {i}"
        if j is None:
            if now_params[i].requires_grad:
                new.append(name)
            continue
        st = saved_state.get(saved_ids[j])
        if st is None:
            if now_params[i].requires_grad and saved_state:
                unstepped.append(name)
            continue
        shapes = [tuple(v.shape) for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
        if any(s != tuple(now_params[i].shape) for s in shapes):
            reshaped.append(name)
            continue
        mapping[i] = j
    used = set(mapping.values())
    dropped = [
        (saved_names[j] if j < len(saved_names) and saved_names[j] else f"saved param {j}")
        for j, sid in enumerate(saved_ids) if sid in saved_state and j not in used
        and (saved_names[j] if j < len(saved_names) else None) not in reshaped
    ]
    group_of_saved = [gi for gi, g in enumerate(saved_groups) if isinstance(g, dict) for _ in g.get("params", [])]
    groups: list[int | None] = []
    start = 0
    for g in opt.param_groups:
        votes = [group_of_saved[j] for i in range(start, start + len(g["params"])) for j in [dict(pairs).get(i)] if j is not None and j < len(group_of_saved)]
        groups.append(max(set(votes), key=votes.count) if votes else None)
        start += len(g["params"])
    problems = _group_problems(label, saved_groups, opt.param_groups, groups, group_of_saved, pairs)
    return OptimizerPlan(label, mapping, new, unstepped, dropped, reshaped, structural, by_name, groups, problems)


def _hp(group: Mapping[str, Any]) -> str:
    lr = group.get("lr")
    return f"lr={lr}" if isinstance(lr, (int, float)) else "lr=?"


def _group_problems(
    label: str, saved_groups: list[Any], now_groups: list[dict[str, Any]], groups: list[int | None],
    group_of_saved: list[int], pairs: list[tuple[int, int | None]],
) -> list[str]:
    """Param-group layouts whose hyper-parameters cannot be carried over one to one."""
    saved = [g for g in saved_groups if isinstance(g, dict)]
    out = []
    if len(saved) != len(now_groups):
        desc_then = ", ".join(f"{_hp(g)} for {len(g.get('params', []))} params" for g in saved)
        desc_now = ", ".join(f"{_hp(g)} for {len(g['params'])} params" for g in now_groups)
        out.append(
            f"{label} param groups: the checkpoint has {len(saved)} ({desc_then}), the optimizer "
            f"has {len(now_groups)} ({desc_now})"
        )
    start = 0
    for gi, g in enumerate(now_groups):
        src = {group_of_saved[j] for i in range(start, start + len(g["params"])) for j in [dict(pairs).get(i)] if j is not None and j < len(group_of_saved)}
        if len(src) > 1:
            out.append(f"{label} param group {gi}: its parameters come from saved groups {sorted(src)}")
        start += len(g["params"])
    shared = [s for s in set(groups) if s is not None and groups.count(s) > 1]
    for s in sorted(shared):
        now = [gi for gi, x in enumerate(groups) if x == s]
        out.append(f"{label} param groups {now} all map to saved group {s} ({_hp(saved[s])}): loading would overwrite each one's hyper-parameters")
    for si, g in enumerate(saved):
        if si not in groups and g.get("params"):
            out.append(f"{label}: saved param group {si} ({_hp(g)}, {len(g['params'])} params) has no counterpart in the optimizer")
    return out


def check_optimizers(
    model: nn.Module | None, optimizers: Optimizers, state: Mapping[str, Any], report: MismatchReport, where: str
) -> None:
    """Report optimizer differences; a structural one (new parameters) fails strict restores."""
    saved = state.get("optimizers") or {}
    for name, opt in optimizers.items():
        entry = saved.get(name)
        label = f"optimizer {name!r}" if name else "optimizer"
        if entry is None:
            report.notes.append(f"{label}: not in the checkpoint")
            continue
        sd = entry.get("state_dict") if isinstance(entry, Mapping) else None
        if not isinstance(sd, dict) or not isinstance(sd.get("param_groups", []), list):
            # malformed contents, not a code change: the restore pipeline turns this into corruption
            raise TypeError(f"{label}: the saved state is a {type(sd).__name__}, not a state dict")
        if class_differs(entry, opt):
            report.refused.append(
                f"{label}: the checkpoint holds {entry.get('class')} state, the optimizer is "
                f"{type(opt).__name__}; not loaded (its state starts fresh)"
            )
            continue
        plan = optimizer_plan(model, opt, entry, optimizer_structure(entry), label)
        _report_plan(plan, report)


def class_differs(entry: Mapping[str, Any], opt: torch.optim.Optimizer) -> bool:
    saved = entry.get("class") if isinstance(entry, Mapping) else None
    return isinstance(saved, str) and saved != type(opt).__name__


def optimizer_structure(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The optimizer state dict with tensors as placeholders (enough to plan a load)."""
    sd = entry.get("state_dict")
    if not isinstance(sd, dict):
        return {}
    return {"param_groups": sd.get("param_groups", []), "state": _decode_keys(sd.get("state"))}


def _decode_keys(state: Any) -> dict[Any, Any]:
    try:
        decoded = decode(state, ShapeOnly(), "optimizer structure")
    except Exception:  # noqa: BLE001 - structure only; the real load validates properly
        return {}
    return decoded if isinstance(decoded, dict) else {}


def _report_plan(plan: OptimizerPlan, report: MismatchReport) -> None:
    if plan.new:
        report.cold.extend(plan.new)
        report.refused.append(
            f"{plan.label}: no saved state for newly trainable parameters {plan.new[:10]} (unfrozen "
            "since the save?); their state starts cold (Adam moments at zero)"
        )
    elif plan.structural and not plan.by_name and not plan.group_problems:
        report.refused.append(f"{plan.label}: parameter groups differ and parameter names are unknown")
    if plan.dropped:
        report.refused.append(
            f"{plan.label}: the checkpoint holds state for {len(plan.dropped)} parameter(s) the "
            f"optimizer does not hold: {plan.dropped[:10]} (frozen or removed since the save?); "
            "that state is not loaded"
        )
    report.refused.extend(plan.group_problems)
    if plan.unstepped:
        report.cold.extend(plan.unstepped)
        report.notes.append(
            f"{plan.label}: trainable parameters without saved state (frozen at save time?): "
            f"{plan.unstepped[:10]}; their state starts cold"
        )
    if plan.reshaped:
        report.notes.append(f"{plan.label}: saved state has another shape for {plan.reshaped[:10]}; starts cold")


def load_optimizers(
    model: nn.Module | None,
    optimizers: Optimizers,
    saved: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    report: MismatchReport,
    where: str,
    *,
    strict: bool,
) -> None:
    """Load each optimizer's saved state (remapped by parameter name where the layout changed)."""
    for name, opt in optimizers.items():
        entry = saved.get(name)
        if entry is None:
            continue
        label = f"optimizer {name!r}" if name else "optimizer"
        if class_differs(entry, opt):
            continue  # reported by check_optimizers; strict refused before anything was loaded
        sd = decode(entry["state_dict"], tensors, f"{where} optimizer")
        plan = optimizer_plan(model, opt, entry, sd, label)
        partial = plan.structural or plan.reshaped or plan.group_problems
        try:
            opt.load_state_dict(_remap(opt, sd, plan) if partial else sd)
        except Exception as e:
            if strict:
                raise StateMismatchError(
                    f"{where}: the saved {label} state does not fit the current optimizer "
                    f"({type(e).__name__}: {e}). The checkpoint is left as it is; "
                    "restore(state, strict=False) loads the rest and skips this optimizer's state.",
                    report,
                ) from e
            report.notes.append(f"{label}: not restored ({type(e).__name__}: {e})")
            log.warning("%s: %s not restored: %s", where, label, e)
            continue
        if plan.new or plan.unstepped or plan.reshaped:
            log.warning(
                "%s: %s restored partially; state starts cold for %s", where, label,
                ", ".join((plan.new + plan.unstepped + plan.reshaped)[:20]),
            )


def _remap(opt: torch.optim.Optimizer, sd: Mapping[str, Any], plan: OptimizerPlan) -> dict[str, Any]:
    """A state dict for ``opt``: saved state by parameter name, cold for the rest."""
    saved_groups = sd.get("param_groups", [])
    saved_ids = _flat_ids(saved_groups)
    cur = opt.state_dict()
    cur_ids = _flat_ids(cur["param_groups"])
    state = {cur_ids[i]: sd["state"][saved_ids[j]] for i, j in plan.mapping.items()}
    groups = []
    for gi, (g, src) in enumerate(zip(cur["param_groups"], plan.groups)):
        merged = dict(g)
        if src is not None and plan.groups.count(src) == 1:
            merged.update({k: v for k, v in saved_groups[src].items() if k != "params"})
        elif src is not None:
            log.warning("%s param group %d keeps its own hyper-parameters (%s): several groups map to saved group %d", plan.label, gi, _hp(g), src)
        groups.append(merged)
    return {"state": state, "param_groups": groups}
