"""ResumableSampler, and the DataLoader bookkeeping that makes mid-epoch resume exact.

Two traps stand between a DataLoader and an exact resume, and this module handles both:

1. Prefetching. With ``num_workers > 0`` the loader pulls indices from the sampler ahead of the
   training loop, so the sampler's own count is ahead of what the loop consumed. A DataLoader
   handed to :class:`~ckptguard.TrainState` is tracked: we count the batches the loop received
   (:class:`~ckptguard.capture.loader_tracking.LoaderTracker`).
2. The global RNG. Creating a DataLoader iterator draws its base seed (which also seeds its
   workers) from torch's global generator. In an uninterrupted run that draw happens at the start
   of the epoch; after a mid-epoch restore the loop re-creates the iterator mid-epoch, and the draw
   would shift the stream dropout then uses. On the first iterator after a mid-epoch restore we
   draw the base seed from a copy of the generator state recorded when the original iterator was
   created: the workers get the very same seed and the global stream is left untouched.
3. Randomness inside workers. A worker's generators are seeded once, from the iterator's base
   seed, and then advance with every sample the worker loads; after a mid-epoch restore fresh
   workers would start those streams over while the sampler skips ahead. With workers, a tracked
   loader's sampler hands out :class:`SampleIndex` (an ``int`` that knows its epoch and position)
   and each worker re-seeds python ``random``, numpy and torch before every sample from
   ``(base seed, epoch, position)`` (:func:`ckptguard.capture.rng.seed_sample`), so a sample's draws no
   longer depend on which worker loaded it or what that worker loaded before. The re-seeding is
   installed by a ``worker_init_fn`` ckptguard chains in front of the user's own; in the worker
   it swaps the dataset's class for a subclass whose ``__getitem__`` seeds, then calls the
   original. A dataset with ``__getitems__`` (batched loading) is seeded once per batch, from
   its first sample. ``persistent_workers=True`` keeps one base seed for the whole run, which
   the checkpoint records so the resumed run's workers get it again.

The position is saved with what it counts over (the dataset's length and a content fingerprint,
or a declared ``dataset_version``: :mod:`ckptguard.capture.data_identity`), so a resume over a
changed dataset is caught instead of silently skipping or repeating samples.
"""

from __future__ import annotations

import base64
import logging
import math
import signal
from collections.abc import Callable, Iterator, Sequence, Sized
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler, get_worker_info

from ckptguard.capture.data_identity import DatasetIdentity, identify, order_changes
from ckptguard.capture.loader_tracking import CountingIterator, LoaderTracker
from ckptguard.capture.rng import seed_sample

__all__ = ["ResumableSampler", "SampleIndex", "track_dataloader", "loader_state", "load_loader_state"]

log = logging.getLogger(__name__)


class SampleIndex(int):
    """A dataset index that also carries the epoch and the position it was drawn at.

    It is an ``int`` everywhere (indexing, arithmetic, JSON); the worker-side seeding reads
    ``epoch`` and ``position`` (the place in the epoch over all replicas) and hands the user's
    ``__getitem__`` a plain ``int``.
    """

    epoch: int
    position: int

    def __new__(cls, value: int, epoch: int, position: int) -> SampleIndex:
        obj = super().__new__(cls, value)
        obj.epoch = epoch
        obj.position = position
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        return (SampleIndex, (int(self), self.epoch, self.position))


