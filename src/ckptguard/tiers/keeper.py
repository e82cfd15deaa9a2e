"""The keeper: a small process that owns the hot tier's shared memory and outlives the trainer.

The manager starts it (``python -m ckptguard.tiers.keeper HOT_DIR``, in a session of its own, so a
signal to the trainer's process group does not reach it) the first time the run saves to or
restores from the hot tier, and starts a new one if it dies. The hot tier is a directory on a
tmpfs (``/dev/shm``): its checkpoints survive the trainer's death (SIGKILL, OOM kill, an exception,
a hang the watchdog ended) and a restarted trainer restores from them in memory. The keeper's
files are in ``HOT_DIR/.keeper/``: ``config.json`` (the lower tiers), ``trainer.json`` (the
attached trainer: pid and start time), ``keeper.json`` (itself) and ``log``.

How the keeper ends (every way):

- the trainer closed the run cleanly: the manager copied the newest checkpoint down and removed
  ``HOT_DIR``; the keeper sees it gone and exits;
- the trainer died and no new trainer attached within ``grace_seconds``: the keeper copies the
  newest hot checkpoint that the durable tier lacks to the local and durable tiers ("persist at
  breakpoint", recorded as ``persisted`` in ``history.jsonl``), removes ``HOT_DIR`` and exits.
  While the durable tier fails (unreachable, a copy cut short) the memory stays: the keeper logs
  "could not persist step N to URL: the hot copy stays in HOT_DIR; retrying in Ts" and tries
  again, pausing longer each time (up to ``RETRY_MAX``), until it persists or a trainer attaches
  (then it waits again). Only a hot copy that fails its own checksums gives way to an older one;
- SIGTERM (the node is being preempted): it waits up to ``TERM_WAIT`` seconds for the trainer's own
  preemption save to end, persists as above (tried again for up to ``TERM_WAIT`` seconds more),
  removes ``HOT_DIR`` once persisted and the trainer is gone, exits (an unpersisted copy stays);
- another keeper took over ``keeper.json`` (a restart after this one was thought dead): it exits,
  touching nothing.

A durable copy is written under the run's writer lock: the dead trainer's lock is taken over
(same host, its process gone); if a live writer elsewhere holds the run, nothing is persisted
(that writer's checkpoints are the run now).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ckptguard.errors import CheckpointError, CorruptCheckpointError, RunLockedError
from ckptguard.persist.writer import clean_debris
from ckptguard.run.catalog import CheckpointInfo, scan
from ckptguard.run.history import record_events
from ckptguard.run.lock import RunLock
from ckptguard.run.lockholder import pid_alive, process_started
from ckptguard.storage import Storage, open_storage
from ckptguard.storage.local import LocalStorage
from ckptguard.tiers.copying import copy_checkpoint, remove_root, same_checkpoint

__all__ = [
    "KEEPER_DIR", "TERM_WAIT", "NotPersistedError", "persist_newest", "persist_until", "process_token", "read_json",
    "run_keeper", "write_json",
]

log = logging.getLogger(__name__)

KEEPER_DIR = ".keeper"
TERM_WAIT = 30.0  # seconds the keeper waits at SIGTERM for the trainer's own preemption save
POLL = 0.2
RETRY_FIRST = 1.0  # seconds before the first retry of a persist the durable tier failed
RETRY_MAX = 30.0  # the longest pause between retries (an outage may last hours)


def process_token(pid: int) -> dict[str, Any] | None:
    """A process's identity (pid and start time: a reused pid is another process), or None when gone."""
    started = process_started(pid)
    if started is None or not pid_alive(pid):
        return None
    return {"pid": pid, "started": round(started, 2)}


def is_alive(token: object) -> bool:
    if not isinstance(token, dict) or not isinstance(token.get("pid"), int):
        return False
    return process_token(token["pid"]) == token


