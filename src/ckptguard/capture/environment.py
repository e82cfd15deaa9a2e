"""The environment a checkpoint was written in: git state, library versions, host, device."""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
from typing import Any

import numpy as np
import torch

__all__ = ["collect_environment", "git_output", "git_state"]


def git_output(args: list[str], cwd: str) -> str | None:
    """The standard output of ``git ARGS`` run in ``cwd``, or None when git is missing, fails or
    takes over 5 s (a checkpoint never fails because of git)."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state(cwd: str | None = None) -> dict[str, Any]:
    """Commit, dirty flag and changed files of the git work tree containing ``cwd`` (or {})."""
    cwd = cwd or os.getcwd()
    commit = git_output(["rev-parse", "HEAD"], cwd)
    if commit is None:
        return {}
    status = git_output(["status", "--porcelain", "--untracked-files=no"], cwd) or ""
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    return {"commit": commit.strip(), "dirty": bool(changed), "changed_files": changed[:100]}


def collect_environment(cwd: str | None = None) -> dict[str, Any]:
    from ckptguard.version import __version__

    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda x{torch.cuda.device_count()} ({torch.cuda.get_device_name(0)})"
    return {
        "git": git_state(cwd),
        "python": platform.python_version(),
        "python_implementation": sys.implementation.name,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "ckptguard": __version__,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "device": device,
        "pid": os.getpid(),
    }
