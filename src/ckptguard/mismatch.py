"""What does not fit between a checkpoint and today's code, and how it is reported and loaded."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ckptguard.codec import decode
from ckptguard.errors import StateMismatchError

if TYPE_CHECKING:
    from ckptguard.state import MismatchReport, TrainState

__all__ = ["check_optimizers", "format_mismatch", "likely_renames", "load_optimizers", "mismatch_error"]

log = logging.getLogger(__name__)


def likely_renames(report: MismatchReport, shapes: Mapping[str, tuple[int, ...]] | None = None) -> list[tuple[str, str]]:
    """Pairs (saved key, model key) with the most similar names among missing/unexpected keys."""
    pairs = []
    pool = list(report.missing)
    for old in report.unexpected:
        match = difflib.get_close_matches(old, pool, n=1, cutoff=0.6)
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
    for k, saved, now in report.retyped[:20]:
        lines.append(f"  dtype of {k!r}: checkpoint has {saved}, model has {now}")
    for old, new in likely_renames(report):
        lines.append(f"  likely rename: {old!r} -> {new!r}")
    lines.extend(f"  {n}" for n in report.notes)
    return "\n".join(lines)


def mismatch_error(where: str, report: MismatchReport) -> StateMismatchError:
    return StateMismatchError(
        f"{where} does not fit the model being restored:\n{format_mismatch(report)}\n"
        "Was the model changed? Run 'ckptguard doctor <checkpoint> --model module:factory' for a "
        "full report, or restore(state, strict=False) to load what matches.",
        report,
    )


def check_optimizers(ts: TrainState, state: Mapping[str, Any], report: MismatchReport, where: str) -> None:
    saved = state.get("optimizers") or {}
    for name, opt in ts.optimizers.items():
        entry = saved.get(name)
        label = f"optimizer {name!r}" if name else "optimizer"
        if entry is None:
            report.notes.append(f"{label}: not in the checkpoint")
            continue
        groups = entry["state_dict"].get("param_groups", []) if isinstance(entry.get("state_dict"), dict) else []
        saved_sizes = [len(g.get("params", [])) for g in groups if isinstance(g, dict)]
        now_sizes = [len(g["params"]) for g in opt.param_groups]
        if saved_sizes != now_sizes:
            report.notes.append(
                f"{label}: parameter groups hold {saved_sizes} parameters in the checkpoint and "
                f"{now_sizes} now"
            )
            report.retyped.append((f"{label} param_groups", str(saved_sizes), str(now_sizes)))


def load_optimizers(
    ts: TrainState,
    saved: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    report: MismatchReport,
    where: str,
    *,
    strict: bool,
) -> None:
    for name, opt in ts.optimizers.items():
        entry = saved.get(name)
        if entry is None:
            continue
        sd = decode(entry["state_dict"], tensors, f"{where} optimizer")
        try:
            opt.load_state_dict(sd)
        except (ValueError, KeyError, RuntimeError) as e:
            if strict:
                raise StateMismatchError(
                    f"{where}: the optimizer state does not fit the current optimizer ({e}). "
                    "Pass strict=False to load the model and skip mismatched optimizer state.",
                    report,
                ) from e
            report.notes.append(f"optimizer {name!r}: not restored ({e})")
            log.warning("%s: optimizer %r not restored: %s", where, name, e)
