"""The tiers of one run, fastest first, and the background copies down between them.

A :class:`TierSet` is what the manager keeps for ``tiers=``: the chain of tiers (hot memory, the
node-local directory, the run's own durable directory), the hot tier's keeper, and a
:class:`TierCopier` thread that copies the newest committed checkpoint of the first tier down to
each lower tier when that tier's cadence is due. Saves go to the first tier through the one save
pipeline; lower tiers only ever receive copies of committed checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ckptguard.errors import CheckpointError, RunLockedError, StorageError, StorageUnavailableError
from ckptguard.format.manifest import parse_step
from ckptguard.persist.writer import clean_debris, delete_checkpoint
from ckptguard.policies.schedule import SaveSchedule
from ckptguard.run.catalog import CheckpointInfo, scan
from ckptguard.run.history import record_events
from ckptguard.run.runrecord import load_run_record, read_run_record
from ckptguard.storage import Storage
from ckptguard.storage.local import LocalStorage
from ckptguard.tiers.copying import copy_checkpoint, remove_root, same_checkpoint
from ckptguard.tiers.keeper import KEEPER_DIR, is_alive, process_token, read_json, write_json
from ckptguard.tiers.options import Every, Tiers, hot_root

if TYPE_CHECKING:  # imported by distributed runs only (they import torch: `ckptguard ls` does not)
    from ckptguard.distributed.coordination import Coordinator
    from ckptguard.tiers.replica import Nodes, Replicator

__all__ = ["HotMemory", "Tier", "TierCopier", "TierSet", "tier_listing"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Tier:
    """One tier: its name (``hot``, ``local``, ``durable``), its storage, how many checkpoints it
    keeps (None: the manager's retention) and, below the first, when a copy to it is due."""

    name: str
    storage: Storage
    keep: int | None
    schedule: SaveSchedule | None = None
    copied: str | None = None  # the newest checkpoint copied here
    failure: CheckpointError | None = None  # the last copy's error, if it failed
    cleaned: bool = False  # debris of copies cut short (a kill) removed, once per process


def _schedule(every: Every, mtbf: float | None, tier: str) -> SaveSchedule:
    what = f"copying to the {tier} tier"
    if every == "auto":
        return SaveSchedule(auto=True, mtbf_seconds=mtbf, what=what)
    assert isinstance(every, (int, float))
    return SaveSchedule(every_seconds=float(every), what=what)


class HotMemory:
    """The hot tier's directory (on a tmpfs) and the keeper process that owns it."""

    def __init__(self, root: str, config: dict[str, Any]) -> None:
        self.root = root
        self.config = config
        self._proc: subprocess.Popen[bytes] | None = None
        self._checked = 0.0  # when the keeper was last seen alive (checked at most once a second)

    def _path(self, name: str) -> str:
        return os.path.join(self.root, KEEPER_DIR, name)

    def attach(self) -> int | None:
        """Make this process the hot tier's trainer, with a live keeper (started if none); return
        the pid of another live trainer instead (nothing changed then)."""
        os.makedirs(self._path(""), mode=0o700, exist_ok=True)
        me = process_token(os.getpid())
        assert me is not None
        current = read_json(self._path("trainer.json"))
        if current is not None and current != me and is_alive(current):
            return int(current["pid"])
        write_json(self._path("config.json"), self.config)
        write_json(self._path("trainer.json"), me)
        self.ensure_keeper()
        return None

    @property
    def keeper_pid(self) -> int | None:
        token = read_json(self._path("keeper.json"))
        return int(token["pid"]) if token is not None and is_alive(token) else None

    def ensure_keeper(self) -> None:
        """Start a keeper when none is alive (the first save, or the previous one died)."""
        now = time.monotonic()
        if now - self._checked < 1.0:
            return
        if self._proc is not None:
            self._proc.poll()  # reap an exited child
        if self.keeper_pid is not None:
            self._checked = now
            return
        with open(self._path("log"), "ab") as logf:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "ckptguard.tiers.keeper", self.root], stdin=subprocess.DEVNULL,
                stdout=logf, stderr=logf, start_new_session=True, close_fds=True,
            )
        deadline = time.monotonic() + 30.0
        while self.keeper_pid is None and time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise CheckpointError(
                    f"The hot tier's keeper exited at start (code {self._proc.returncode}); see {self._path('log')}."
                )
            time.sleep(0.02)
        log.info("Started the hot tier's keeper (pid %s) for %s", self.keeper_pid, self.root)

    def release(self) -> None:
        """Free the memory (a clean end of the run); the keeper sees it and exits."""
        remove_root(self.root)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                log.warning("The hot tier's keeper (pid %d) did not exit; it will once it notices", self._proc.pid)


