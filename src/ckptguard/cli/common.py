"""Shared helpers of the CLI commands: consoles, JSON output, sizes, error exits."""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any

from rich.console import Console

from ckptguard.run.catalog import scan
from ckptguard.storage import Storage
from ckptguard.tiers.tiered import tier_listing

__all__ = [
    "add_json_flag", "check_target", "console", "err_console", "fail", "human_bytes", "path_kind", "print_json", "problem_text",
]

_console: Console | None = None
_err: Console | None = None


def console() -> Console:
    global _console
    if _console is None:
        # Piped output (scripts, CI logs) gets a wide table instead of rich's 80-column default.
        width = None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", "160"))
        _console = Console(soft_wrap=False, width=width)
    return _console


def err_console() -> Console:
    global _err
    if _err is None:
        _err = Console(stderr=True, soft_wrap=True)
    return _err


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def add_json_flag(p: Any) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def problem_text(status: str, text: str) -> str:
    """A checkpoint's problem, said once: without the status it repeats ("marked corrupt: ...") and
    without a file name its path repeats ("model.safetensors: /run/step-N/model.safetensors: ...")."""
    text = text.removeprefix(f"marked {status}: ")
    return re.sub(r"^([\w.\-]+): (\S*/\1): ", r"\2: ", text)


def fail(e: BaseException, code: int = 2) -> int:
    err_console().print(f"[bold red]error:[/] {e}", highlight=False)
    return code


# ---- what a path given on the command line is ------------------------------------------------

_STEP_RE = re.compile(r"^step-\d{9,}$")


def path_kind(path: str) -> str:
    """``url``, ``missing``, ``file``, ``checkpoint`` (a step directory or one holding MANIFEST.json),
    ``run`` (any other directory). Local paths only are looked at; URLs are left to the storage."""
    if "://" in path:
        return "url"
    p = path.rstrip("/") or "/"
    if not os.path.lexists(p):
        return "missing"
    if not os.path.isdir(p):
        return "file"
    if _STEP_RE.match(os.path.basename(os.path.abspath(p))) or os.path.lexists(os.path.join(p, "MANIFEST.json")):
        return "checkpoint"
    return "run"


def _what_file(p: str) -> str:
    name = os.path.basename(p)
    if name == "MANIFEST.json":
        return f"the manifest of the checkpoint {os.path.dirname(os.path.abspath(p))}"
    if name.endswith(".safetensors"):
        return "a safetensors file"
    if not os.path.isfile(p):
        return "not a regular file or a directory"
    return f"a regular file ({os.path.getsize(p)} bytes)"


def check_target(path: str, *, want: str, flag: str = "") -> str:
    """Refuse, with a message that says what ``path`` is and what to pass, a path that is missing
    or not a directory. ``want``: ``run`` (ls, prune, pin, plot) or ``checkpoint`` (a checkpoint
    or a run: verify, inspect, doctor, export, diff). Returns :func:`path_kind`."""
    from ckptguard.errors import CheckpointNotFoundError

    kind = path_kind(path)
    what = "a run directory (runs/exp1)" if want == "run" else "a checkpoint directory (runs/exp1/step-000001200) or a run directory"
    label = f"{flag} {path}" if flag else path
    if kind == "missing":
        parent = os.path.dirname(os.path.abspath(path.rstrip("/")))
        hint = "" if os.path.isdir(parent) else f" (nor does its folder {parent})"
        raise CheckpointNotFoundError(f"{label} does not exist{hint}. Pass {what}.")
    if kind == "file":
        p = path.rstrip("/")
        if os.path.basename(p) == "MANIFEST.json":
            hint = f"pass its folder {os.path.dirname(os.path.abspath(p))}"
        else:
            hint = f"pass {what}"
        raise CheckpointNotFoundError(f"{label} is {_what_file(p)}, not a directory: {hint}.")
    return kind


def require_run(path: str, command: str) -> None:
    """For commands that act on a whole run: refuse a checkpoint directory, naming its run."""
    if check_target(path, want="run") == "checkpoint":
        from ckptguard.errors import CheckpointNotFoundError

        run = os.path.dirname(os.path.abspath(path.rstrip("/")))
        raise CheckpointNotFoundError(
            f"{path} is a checkpoint directory; '{command}' works on a whole run. Its run is {run}: "
            f"run 'ckptguard {command} {run} ...'."
        )


def tier_note(storage: Storage) -> str | None:
    """For a tiered run (ckptguard.tiers): which faster tiers this host holds and their newest
    step, since the other commands read the run's own (durable) directory; None otherwise."""
    tiers, elsewhere = tier_listing(storage)
    held = []
    for name, tier in tiers[:-1]:
        steps = [c.step for c in scan(tier, check_files=False) if c.valid]
        if steps:
            held.append(f"{name} {tier.url} (newest step {max(steps)})")
    if not held:
        return f"a tiered run: {elsewhere}" if elsewhere else None
    return ("a tiered run: this reads its durable tier; its faster tiers on this host hold " + "; ".join(held)
            + ". 'ckptguard ls RUN' lists every tier; 'ckptguard verify DIR' checks one.")
