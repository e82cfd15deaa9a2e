"""RUN/ckptguard.json: what a run recorded about itself (policy, save interval, sessions).

Written atomically (``storage.replace_file``) after every commit and at ``close()``; read by
``ckptguard prune`` (the policy) and by ``every="auto"`` (the observed mean time between
failures). Schema::

    {"format_version": 1, "updated": 1.8e9,
     "retention": {...Retention.to_json()...},
     "save_interval": {"mode": "auto", "auto_seconds": 57.0, "save_cost_seconds": 0.15, ...},
     "sessions": [{"id": "...", "run_id": "...", "start": t0, "last_seen": t1,
                   "resumed_from": 1200 | null, "clean": false, "preempted": false,
                   "hang": {"rank": 0, "step": 5, "reason": "...", "report": ".../hangs/...", "time": t}
                   (only when the watchdog ended it)}, ...]}

A session is one process's life with the run; one that ends without a clean ``close()`` is an
interruption (a hang the watchdog turned into an exit included: it writes the session first, so
that its time up to the hang counts). The newest 1000 sessions are kept.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any

from ckptguard.errors import CheckpointError, CheckpointNotFoundError, CorruptCheckpointError
from ckptguard.format import safejson
from ckptguard.run.history import record_events
from ckptguard.storage.base import Storage, read_capped

__all__ = ["RUN_FILE", "RunRecord", "load_run_record", "read_run_record"]

log = logging.getLogger(__name__)
RUN_FILE = "ckptguard.json"
MAX_SESSIONS = 1000
MAX_RUN_FILE_BYTES = 16 * 1024 * 1024  # 1000 sessions of ~300 bytes, a policy: ~0.3 MB


def load_run_record(storage: Storage) -> dict[str, Any]:
    """The run's record: {} when absent, or when damaged (not JSON, too large: with a warning; the
    next write replaces it). Raises the storage's :class:`CheckpointError` when the store failed
    to say (a network cut): a writer must never take that for an absent record."""
    try:
        if not storage.exists(RUN_FILE):
            return {}
        data = safejson.loads(read_capped(storage, RUN_FILE, MAX_RUN_FILE_BYTES, "a run record"))
    except CheckpointNotFoundError:
        return {}  # removed between the check and the read
    except (CorruptCheckpointError, ValueError) as e:
        log.warning("Ignoring damaged %s (treated as absent): %s", storage.describe(RUN_FILE), e)
        return {}
    return data if isinstance(data, dict) else {}


def read_run_record(storage: Storage) -> dict[str, Any]:
    """The run's record, or {} when absent or unreadable (it is advisory, never trusted blindly).
    Readers only: a writer merges into :func:`load_run_record`'s answer."""
    try:
        return load_run_record(storage)
    except CheckpointError as e:
        log.warning("Ignoring unreadable %s (treated as absent): %s", storage.describe(RUN_FILE), e)
        return {}


class RunRecord:
    """One manager's session in the run record; thread-safe (async saves update it)."""

    def __init__(self, storage: Storage, run_id: str) -> None:
        self.storage = storage
        self._lock = threading.Lock()
        self._pending: dict[str, Any] = {}  # fields of writes that could not be made yet
        self.session: dict[str, Any] = {
            "id": uuid.uuid4().hex[:12], "run_id": run_id, "start": time.time(),
            "last_seen": time.time(), "resumed_from": None, "clean": False, "preempted": False,
        }

    def previous_sessions(self) -> list[dict[str, Any]]:
        sessions = read_run_record(self.storage).get("sessions")
        if not isinstance(sessions, list):
            return []
        return [s for s in sessions if isinstance(s, dict) and s.get("id") != self.session["id"]]

    def write(self, **fields: Any) -> None:
        """Merge ``fields`` and this session into ckptguard.json. Best effort: logs on failure.
        When the record cannot be read (the store failed), nothing is written (the run's earlier
        sessions are never replaced by this one alone): ``fields`` wait for the next write."""
        with self._lock:
            self.session["last_seen"] = time.time()
            self._pending.update(fields)
            try:
                record = load_run_record(self.storage)
            except CheckpointError as e:
                log.warning("Could not read %s, so it was not updated (its earlier sessions are kept); the next "
                            "write tries again: %s", self.storage.describe(RUN_FILE), e)
                return
            record.update(self._pending)
            record["format_version"] = 1
            record["updated"] = time.time()
            sessions = [s for s in record.get("sessions") or [] if isinstance(s, dict)]
            sessions = [s for s in sessions if s.get("id") != self.session["id"]] + [dict(self.session)]
            record["sessions"] = sessions[-MAX_SESSIONS:]
            try:
                self.storage.replace_file(RUN_FILE, json.dumps(record, indent=1).encode())
            except CheckpointError as e:
                log.warning("Could not update %s: %s", self.storage.describe(RUN_FILE), e)
                return
            self._pending = {}

    def record_hang(self, hang: dict[str, Any], *, end_session: bool = True) -> None:
        """The watchdog's ``hang``: a ``hang`` event in history.jsonl; with ``end_session`` (the
        rank that writes the run) this session ends in it: an interruption (MTBF), written now."""
        where = hang["report"] or "stderr"
        record_events(self.storage, "hang", [hang["step"] or 0], reason=f"rank {hang['rank']}: {hang['reason']}; stacks: {where}")
        if not end_session:
            return
        self.session["hang"] = dict(hang)
        self.session["clean"] = False
        self.write()