class TierCopier:
    """A thread that copies the newest committed checkpoint of ``first`` to each lower tier when
    that tier is due; ``flush()`` copies it down at once (close, preemption)."""

    def __init__(
        self, first: Tier, lower: list[Tier], on_copied: Callable[[Tier, str, dict[str, Any]], None],
        before_commit: Callable[[], None] | None = None,
    ) -> None:
        self.first = first
        self.before_commit = before_commit  # the run lock's last check before a copy commits
        self.lower = lower
        self.on_copied = on_copied
        self._cond = threading.Condition()
        self._copying = threading.Lock()
        self._newest: str | None = None
        self.busy: str | None = None  # the checkpoint being copied (the first tier keeps it meanwhile)
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="ckptguard-tiers", daemon=True)
        self._thread.start()

    def committed(self, name: str) -> str | None:
        """``name`` is the newest checkpoint; return the one being copied (it must stay)."""
        with self._cond:
            self._newest = name
            self._cond.notify()
            return self.busy

    def _due(self) -> list[Tier]:
        name = self._newest
        return [t for t in self.lower if name and t.copied != name and t.schedule is not None and t.schedule.due(0)]

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or bool(self._due()), timeout=1.0)
                if self._closed:
                    return
            self.copy_down(force=False)

    def copy_down(self, *, force: bool) -> list[CheckpointError]:
        """Copy the newest checkpoint to every lower tier that is due (all of them when ``force``);
        return the copies' errors (each is logged; a tier that failed is retried when due again)."""
        errors = []
        with self._copying:
            with self._cond:
                name = self.busy = self._newest  # before the first tier is trimmed again
            due = [force or (t.schedule is not None and t.schedule.due(0)) for t in self.lower]
            for i in range(len(due) - 2, -1, -1):
                due[i] = due[i] or due[i + 1]  # a copy down to a slower tier refreshes the faster ones too
            try:
                for tier, is_due in zip(self.lower, due):
                    if name is None or tier.copied == name or not is_due:
                        continue
                    err = self._copy(tier, name)
                    if err is not None:
                        errors.append(err)
            finally:
                with self._cond:
                    self.busy = None
        return errors

    def _copy(self, tier: Tier, name: str) -> CheckpointError | None:
        assert tier.schedule is not None
        try:
            if not tier.cleaned:  # under the run's lock (the trainer's): copies a kill cut short
                clean_debris(tier.storage)
                tier.cleaned = True
            if same_checkpoint(self.first.storage, tier.storage, name):
                result: dict[str, Any] = {"seconds": 0.0, "bytes": 0}
            else:
                result = copy_checkpoint(self.first.storage, name, tier.storage, before_commit=self.before_commit)
        except CheckpointError as e:
            tier.failure = e
            tier.cleaned = False  # the failed copy may have left debris: the next copy there cleans it
            tier.schedule.saved()  # retried when due again
            log.error("Could not copy %s to the %s tier: %s", self.first.storage.describe(name), tier.name, e)
            return e
        tier.copied, tier.failure = name, None
        tier.schedule.saved(cost=result["seconds"])
        self.on_copied(tier, name, result)
        return None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()


