"""RUN/history.jsonl: what happened to the run after its commits (retention deletions, hangs).

One JSON object per line, appended: ``{"event": "pruned", "step": 1200, "time": ..., "reason": ...}``.
It lets ``ckptguard plot`` show where pruned checkpoints were. ``"hang"`` events (``step``: the
last step completed, ``reason``: the rank, why, and where its stacks went) come from the watchdog
of every rank that hung. Best effort: a failure to record is logged and never fails a save; a
torn last line is skipped by the reader.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from typing import Any

from ckptguard.errors import CheckpointError
from ckptguard.format import safejson
from ckptguard.storage.base import Storage, read_capped

__all__ = ["HISTORY_FILE", "read_history", "record_events"]

log = logging.getLogger(__name__)
HISTORY_FILE = "history.jsonl"
MAX_HISTORY_BYTES = 64 * 1024 * 1024  # ~800,000 events of ~80 bytes


def record_events(storage: Storage, event: str, steps: Iterable[int], reason: str = "") -> None:
    """Append one ``event`` line per step (e.g. ``"pruned"``)."""
    now = round(time.time(), 3)
    lines = [json.dumps({"event": event, "step": int(s), "time": now, "reason": reason}) for s in steps]
    if not lines:
        return
    try:
        storage.append(HISTORY_FILE, ("\n".join(lines) + "\n").encode())
    except CheckpointError as e:
        log.warning("Could not record %s of steps %s in %s: %s", event, steps, HISTORY_FILE, e)


def read_history(storage: Storage) -> list[dict[str, Any]]:
    """Every well-formed event, oldest first (missing or unreadable file: none, with a warning)."""
    try:
        if not storage.exists(HISTORY_FILE):
            return []
        text = read_capped(storage, HISTORY_FILE, MAX_HISTORY_BYTES, "an event history").decode("utf-8", errors="replace")
    except CheckpointError as e:
        log.warning("Ignoring %s (treated as absent): %s", storage.describe(HISTORY_FILE), e)
        return []
    out = []
    for line in text.splitlines():
        try:
            rec = safejson.loads(line, max_depth=8)
        except ValueError:
            continue  # a torn line from a crash, or not an event
        if isinstance(rec, dict) and isinstance(rec.get("event"), str) and isinstance(rec.get("step"), int):
            out.append(rec)
    return out