class ResumableSampler(Sampler[int]):
    """A seeded (optionally shuffled, optionally sharded) sampler that resumes mid-epoch in O(1).

    Epoch ``e`` visits ``randperm(n, seed + e)`` (or ``range(n)``), split across ``num_replicas``
    like ``DistributedSampler``. The epoch advances by itself when an epoch is exhausted;
    ``set_epoch`` is accepted too. Seen samples are never replayed after a resume. The state
    records what the position counts over (:meth:`identity`: the length and a content fingerprint
    of ``data_source``, or ``dataset_version`` when given; see ckptguard.capture.data_identity).

    >>> s = ResumableSampler(range(10), shuffle=True, seed=0)
    >>> first = list(s)                      # epoch 0
    >>> s.epoch
    1
    """

    def __init__(
        self,
        data_source: Sized | int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
        dataset_version: str | int | None = None,
    ) -> None:
        n = data_source if isinstance(data_source, int) else len(data_source)
        if dataset_version is not None and (not isinstance(dataset_version, (str, int)) or isinstance(dataset_version, bool)):
            raise TypeError(f"dataset_version must be a str or an int, got {type(dataset_version).__name__}")
        if n < 0:
            raise ValueError(f"dataset length must be >= 0, got {n}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {num_replicas}, {rank}")
        self.dataset_len = int(n)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.drop_last = bool(drop_last)
        self.dataset = None if isinstance(data_source, int) else data_source
        self.dataset_version = dataset_version
        self._identity: DatasetIdentity | None = None
        if drop_last:
            self.num_samples = n // num_replicas
        else:
            self.num_samples = math.ceil(n / num_replicas) if n else 0
        self.epoch = 0
        self._start = 0
        self._yielded = 0  # position reached in the current epoch (this rank's list)
        self._compensate: torch.Tensor | None = None
        self._emit_keys = False  # set by a tracked DataLoader with workers: yield SampleIndex

    def __len__(self) -> int:
        return self.num_samples

    def order(self, epoch: int) -> list[int]:
        """This rank's indices for ``epoch``."""
        n = self.dataset_len
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + epoch)
            idx = torch.randperm(n, generator=g).tolist()
        else:
            idx = list(range(n))
        total = self.num_samples * self.num_replicas
        if total > len(idx) and idx:
            idx += (idx * math.ceil(total / len(idx)))[: total - len(idx)]
        idx = idx[:total]
        return idx[self.rank : total : self.num_replicas]

    def set_epoch(self, epoch: int) -> None:
        """Select an epoch. A resumed position is kept when ``epoch`` is the current one."""
        if epoch != self.epoch:
            self.epoch = int(epoch)
            self._start = 0
            self._yielded = 0

    def __iter__(self) -> Iterator[int]:
        epoch, start = self.epoch, self._start
        order = self.order(epoch)
        self._yielded = start
        return self._gen(order, epoch, start)

    def _gen(self, order: list[int], epoch: int, start: int) -> Iterator[int]:
        if self._compensate is not None:
            self._undo_iterator_seed_draw(self._compensate)
            self._compensate = None
        keyed, replicas, rank = self._emit_keys, self.num_replicas, self.rank
        for i in range(start, len(order)):
            self._yielded = i + 1
            yield SampleIndex(order[i], epoch, i * replicas + rank) if keyed else order[i]
        if self.epoch == epoch:
            self.epoch = epoch + 1
            self._start = 0
            self._yielded = 0

    def expect_resume_iterator(self, rng_after_restore: torch.Tensor) -> None:
        """Arm the sampler-only fix for the DataLoader RNG trap (see module docstring).

        Called after a mid-epoch restore when no DataLoader is tracked: if, when iteration starts,
        exactly one int64 draw (a DataLoader's base seed) moved the global generator away from the
        restored state, that draw is undone.
        """
        self._compensate = rng_after_restore

    @staticmethod
    def _undo_iterator_seed_draw(expected: torch.Tensor) -> None:
        g = torch.Generator()
        g.set_state(expected)
        torch.empty((), dtype=torch.int64).random_(generator=g)
        if torch.equal(g.get_state(), torch.get_rng_state()):
            torch.set_rng_state(expected)

    def skip(self, n: int) -> None:
        """Move the position the next iterator starts from ``n`` samples (this rank) ahead.

        Used to step over a bad data window after a rollback (see ckptguard.verification.health); call it
        after a restore or between epochs, not while an iterator of this sampler is running.
        Skipping past the end of the epoch continues into the next ones.
        """
        if n < 0:
            raise ValueError(f"skip(n) needs n >= 0, got {n}")
        if not self.num_samples:
            return
        pos = self._start + int(n)
        self.epoch += pos // self.num_samples
        self._start = pos % self.num_samples
        self._yielded = self._start

    @property
    def position(self) -> int:
        """Samples of the current epoch already handed out (this rank)."""
        return self._yielded

    def identity(self) -> DatasetIdentity:
        """What the position counts over; computed once (the first save or resume), then kept."""
        if self._identity is None:
            self._identity = identify(self.dataset, self.dataset_len, self.dataset_version)
        return self._identity

    def state_dict(self) -> dict[str, Any]:
        epoch, pos = self.epoch, self._yielded
        if pos >= self.num_samples and self.num_samples:
            epoch, pos = epoch + 1, 0
        return self._state(epoch, pos)

    def _state(self, epoch: int, pos: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "start": pos,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
            "dataset_len": self.dataset_len,
            "num_samples": self.num_samples,
            "global_consumed": pos * self.num_replicas,
            "dataset": self.identity().to_json(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, start = int(state["epoch"]), int(state["start"])
        for message in order_changes(state, {"seed": self.seed, "shuffle": self.shuffle}, self.identity()):
            log.warning("%s", message)
        old_r = int(state.get("num_replicas", self.num_replicas))
        if old_r != self.num_replicas:
            start = int(state.get("global_consumed", start * old_r)) // self.num_replicas
            log.info(
                "Sampler: resharding from %d to %d replicas; resuming at position %d of epoch %d.",
                old_r, self.num_replicas, start, epoch,
            )
        self.epoch = epoch
        self._start = min(start, self.num_samples)
        self._yielded = self._start


# ---- DataLoader tracking -------------------------------------------------------------------


# A signal to the whole process group (torchrun, Slurm) is the loop's preemption, not the workers' death.
WORKER_IGNORED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class KeyedWorkerInit:
    """A tracked loader's ``worker_init_fn``: ignore the signals above, key the dataset, run yours."""

    def __init__(self, user_fn: Callable[[int], Any] | None) -> None:
        self.user_fn = user_fn

    def __call__(self, worker_id: int) -> None:
        for sig in WORKER_IGNORED_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        info = get_worker_info()
        if info is not None:
            key_dataset(info.dataset, info.seed - info.id)
        if self.user_fn is not None:
            self.user_fn(worker_id)


def key_dataset(dataset: Any, base_seed: int) -> bool:
    """In a worker: make ``dataset`` seed the global generators before each keyed sample.

    Swaps the object's class for a same-named subclass (so ``isinstance``, attributes and
    ``get_worker_info().dataset`` stay the user's). Returns False when the class cannot be
    swapped (an extension type); the sample's draws are then not keyed.
    """
    cls = type(dataset)
    if getattr(cls, "_ckptguard_keyed", False):
        return True

    def __getitem__(self: Any, index: Any) -> Any:
        if isinstance(index, SampleIndex):
            seed_sample(base_seed, index.epoch, index.position)
            index = int(index)
        return cls.__getitem__(self, index)

    ns: dict[str, Any] = {
        "__slots__": (), "__module__": cls.__module__, "__qualname__": cls.__qualname__,
        "_ckptguard_keyed": True, "__getitem__": __getitem__,
    }
    if callable(getattr(cls, "__getitems__", None)):

        def __getitems__(self: Any, indices: Sequence[Any]) -> Any:
            if len(indices) and isinstance(indices[0], SampleIndex):
                seed_sample(base_seed, indices[0].epoch, indices[0].position)
            return cls.__getitems__(self, [int(i) if isinstance(i, SampleIndex) else i for i in indices])

        ns["__getitems__"] = __getitems__
    try:
        dataset.__class__ = type(cls.__name__, (cls,), ns)
    except TypeError as e:  # a builtin (a list of samples) draws nothing: no need to warn
        log.log(
            logging.DEBUG if cls.__module__ == "builtins" else logging.WARNING,
            "DataLoader worker: cannot key the randomness of %s (%s); its random draws are not "
            "reproduced exactly after a mid-epoch resume.", cls.__name__, e,
        )
        return False
    return True


def _new_torch_iterator(loader: DataLoader[Any], generator: torch.Generator | None) -> Iterator[Any]:
    """``DataLoader.__iter__`` with a replay generator and the keyed worker_init_fn in place."""
    original_gen, original_init = loader.generator, loader.worker_init_fn
    if generator is not None:
        loader.generator = generator
    if loader.num_workers > 0:
        loader.worker_init_fn = KeyedWorkerInit(original_init)
    try:
        base: Any = super(type(loader), loader)  # the loader's own class: its __iter__ is replaced by the tracked one
        inner: Iterator[Any] = base.__iter__()
        return inner
    finally:
        loader.generator, loader.worker_init_fn = original_gen, original_init


def _tracked_iter(self: DataLoader[Any]) -> Iterator[Any]:
    tracker: LoaderTracker[ResumableSampler] = self._ckptguard_tracker  # type: ignore[attr-defined]
    sampler = tracker.sampler
    tracker.num_workers = int(self.num_workers)
    tracker.persistent = bool(self.persistent_workers and self.num_workers > 0)
    sampler._emit_keys = self.num_workers > 0
    epoch, start = sampler.epoch, sampler._start  # before torch's prefetching moves them
    replay, tracker.replay_rng = tracker.replay_rng, None
    if tracker.persistent and getattr(self, "_iterator", None) is not None:
        pre = tracker.pre_iter_rng  # torch resets the persistent iterator: no seed is drawn
        base: Any = super(type(self), self)
        inner = base.__iter__()
    elif replay is not None:
        pre = replay
        gen = torch.Generator()
        gen.set_state(replay)
        inner = _new_torch_iterator(self, gen)
    else:
        pre = self.generator.get_state() if self.generator is not None else torch.get_rng_state()
        inner = _new_torch_iterator(self, None)
    tracker.active = True
    tracker.epoch, tracker.start, tracker.consumed = epoch, start, 0
    tracker.pre_iter_rng = pre
    return CountingIterator(inner, tracker)


def _find_sampler(loader: DataLoader[Any]) -> tuple[ResumableSampler | None, int]:
    bs = loader.batch_sampler
    inner = getattr(bs, "sampler", None)
    if isinstance(inner, ResumableSampler):
        return inner, int(getattr(bs, "batch_size", 1) or 1)
    if isinstance(loader.sampler, ResumableSampler):
        return loader.sampler, int(loader.batch_size or 1)
    return None, 1


def track_dataloader(loader: DataLoader[Any]) -> LoaderTracker[ResumableSampler]:
    """Start tracking ``loader`` (idempotent). Its sampler must be a ResumableSampler."""
    existing = getattr(loader, "_ckptguard_tracker", None)
    if existing is not None:
        return existing  # type: ignore[no-any-return]
    sampler, batch_size = _find_sampler(loader)
    if sampler is None:
        from ckptguard.errors import UnsupportedStateError

        raise UnsupportedStateError(
            "TrainState(dataloader=...) needs a DataLoader whose sampler is "
            "ckptguard.ResumableSampler: DataLoader(ds, batch_size=..., "
            "sampler=ckptguard.ResumableSampler(ds, shuffle=True, seed=0))."
        )
    cls = type(loader)
    tracked_cls = type(f"Resumable{cls.__name__}", (cls,), {"__iter__": _tracked_iter})
    tracker = LoaderTracker(sampler, batch_size, loader)
    loader._ckptguard_tracker = tracker
    loader.__class__ = tracked_cls
    return tracker


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s, validate=True)), dtype=torch.uint8).clone()


