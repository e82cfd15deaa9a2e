"""Who holds a run lock: its record, whether its process is alive, and how to say so.

A lock record (JSON, in ``RUN/.ckptguard.run.lock``) names the holder's session, pid, host, boot id and
pid namespace, when it took the lock and when it last refreshed it. A pid can only be checked from
the same host, boot and pid namespace; anywhere else a holder's liveness is "unknown".
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from typing import Any

__all__ = ["describe_holder", "holder_state", "identity", "parse_record", "pid_alive", "process_started", "processes_holding"]

_PID_MAX = 2**22  # Linux's largest pid_max

def _read_small(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read(256).decode("ascii", "replace").strip() or None
    except OSError:
        return None


def identity() -> dict[str, Any]:
    """Where this process runs: enough to tell whether a pid in a record is one we can check."""
    try:
        pidns: str | None = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = None
    return {"host": socket.gethostname(), "boot_id": _read_small("/proc/sys/kernel/random/boot_id"), "pidns": pidns}


def process_started(pid: int) -> float | None:
    """Wall-clock start time of ``pid`` (Linux /proc), or None when unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read(4096).decode("ascii", "replace")
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f.read(65536).decode().splitlines() if line.startswith("btime"))
        ticks = int(stat_line[stat_line.rindex(")") + 2 :].split()[19])
        return btime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder_state(record: dict[str, Any]) -> str:
    """``"alive"``, ``"exited"`` or ``"unknown"`` (another host, container or boot: not checkable)."""
    pid = record.get("pid")
    if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid <= _PID_MAX:
        return "unknown"
    me = identity()
    if any(record.get(k) != me[k] or me[k] is None for k in ("host", "boot_id", "pidns")):
        return "unknown"
    if not pid_alive(pid):
        return "exited"
    started, since = process_started(pid), record.get("since")
    if started is not None and isinstance(since, (int, float)) and started > since + 5:
        return "exited"  # the pid now belongs to a younger process
    return "alive"


def parse_record(raw: bytes | None) -> dict[str, Any] | None:
    try:
        rec = json.loads(raw.decode()) if raw else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return rec if isinstance(rec, dict) else None


def _when(t: Any) -> str:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        return "an unknown time"
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))
    except (OverflowError, OSError, ValueError):
        return "an unknown time"


def describe_holder(rec: dict[str, Any] | None, state: str) -> str:
    """One phrase naming a holder: pid, host, session, since, last refresh, whether it is alive."""
    if not rec:
        return "an unknown holder (its record is missing or unreadable)"
    text = (
        f"pid {str(rec.get('pid'))[:20]} on host {str(rec.get('host'))[:100]} "
        f"(session {str(rec.get('session', '?'))[:12]}), since {_when(rec.get('since'))}"
    )
    refreshed = rec.get("refreshed")
    if isinstance(refreshed, (int, float)) and not isinstance(refreshed, bool):
        text += f", last refreshed {max(0.0, time.time() - refreshed):.0f}s ago"
    if state == "alive":
        mine = rec.get("pid") == os.getpid()
        return text + (": alive (this very process: another CheckpointManager or RunLock here holds it; close() that one first)" if mine else ": alive")
    if state == "exited":
        return text + ": that process has exited"
    return text + ": on another host or container, so whether it is alive cannot be checked from here"


def processes_holding(path: str) -> list[str]:
    """``"pid (name)"`` of every other process with ``path`` open (Linux /proc; best effort)."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                fst = os.stat(f"/proc/{entry}/fd/{fd}")
            except OSError:
                continue
            if (fst.st_dev, fst.st_ino) == (st.st_dev, st.st_ino):
                found.append(f"{entry} ({_read_small(f'/proc/{entry}/comm') or '?'})")
                break
    return found
