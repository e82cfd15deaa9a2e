"""One writer per run: a lock that names its holder, stays fresh while held, and is checked
again before every commit.

**Local runs** lock ``RUN/.ckptguard.run.lock`` with ``flock``. The kernel drops the lock when the last
descriptor of its open file closes, so a killed writer never leaves it stale. A forked child
would share it (DataLoader workers outlive a SIGKILLed trainer by seconds), so the descriptor is
close-on-exec and is closed in every child forked from Python (``ckptguard.run.lockfile``). Should
the recorded holder have exited while the file is still locked (a process it started kept the
descriptor some other way), acquisition waits up to ``LockPolicy.orphan_wait`` seconds, then
names the exited holder and the processes still holding the file. The file records the holder's
session, pid, host and start time; a lock file removed or replaced while held is noticed before
the next commit.

**Object stores** keep the same record in the object ``RUN/.ckptguard.run.lock``:

- ownership is the *session* (random, one per lock), never the pid, so a second manager in the
  same process is refused like any other writer;
- a background heartbeat re-reads the record every ``heartbeat_seconds`` and, while it still
  names this session, rewrites it with a conditional write; a record not refreshed for
  ``stale_after`` seconds is stale (as is one whose holder is a dead process on this machine:
  same host, boot and pid namespace) and may be taken over;
- creating and taking over are conditional writes (S3 ``If-None-Match: *`` / ``If-Match``;
  ``memory://`` under one process-wide lock); where a store has none, the writer reads its record
  back after ``settle_seconds``;
- before each commit the holder re-reads the record: when another session holds the run, the
  save stops with :class:`~ckptguard.errors.RunLockLostError` and commits nothing.

Limits: hosts must agree on the time to well within ``stale_after`` (NTP). A writer frozen
between that last re-read and its manifest write (milliseconds) can still commit once; a writer
frozen in the middle of writing an object-store checkpoint can, on waking, overwrite files of that
step before it notices the loss (the checksums then report the damage and restore falls back).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import threading
import time
import uuid
import weakref
from typing import Any

from ckptguard.errors import RunLockedError, RunLockLostError
from ckptguard.run.lockfile import RECORD_MAX, close_quietly, forget_in_children, keep_from_children, open_lock_file, read_fd_record
from ckptguard.run.lockholder import describe_holder, holder_state, identity, parse_record, processes_holding
from ckptguard.storage.base import ConditionalWrites, EmulatedConditionalWrites, Storage
from ckptguard.storage.local import LocalStorage

__all__ = ["LOCK_NAME", "LockPolicy", "RunLock", "abandon"]

log = logging.getLogger(__name__)

LOCK_NAME = ".ckptguard.run.lock"


@dataclasses.dataclass(frozen=True)
class LockPolicy:
    """How the run lock behaves (pass to ``CheckpointManager(lock=...)`` or ``RunLock``).

    Args:
        stale_after: seconds without a refresh after which an object-store lock may be taken over.
        heartbeat_seconds: how often the holder refreshes it (default ``stale_after / 6``); at most
            half of ``stale_after``.
        orphan_wait: local runs: how long to wait for processes left behind by an exited holder
            that still hold the lock file.
        settle_seconds: stores without conditional writes: the pause before reading back the
            record just written.
    """

    stale_after: float = 600.0
    heartbeat_seconds: float | None = None
    orphan_wait: float = 10.0
    settle_seconds: float = 1.0

    def __post_init__(self) -> None:
        for name in ("stale_after", "orphan_wait", "settle_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"LockPolicy.{name} must be a finite number of seconds >= 0, got {value!r}")
        if self.stale_after <= 0:
            raise ValueError(f"LockPolicy.stale_after must be > 0, got {self.stale_after!r}")
        hb = self.heartbeat_seconds
        if hb is not None and (isinstance(hb, bool) or not isinstance(hb, (int, float)) or not 0 < hb <= self.stale_after / 2):
            raise ValueError(
                f"LockPolicy.heartbeat_seconds must be > 0 and at most half of stale_after "
                f"({self.stale_after}), got {hb!r}"
            )

    @property
    def interval(self) -> float:
        return float(self.heartbeat_seconds) if self.heartbeat_seconds is not None else self.stale_after / 6


_ABANDONED: set[object] = set()  # sessions of object-store locks this process gave up unreachable (abandon())


# ---- object stores: a compare-and-swap record -----------------------------------------------------


def _unwrap(storage: Storage, kind: type) -> Any:
    """``storage`` or the first object of ``kind`` behind wrappers that expose ``.inner``."""
    s: Any = storage
    for _ in range(16):
        if isinstance(s, kind):
            return s
        s = getattr(s, "inner", None)
        if s is None:
            return None
    return None


def _heartbeat(ref: weakref.ReferenceType[RunLock], stop: threading.Event, interval: float) -> None:
    failures = 0
    while not stop.wait(interval):
        lock = ref()
        if lock is None:
            return
        try:
            lock.refresh()
            failures = 0
        except RunLockLostError as e:
            log.error("Lost the run lock: %s", e)
            return
        except Exception as e:  # noqa: BLE001 - a refresh that failed is retried at the next beat
            failures += 1
            log.warning("Could not refresh the run lock of %s (%d in a row): %s", lock.storage.url, failures, e)
        del lock


# ---- the lock -------------------------------------------------------------------------------------


class RunLock:
    """Exclusive writer lock of a run directory. Use as a context manager or acquire()/release().

    ``check()`` (before a commit) raises :class:`RunLockLostError` when another writer holds the
    run now; ``refresh()`` does the same and renews an object-store record (the heartbeat calls it).
    """

    def __init__(self, storage: Storage, *, stale_after: float | None = None, policy: LockPolicy | None = None) -> None:
        if stale_after is not None and policy is not None:
            raise ValueError("pass stale_after or policy, not both")
        self.storage = storage
        self.policy = policy if policy is not None else LockPolicy(stale_after=600.0 if stale_after is None else stale_after)
        self.stale_after = self.policy.stale_after
        self.session = uuid.uuid4().hex
        self._local: LocalStorage | None = _unwrap(storage, LocalStorage)
        self._cas: Any = None
        self._fd: int | None = None
        self._inode: tuple[int, int] | None = None
        self._owner_pid = os.getpid()
        self._since = 0.0
        self._version: str | None = None
        self._finalizer: weakref.finalize[..., RunLock] | None = None
        self._held = False
        self._lost: RunLockLostError | None = None
        self._mutex = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._held and self._lost is None

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def _record(self) -> dict[str, Any]:
        record = {"session": self.session, "pid": os.getpid(), **identity(), "since": self._since}
        if self._local is None:  # object stores: refreshed by the heartbeat, stale without it
            record.update(refreshed=time.time(), stale_after=self.stale_after)
        return record

    def _refusal(self, holder: dict[str, Any] | None, state: str, extra: str = "") -> RunLockedError:
        return RunLockedError(
            f"{self.storage.describe('')} is locked by another writer: {describe_holder(holder, state)}."
            f"{extra} Stop that run first, or use a different run directory. Reading (restore, ls, "
            "verify, inspect) is safe meanwhile."
        )

    # ---- acquire ------------------------------------------------------------------------------

    def acquire(self) -> None:
        """Take the lock (a no-op while held); RunLockedError names the holder when another has it.

        While held (every save calls this), it returns at once: it never waits on the mutex that a
        heartbeat or a check takes, so a store that hangs never blocks a save that does not reach it."""
        if self._held and self._lost is None and os.getpid() == self._owner_pid:
            return
        with self._mutex:
            if self._lost is not None:
                raise self._lost_again()
            if self._held:
                return
            self._since = time.time()
            if self._local is not None:
                self._acquire_local(self._local)
            else:
                self._acquire_object()
            self._held = True
            self._owner_pid = os.getpid()

    def _acquire_local(self, storage: LocalStorage) -> None:
        import fcntl

        storage.makedirs("")
        path = storage.describe(LOCK_NAME)
        waited_since: float | None = None
        for _ in range(100):  # retried only when the file is replaced under us
            fd = open_lock_file(path)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        pass
                    holder = read_fd_record(fd)
                    state = holder_state(holder) if holder else "unknown"
                    if holder is None or state == "exited":  # being written, or left to orphans
                        waited_since = waited_since if waited_since is not None else time.monotonic()
                        if time.monotonic() - waited_since < self.policy.orphan_wait:
                            time.sleep(0.05)
                            continue
                    extra = ""
                    if state == "exited":
                        holding = processes_holding(path)
                        extra = (
                            f" Still holding the lock file: {', '.join(holding)} (children it left behind "
                            f"exit within seconds; waited {self.policy.orphan_wait:.0f}s: stop them, or retry)."
                            if holding else " Processes it left behind still hold the lock (not visible from here)."
                        )
                    raise self._refusal(holder, state, extra)
                now = os.fstat(fd)
                try:
                    there = os.stat(path)
                except FileNotFoundError:
                    there = None
                if there is None or (there.st_dev, there.st_ino) != (now.st_dev, now.st_ino):
                    os.close(fd)  # removed or replaced between open and flock: lock the new file
                    continue
                data = json.dumps(self._record()).encode()
                os.pwrite(fd, data, 0)
                os.ftruncate(fd, len(data))
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            if waited_since is not None:
                log.info("Took the run lock of %s after %.1fs (its previous holder had exited).", storage.url, time.monotonic() - waited_since)
            self._fd, self._inode = fd, (now.st_dev, now.st_ino)
            keep_from_children(fd)
            self._finalizer = weakref.finalize(self, close_quietly, fd, os.getpid())
            return
        raise RunLockedError(f"{path} keeps being replaced while locking it; is another tool removing it?")

    def _conditional(self) -> Any:
        if self._cas is None:
            found = _unwrap(self.storage, ConditionalWrites)
            self._cas = found if found is not None else EmulatedConditionalWrites(self.storage)
        return self._cas

    def _is_stale(self, holder: dict[str, Any] | None, state: str) -> bool:
        if holder is None:
            return True  # unreadable: no live holder writes that
        if holder.get("session") in _ABANDONED:
            return True  # this process gave it up while the store was unreachable
        if state == "exited":
            return True
        stale_after = self.stale_after
        theirs = holder.get("stale_after")
        if isinstance(theirs, (int, float)) and not isinstance(theirs, bool) and math.isfinite(theirs):
            stale_after = max(stale_after, float(theirs))
        refreshed = holder.get("refreshed", holder.get("since"))
        if isinstance(refreshed, bool) or not isinstance(refreshed, (int, float)) or not math.isfinite(refreshed):
            return True
        return time.time() - refreshed > stale_after

    def _acquire_object(self) -> None:
        cas = self._conditional()
        for _ in range(8):
            current = cas.read_versioned(LOCK_NAME)
            expect = None
            if current is not None:
                holder = parse_record(current[0])
                if holder is not None and holder.get("session") == self.session:
                    self._version = current[1]
                    break
                state = holder_state(holder) if holder else "unknown"
                if not self._is_stale(holder, state):
                    raise self._refusal(
                        holder, state, f" The lock goes stale {self.stale_after:.0f}s after its last refresh "
                        "(its holder refreshes it while running)."
                    )
                log.warning("Taking over the stale run lock of %s from %s.", self.storage.url, describe_holder(holder, state))
                expect = current[1]
            mine = json.dumps(self._record()).encode()
            if cas.write_if(LOCK_NAME, mine, expect=expect) is None:
                continue  # someone else wrote first: look again
            if not cas.conditional_writes_atomic and self.policy.settle_seconds:
                time.sleep(self.policy.settle_seconds)
            back = cas.read_versioned(LOCK_NAME)
            if back is not None and (parse_record(back[0]) or {}).get("session") == self.session:
                self._version = back[1]
                break
        else:
            raise RunLockedError(
                f"{self.storage.describe(LOCK_NAME)} changed under every attempt to take it: several "
                "writers are starting at once. Start one writer per run."
            )
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_heartbeat, args=(weakref.ref(self), self._stop, self.policy.interval),
            name="ckptguard-lock-heartbeat", daemon=True,
        )
        self._thread.start()

    # ---- while held ---------------------------------------------------------------------------

    def _lose(self, holder: dict[str, Any] | None, why: str) -> RunLockLostError:
        state = holder_state(holder) if holder else "unknown"
        with self._mutex:
            if self._lost is not None:
                return self._lost_again()  # a concurrent check saw it first
            if not self._held:
                return self._lost_error(holder, state, why)  # released meanwhile: nothing to mark
            self._lost = self._lost_error(holder, state, why)
            self._stop.set()
            return self._lost

    def _lost_error(self, holder: dict[str, Any] | None, state: str, why: str) -> RunLockLostError:
        return RunLockLostError(
            f"{self.storage.describe('')}: this writer (session {self.session[:12]}, pid {os.getpid()}) "
            f"lost the run to "
            + (f"session {str(holder.get('session', '?'))[:12]} ({describe_holder(holder, state)})" if holder else "nobody known")
            + f": {why}. The save stopped before its commit: nothing was committed, and no save of "
            "this writer commits from now on. Stop this process: the other writer owns the run (if "
            "that was a mistake, stop that one and resume from the newest checkpoint)."
        )

    def _lost_again(self) -> RunLockLostError:
        assert self._lost is not None
        return RunLockLostError(*self._lost.args)

    def check(self) -> None:
        """Raise RunLockLostError unless this lock still holds the run (called before a commit)."""
        self._verify(renew=False)

    def _verify(self, *, renew: bool) -> None:
        """Check the holder; with ``renew``, also rewrite an object-store record (refresh). The
        store's round trips run outside the mutex (a save's acquire() never waits on them)."""
        if os.getpid() != self._owner_pid:
            return  # a forked child: its parent's lock is none of its business
        with self._mutex:
            if self._lost is not None:
                raise self._lost_again()
            if not self._held or os.getpid() != self._owner_pid:
                return
            if self._local is not None:
                self._check_local(self._local)
                return
            cas = self._conditional()
        current = self._still_ours(cas.read_versioned(LOCK_NAME))
        if not renew:
            return
        with self._mutex:
            record = json.dumps(self._record()).encode()
        version = cas.write_if(LOCK_NAME, record, expect=current[1])
        if version is None:  # changed since the read: ours only if a retried write landed
            version = self._still_ours(cas.read_versioned(LOCK_NAME))[1]
        with self._mutex:
            self._version = version
            released = not self._held
        if released:  # release() ran while this refresh was on the network: take the record back
            with contextlib.suppress(Exception):
                cas.remove_if(LOCK_NAME, expect=version)

    def _still_ours(self, current: tuple[bytes, str] | None) -> tuple[bytes, str]:
        """``current`` (a record and its version) when it is this session's; else the run is lost."""
        holder = parse_record(current[0]) if current is not None else None
        if current is None or holder is None or holder.get("session") != self.session:
            raise self._lose(holder, self._why_lost(current))
        return current

    def _why_lost(self, current: tuple[bytes, str] | None) -> str:
        if current is None:
            return "the lock object was removed while this writer held it"
        return (
            f"this writer did not refresh the lock for more than {self.stale_after:.0f}s (the process "
            "was stopped or suspended, or the store unreachable), so another writer took the run over"
        )

    def _check_local(self, storage: LocalStorage) -> None:
        path = storage.describe(LOCK_NAME)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise self._lose(None, f"{path} was removed while this writer held it") from None
        if (st.st_dev, st.st_ino) != self._inode:
            try:
                with open(path, "rb") as f:
                    holder = parse_record(f.read(RECORD_MAX))
            except OSError:
                holder = None
            raise self._lose(holder, f"{path} was replaced while this writer held it (removed by hand or by a tool, then created again)")

    def refresh(self) -> None:
        """Check the holder, then renew an object-store record (the heartbeat calls this)."""
        self._verify(renew=True)

    # ---- release ------------------------------------------------------------------------------

    def release(self) -> None:
        """Give the lock up (only this session's record is ever removed)."""
        if self._held and os.getpid() != self._owner_pid:
            return  # a forked child never releases its parent's lock (nor waits on its mutex)
        thread = self._thread
        self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=max(5.0, self.policy.interval))
        with self._mutex:
            if not self._held:
                return
            self._held = False
            self._thread = None
            if os.getpid() != self._owner_pid:
                return  # a forked child never releases its parent's lock
            if self._fd is not None:
                if self._finalizer is not None:
                    self._finalizer.detach()
                forget_in_children(self._fd)
                os.close(self._fd)  # releases the flock
                self._fd = None
                return
            if self._lost is not None:
                return
            try:
                cas = self._conditional()
                current = cas.read_versioned(LOCK_NAME)
                if current is not None and (parse_record(current[0]) or {}).get("session") == self.session:
                    cas.remove_if(LOCK_NAME, expect=current[1])
            except Exception as e:  # noqa: BLE001 - an unreleased lock goes stale by itself
                log.warning("Could not remove the run lock of %s (%s); it goes stale after %.0fs.", self.storage.url, e, self.stale_after)

    def abandon(self) -> None:
        """Stop holding the lock without a word to the store, which is known unreachable (a
        release would only wait out its retries). The heartbeat stops; the record left in the
        store is stale at once for a later writer in this process, and (as for any holder that
        exited) for one on this host once this process is gone; elsewhere after ``stale_after``."""
        if self._local is not None or not self._held or os.getpid() != self._owner_pid:
            self.release()  # a local lock: closing the descriptor needs no network
            return
        self._stop.set()  # the heartbeat ends at its next beat (it may be waiting on the store now)
        with self._mutex:
            if not self._held:
                return
            self._held = False
            self._thread = None
            _ABANDONED.add(self.session)
        log.info("Left the run lock of %s in place (the store is unreachable); it goes stale by itself "
                 "(after %.0fs for writers on other hosts).", self.storage.url, self.stale_after)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def abandon(lock: RunLock | None, why: str) -> None:
    """The run's store is unreachable (``why``, logged as a warning, names what is skipped): stop
    holding ``lock`` without a word to it (:meth:`RunLock.abandon`; None: there is no lock)."""
    log.warning("%s.", why)
    if lock is not None:
        lock.abandon()
