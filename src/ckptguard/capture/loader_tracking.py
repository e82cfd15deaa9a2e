"""The record a tracked DataLoader keeps of its live iterator (see ckptguard.capture.sampler).

With ``num_workers > 0`` a DataLoader pulls indices from its sampler ahead of the training loop;
the position a checkpoint saves is what the loop received. :class:`LoaderTracker` holds where
the live iterator started and how many batches the loop consumed (counted by
:class:`CountingIterator`), and the RNG states the exact-resume replay needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Generic, TypeVar

import torch
from torch.utils.data import DataLoader

__all__ = ["CountingIterator", "LoaderTracker"]

S = TypeVar("S")


class LoaderTracker(Generic[S]):
    """Per-DataLoader record of the live iterator: where it started and what the loop consumed."""

    def __init__(self, sampler: S, batch_size: int, loader: DataLoader[Any]) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.num_workers = int(loader.num_workers)
        self.persistent = bool(loader.persistent_workers and loader.num_workers > 0)
        self.active = False
        self.epoch = 0
        self.start = 0
        self.consumed = 0
        # RNG state before the base-seed draw of the live torch iterator (for persistent workers:
        # of the one iterator they belong to), and the one to replay after a restore.
        self.pre_iter_rng: torch.Tensor | None = None
        self.replay_rng: torch.Tensor | None = None


class CountingIterator:
    """Wraps a DataLoader's iterator and counts, in ``tracker.consumed``, the batches handed out."""

    def __init__(self, inner: Iterator[Any], tracker: LoaderTracker[Any]) -> None:
        self._inner = inner
        self._tracker = tracker

    def __iter__(self) -> CountingIterator:
        return self

    def __next__(self) -> Any:
        item = next(self._inner)
        self._tracker.consumed += 1
        return item

    def __len__(self) -> int:
        return len(self._inner)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