def keep_newest(tier: Tier, spare: str | None = None) -> list[str]:
    """Delete all but the newest ``tier.keep`` valid checkpoints of ``tier`` (never ``spare``:
    the one being copied); return the names deleted."""
    if tier.keep is None:
        return []
    ckpts = scan(tier.storage, check_files=False)
    keep = {c.name for c in [c for c in ckpts if c.valid][-tier.keep :]}
    deleted = []
    for c in ckpts:
        if c.name not in keep and c.name != spare:
            try:
                delete_checkpoint(tier.storage, c.name)
                deleted.append(c.name)
            except CheckpointError as e:
                log.warning("Could not remove %s from the %s tier: %s", c.path, tier.name, e)
    return deleted


class TierSet:
    """The tiers of a run (see the module docstring). ``durable`` is the run's own storage."""

    def __init__(
        self, tiers: Tiers, durable: Storage, *, storage_options: dict[str, Any] | None, mtbf: float | None,
        on_durable: Callable[[], None], lock_check: Callable[[], None] | None = None, coord: Coordinator | None = None,
    ) -> None:
        self.options = tiers
        self.on_durable = on_durable
        self.hot: HotMemory | None = None
        chain: list[Tier] = []
        if tiers.hot:
            root = hot_root(tiers.memory_dir, durable.url)
            config = {"durable": durable.url, "storage_options": storage_options or {}, "local": tiers.local,
                      "grace_seconds": tiers.grace_seconds}
            self.hot = HotMemory(root, config)
            chain.append(Tier("hot", LocalStorage(root), tiers.hot_keep))
        if tiers.local is not None:
            claim_local(tiers.local, durable)
            every = tiers.local_every_seconds if chain else None
            chain.append(Tier("local", LocalStorage(tiers.local), tiers.local_keep,
                              _schedule(every, mtbf, "local") if every is not None else None))
        chain.append(Tier("durable", durable, None, _schedule(tiers.durable_every_seconds, mtbf, "durable")))
        self.chain = chain
        self.first = chain[0]
        # torch.distributed: each node's tiers are its own; its leader (lowest rank) keeps them (the
        # keeper, copies down, retention), rank 0 alone copies to the durable tier (ckptguard.tiers.replica).
        active = coord is not None and coord.active
        self.nodes: Nodes | None = None
        self.replicator: Replicator | None = None
        if coord is not None and active:
            from ckptguard.tiers.replica import Replicator, nodes_of  # torch.distributed

            self.nodes = nodes_of(coord, self.first.storage.url)
            if self.nodes.count > 1:
                self.replicator = Replicator(self.first.storage, self.nodes, self.committed)
        self.primary = not active or (coord is not None and coord.rank == 0)
        self.leader = self.nodes is None or self.nodes.is_leader
        if not self.leader:
            self.hot = None  # the node's leader is the hot tier's trainer
        lower = chain[1:] if self.primary else chain[1:-1] if self.leader else []
        self.copier = TierCopier(self.first, lower, self._copied, lock_check)
        self._attached = False
        self._saving = False
        self._rollback: int | None = None  # restored an older step than the faster tiers hold

    def attach(self, *, to_save: bool) -> None:
        """Before a restore or save: this process becomes the hot tier's trainer (its keeper alive).
        While another live process is, a restore only reads; a save raises RunLockedError."""
        if self.hot is not None and self._attached:
            self.hot.ensure_keeper()  # supervision: a keeper that died is replaced
        elif self.hot is not None:
            other = self.hot.attach()
            self._attached = other is None
            if other is not None and to_save:
                raise RunLockedError(
                    f"Another live process (pid {other}) is the trainer of {self.chain[-1].storage.url} on this host "
                    f"(its hot tier: {self.hot.root}). One writer per run: stop it first, or use another run directory."
                )
        if to_save:
            self.first_save()

    def first_save(self) -> None:
        """Before this process's first save: the durable tier records the run (its lineage: what
        makes the faster tiers' copies this run's), and copies of no lineage of the run (left by a
        run deleted from the durable tier) are removed from the faster tiers."""
        if self._saving or not self.leader:
            return
        self._saving = True
        if self.primary:
            self.chain[-1].storage.makedirs("")
            self.on_durable()
        for tier, c in self._foreign():
            log.warning("Removing %s from the %s tier: it belongs to no lineage of %s (a run deleted there?)",
                        c.path, tier.name, self.chain[-1].storage.url)
            delete_checkpoint(tier.storage, c.name)

    def _copied(self, tier: Tier, name: str, result: dict[str, Any]) -> None:
        keep_newest(tier)
        if tier.name == "durable":
            step = parse_step(name)
            record_events(tier.storage, "copied", [step or 0], reason=f"durable tier ({result['seconds']:.3f}s)")
            self.on_durable()

    def restored(self, c: CheckpointInfo, *, from_first: bool) -> None:
        """``c`` was restored: copy it down when due (if it came from the first tier); the
        faster tiers' later steps go at the next commit (see :meth:`drop_newer`)."""
        if not self.leader:
            return
        if from_first:
            self.copier.committed(c.name)
        faster = [x for tier in self.chain[:-1] for x in scan(tier.storage, check_files=False) if x.valid]
        if any(x.step > c.step for x in faster):  # the faster tiers only (the durable tier may be unreachable)
            self._rollback = c.step

    def committed(self, name: str) -> None:
        """A checkpoint committed to the first tier: trim the first tier, wake the copier."""
        if self._rollback is not None:
            self.drop_newer(self._rollback, keep=name)
            self._rollback = None
        keep_newest(self.first, spare=self.copier.committed(name))

    def describe(self) -> dict[str, Any]:
        """What the run record keeps (``ckptguard ls`` finds the faster tiers of this host by it)."""
        tiers = []
        for tier in self.chain:
            entry: dict[str, Any] = {"name": tier.name, "root": tier.storage.url, "keep": tier.keep}
            if tier.schedule is not None:
                entry.update(tier.schedule.describe())
            tiers.append(entry)
        return {"host": socket.gethostname(), "tiers": tiers}

    def checkpoints(self) -> list[CheckpointInfo]:
        """One entry per step, from the fastest tier holding it, oldest first."""
        return sorted({c.step: c for _, c in reversed(self.listing())}.values(), key=lambda c: c.step)

    def _all(self) -> tuple[list[tuple[Tier, CheckpointInfo]], list[tuple[Tier, CheckpointInfo]]]:
        """(this run's copies, copies in the faster tiers that belong to no lineage of the run).
        When the durable tier cannot be read (a network cut), its copies are left out and no copy
        is judged foreign (a failed read is no evidence): a restart restores from the faster tiers."""
        store = self.chain[-1].storage
        durable: list[CheckpointInfo] | None = None
        lineages: set[object] | None = None  # None: unknown, every copy counts as this run's
        try:
            durable = scan(store)
            sessions = load_run_record(store).get("sessions")  # raises when unreadable (never {} then)
            found = {s.get("run_id") for s in sessions if isinstance(s, dict)} if isinstance(sessions, list) else set()
            lineages = found | {(c.manifest or {}).get("run_id") for c in durable} - {None}
        except StorageError as e:
            log.warning("Could not read the durable tier %s (%s): listing %s; no copy in a faster tier is taken for "
                        "another run's.", store.url, e, "the faster tiers only" if durable is None else "every tier")
        ours: list[tuple[Tier, CheckpointInfo]] = []
        foreign: list[tuple[Tier, CheckpointInfo]] = []
        for tier in self.chain[:-1]:
            for c in scan(tier.storage):
                mine = lineages is None or c.manifest is None or c.manifest.get("run_id") in lineages
                (ours if mine else foreign).append((tier, c))
        return ours + [(self.chain[-1], c) for c in durable or []], foreign

    def _foreign(self) -> list[tuple[Tier, CheckpointInfo]]:
        return self._all()[1]

    def listing(self) -> list[tuple[Tier, CheckpointInfo]]:
        """This run's checkpoints in every tier, fastest tier first, each tier oldest first (copies
        in a faster tier of no lineage of the run are left out, with a warning)."""
        ours, foreign = self._all()
        if foreign:
            log.warning(
                "Not restoring %d checkpoint(s) of the faster tiers (%s): they belong to no lineage of %s (a run "
                "deleted there, or another run's?); this run's first save removes them.",
                len(foreign), ", ".join(c.path for _, c in foreign[:3]), self.chain[-1].storage.url,
            )
        return ours

    @property
    def durable_unreachable(self) -> bool:
        """Whether the last copy to the durable tier failed because it could not be reached (close()
        then skips its bookkeeping there: each try would wait out the store's retries)."""
        return isinstance(self.chain[-1].failure, StorageUnavailableError)

    def drop_newer(self, step: int, keep: str) -> None:
        """The first commit (``keep``) after a rollback to ``step``: the faster tiers' copies of
        later steps belong to the abandoned continuation (the durable tier marks them superseded)."""
        for tier in self.chain[:-1]:
            for c in scan(tier.storage, check_files=False):
                if c.step > step and c.name != keep:
                    delete_checkpoint(tier.storage, c.name)

    def flush(self) -> None:
        """Copy the newest checkpoint to every lower tier now; raise the first copy's error."""
        self.copier.copy_down(force=True)
        durable = self.chain[-1]
        if durable.failure is not None:  # a local tier that failed is logged; the durable copy is what counts
            raise CheckpointError(
                f"The newest checkpoint could not be copied to the durable tier: {durable.failure} The hot memory is "
                f"kept; its keeper persists it after {self.options.grace_seconds:g}s, or restore from it."
            ) from durable.failure

    def close(self, *, flush: bool) -> None:
        """Stop the copier. ``flush`` (a clean end): copy the newest checkpoint down to every tier,
        then free the hot memory; otherwise the memory stays for a restart (its keeper persists it)."""
        try:
            if flush and self.leader and (self.hot is None or self._attached):  # a reader beside a live trainer copies nothing
                self.flush()
                if self.hot is not None:
                    self.hot.release()
        finally:
            self.copier.close()


