"""Shared helpers of the CLI commands: consoles, JSON output, sizes, error exits."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.console import Console

__all__ = ["console", "err_console", "fail", "human_bytes", "print_json", "add_json_flag"]

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


def fail(e: BaseException, code: int = 2) -> int:
    err_console().print(f"[bold red]error:[/] {e}", highlight=False)
    return code