def read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: str, data: dict[str, Any]) -> None:
    """Replace ``path`` atomically (rename of a temporary file beside it)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)


class NotPersistedError(CheckpointError):
    """The hot checkpoint of ``step`` could not be persisted to the durable tier at ``url`` now (the
    store unreachable, a copy cut short): the hot copy must stay; the keeper tries again later."""

    def __init__(self, message: str, *, step: int, url: str) -> None:
        super().__init__(message)
        self.step = step
        self.url = url


def _is_source_damage(e: CheckpointError, hot: LocalStorage, name: str) -> bool:
    """Whether ``e`` says the hot copy ``name`` itself fails its checksums (nothing was written)."""
    return isinstance(e, CorruptCheckpointError) and e.path.startswith(hot.describe(name))


def _copy_down(hot: LocalStorage, c: CheckpointInfo, lower: list[Storage]) -> bool:
    """Copy ``c`` to each lower tier (the durable tier last, its failure raised; a local tier's
    failure is logged); False when the hot copy is damaged (an older one may do)."""
    for tier in lower:
        try:
            if not same_checkpoint(hot, tier, c.name):
                copy_checkpoint(hot, c.name, tier)
        except CheckpointError as e:
            if _is_source_damage(e, hot, c.name):
                log.error("Not persisting %s: %s", c.path, e)
                return False
            if tier is lower[-1]:
                raise
            log.error("Could not copy %s to %s: %s", c.path, tier.url, e)
    return True


def persist_newest(hot: str, config: dict[str, Any], why: str) -> int | None:
    """Copy the newest hot checkpoint the durable tier lacks to the local and durable tiers;
    return its step. None: nothing to persist (the durable tier is as new, no sound hot copy, or
    another writer holds the run). Raises :class:`NotPersistedError` when the durable tier failed
    (its scan, the run lock, a copy): the hot copy must stay, to be persisted later."""
    hot_storage = LocalStorage(hot)
    sound = [c for c in scan(hot_storage) if c.valid]
    if not sound:
        return None
    durable = open_storage(config["durable"], config.get("storage_options") or None)
    lower = ([LocalStorage(config["local"])] if config.get("local") else []) + [durable]
    step = sound[-1].step
    try:
        durable_steps = [c.step for c in scan(durable, check_files=False) if c.valid]
        for c in reversed(sound):
            step = c.step
            if durable_steps and c.step <= max(durable_steps):
                return None  # the durable tier is as new: nothing is lost
            lock = RunLock(durable)
            try:
                lock.acquire()
            except RunLockedError as e:
                log.warning("Not persisting %s: another writer holds the run (%s)", c.path, e)
                record_events(durable, "discarded", [c.step], reason=f"hot copy not persisted: another writer holds the run ({e})")
                return None
            try:
                clean_debris(durable)  # a copy the trainer's death cut short (we hold the lock now)
                if not _copy_down(hot_storage, c, lower):
                    continue  # a damaged hot copy: an older one may do
                record_events(durable, "persisted", [c.step], reason=why)
                log.info("Persisted step %d to %s: %s", c.step, durable.url, why)
                return c.step
            finally:
                lock.release()
    except CheckpointError as e:
        raise NotPersistedError(f"Could not persist step {step} to {durable.url}: {e}", step=step, url=durable.url) from e
    return None


def persist_until(hot: str, config: dict[str, Any], why: str, *, stop: Callable[[], bool], deadline: float | None = None) -> bool:
    """:func:`persist_newest`, tried again with a growing pause while the durable tier fails (the
    memory stays meanwhile); True once done (persisted, or nothing to persist), False when
    ``stop()`` came true (checked every POLL seconds) or ``deadline`` (monotonic) passed first."""
    pause = RETRY_FIRST
    while True:
        try:
            persist_newest(hot, config, why)
            return True
        except NotPersistedError as e:
            left = math.inf if deadline is None else deadline - time.monotonic()
            if left <= 0:
                log.error("Could not persist step %d to %s in time: the hot copy stays in %s (%s)", e.step, e.url, hot, e.__cause__)
                return False
            wait = min(pause, left)
            log.warning("Could not persist step %d to %s: the hot copy stays in %s; retrying in %.0fs (%s)",
                        e.step, e.url, hot, wait, e.__cause__)
        until = time.monotonic() + wait
        while time.monotonic() < until:
            if stop():
                return False
            time.sleep(POLL)
        pause = min(pause * 2, RETRY_MAX)


def run_keeper(hot: str) -> int:
    """The keeper's life (see the module docstring); returns the exit code."""
    kdir = os.path.join(hot, KEEPER_DIR)
    config = read_json(os.path.join(kdir, "config.json"))
    if config is None:
        log.error("%s has no readable config.json; nothing to keep", kdir)
        return 2
    me = process_token(os.getpid())
    assert me is not None
    write_json(os.path.join(kdir, "keeper.json"), me)
    term = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: term.set())
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    grace = float(config.get("grace_seconds", 60.0))

    def trainer() -> bool:
        return is_alive(read_json(os.path.join(kdir, "trainer.json")))

    def displaced() -> bool:
        return not os.path.isdir(hot) or read_json(os.path.join(kdir, "keeper.json")) != me

    dead_since: float | None = None
    while True:
        if displaced():
            return 0  # the trainer closed the run and freed the memory, or another keeper keeps it
        trainer_alive = trainer()
        if term.is_set():
            deadline = time.monotonic() + TERM_WAIT
            while trainer_alive and time.monotonic() < deadline:
                time.sleep(POLL)
                trainer_alive = trainer()
            why = "the node was preempted (SIGTERM to the keeper)"
            done = persist_until(hot, config, why, stop=displaced, deadline=time.monotonic() + TERM_WAIT)
            if done and not trainer():
                remove_root(hot)
            return 0
        now = time.monotonic()
        dead_since = None if trainer_alive else (dead_since or now)
        if dead_since is not None and now - dead_since >= grace:
            why = f"the training process ended and none restored within {grace:g}s"
            if persist_until(hot, config, why, stop=lambda: term.is_set() or trainer() or displaced()):
                remove_root(hot)
                return 0
            dead_since = None  # a trainer attached (or SIGTERM): wait again
        term.wait(POLL)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m ckptguard.tiers.keeper HOT_DIR\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s keeper %(process)d %(levelname)s %(message)s")
    return run_keeper(os.path.abspath(args[0]))


if __name__ == "__main__":
    sys.exit(main())