def tier_listing(durable: Storage) -> tuple[list[tuple[str, Storage]], str | None]:
    """The tiers of the run at ``durable`` that this host can see, fastest first (the durable tier
    last), from its run record; and a note about tiers on another host (None when none)."""
    record = read_run_record(durable).get("tiers")
    if not isinstance(record, dict) or not isinstance(record.get("tiers"), list):
        return [("durable", durable)], None
    if record.get("host") != socket.gethostname():
        return [("durable", durable)], f"its hot/local tiers are on host {record.get('host')!r}, not listed here"
    out: list[tuple[str, Storage]] = []
    for entry in record["tiers"]:
        if isinstance(entry, dict) and entry.get("name") in ("hot", "local") and isinstance(entry.get("root"), str):
            root = entry["root"].removeprefix("file://")
            if os.path.isdir(root):
                out.append((entry["name"], LocalStorage(root)))
    return [*out, ("durable", durable)], None


TIER_MARK = ".ckptguard-tier.json"


def claim_local(local: str, durable: Storage) -> None:
    """Check that ``local`` can be this run's local tier (writable, not the durable directory,
    nobody else's tier) and mark it as this run's; ValueError naming the problem otherwise."""
    where = os.path.realpath(local)
    own = durable.url.removeprefix("file://")
    if "://" not in own:
        own = os.path.realpath(own)
        if where == own or where.startswith(own + os.sep) or own.startswith(where + os.sep):
            raise ValueError(f"Tiers(local={local!r}) is (or holds, or is inside) the run directory {own}: give the local "
                             "tier a directory of its own (its retention, local_keep, would delete the run's checkpoints)")
    mark = os.path.join(local, TIER_MARK)
    try:
        os.makedirs(local, exist_ok=True)
        claimed = read_json(mark)
        if claimed is not None and claimed.get("durable") != durable.url:
            raise ValueError(f"Tiers(local={local!r}) is the local tier of another run ({claimed.get('durable')}): give "
                             "each run its own local directory")
        if claimed is None:
            write_json(mark, {"durable": durable.url})
    except OSError as e:
        raise ValueError(f"Tiers(local={local!r}) cannot be written ({e}): give a writable node-local directory") from e