def loader_state(tracker: LoaderTracker[ResumableSampler], generator: torch.Generator | None) -> dict[str, Any]:
    """The position the training loop reached (not the prefetcher), plus RNG for the replay."""
    s = tracker.sampler
    if tracker.active:
        epoch = tracker.epoch
        pos = min(tracker.start + tracker.consumed * tracker.batch_size, s.num_samples)
        if pos >= s.num_samples and s.num_samples:
            epoch, pos = epoch + 1, 0
    else:
        epoch, pos = s.epoch, s._start
    out: dict[str, Any] = {
        "sampler": s._state(epoch, pos),
        "num_workers": tracker.num_workers,
        "persistent_workers": tracker.persistent,
        "batch_size": tracker.batch_size,
    }
    # The iterator the next epoch (or the rest of this one) belongs to was seeded from this state:
    # mid-epoch always; with persistent workers for the rest of the run.
    pre = tracker.pre_iter_rng if tracker.active else tracker.replay_rng
    if pre is not None and (pos > 0 or tracker.persistent):
        out["pre_iter_rng"] = _b64(pre)
    if generator is not None:
        out["generator"] = _b64(generator.get_state())
    return out


def load_loader_state(tracker: LoaderTracker[ResumableSampler], loader: DataLoader[Any], state: dict[str, Any], where: str = "state.json") -> None:
    """Put a saved loader position back. Malformed fields raise CorruptCheckpointError (``where``)."""
    try:
        sampler_state = state["sampler"]
        saved_workers = int(state.get("num_workers", loader.num_workers))
        saved_persistent = state.get("persistent_workers", None)
        if saved_persistent is not None and not isinstance(saved_persistent, bool):
            raise TypeError(f"persistent_workers must be true or false, got {saved_persistent!r}")
        saved_batch = int(state.get("batch_size", tracker.batch_size))
        replay = _unb64(state["pre_iter_rng"]) if "pre_iter_rng" in state else None
        generator = _unb64(state["generator"]) if "generator" in state else None
        for t in (replay, generator):
            if t is not None:
                torch.Generator().set_state(t)  # a CPU generator state, or RuntimeError
        tracker.sampler.load_state_dict(sampler_state)
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        from ckptguard.errors import CorruptCheckpointError

        raise CorruptCheckpointError(
            f"{where}: the DataLoader position is malformed ({type(e).__name__}: {e}). The "
            "checkpoint is damaged; restore falls back to an older one."
        ) from e
    tracker.active = False
    tracker.replay_rng = None
    persistent = bool(loader.persistent_workers and loader.num_workers > 0)
    if saved_persistent is None:
        saved_persistent = persistent
    # Samples are re-seeded by their position whichever worker loads them, so only a switch
    # between the main process (0) and workers, or of persistent_workers, changes the draws.
    if ((saved_workers == 0) != (loader.num_workers == 0)) or saved_persistent != persistent:
        log.warning(
            "DataLoader: the checkpoint was saved with num_workers=%d, persistent_workers=%s and "
            "the loader now has num_workers=%d, persistent_workers=%s; the resumed run is not "
            "bit-exact (randomness in workers is reproduced only with the same settings).",
            saved_workers, saved_persistent, loader.num_workers, persistent,
        )
    if saved_batch != tracker.batch_size:
        log.warning(
            "DataLoader: the checkpoint was saved with batch_size=%d and the loader now has "
            "batch_size=%d; the data order resumes at the same sample, but batches differ from "
            "the original run's (not bit-exact).",
            saved_batch, tracker.batch_size,
        )
    if replay is not None and (tracker.sampler._start > 0 or (persistent and saved_persistent)):
        tracker.replay_rng = replay
    if persistent and getattr(loader, "_iterator", None) is not None:
        # Workers of an iterator from before the restore hold another base seed: start anew.
        stale: Any = loader._iterator
        stale._shutdown_workers()
        loader._iterator = None
    if generator is not None and loader.generator is not None:
        loader.generator.set_state(generator)
