"""What a tiered run asks for: where each tier lives and how often a checkpoint goes down to it.

>>> Tiers(local="/local_nvme/exp1", local_every_seconds=300, durable_every_seconds=1800)  # doctest: +ELLIPSIS
Tiers(hot=True, local='/local_nvme/exp1', ...)

Every ``save()`` that is due writes to the *first* tier: host shared memory (``hot``; the
default) or, with ``hot=False``, the node-local directory. The lower tiers (``local``, then the
run's own directory, the *durable* tier) receive the same committed checkpoint, copied in the
background at their own cadence (seconds, or ``"auto"``: Young/Daly from the measured cost of
that tier's copies). The manager's ``every_steps``/``every_seconds``/``every`` is the first
tier's cadence.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os

__all__ = ["Tiers", "hot_root"]

Every = float | str | None


def _check_every(name: str, value: Every, *, optional: bool) -> None:
    if value is None:
        if not optional:
            raise ValueError(f"Tiers({name}=None): the durable tier needs a cadence (seconds or 'auto')")
        return
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"Tiers({name}={value!r}): give seconds (a number > 0) or 'auto'")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"Tiers({name}={value!r}): give seconds (a number > 0) or 'auto'")


@dataclasses.dataclass(frozen=True)
class Tiers:
    """Where a run's checkpoints live on the way to durable storage.

    Args:
        hot: keep the newest checkpoint in host shared memory (``memory_dir``), owned by a keeper
            process that outlives the training process (see ckptguard.tiers.keeper).
        local: a node-local directory (NVMe) for the middle tier, or None for none.
        local_every_seconds: how often the newest checkpoint is copied to ``local`` (or "auto").
        durable_every_seconds: how often it is copied to the run's directory (or "auto"). At
            ``close()`` and at a preemption the newest checkpoint is always copied down.
        hot_keep / local_keep: how many checkpoints the hot and local tiers hold (the durable
            tier follows the manager's ``retention``).
        grace_seconds: after the training process dies, how long the keeper waits for a new one
            to restore from memory before it persists the newest hot checkpoint itself and frees
            the memory ("persist at breakpoint").
        memory_dir: a tmpfs (``/dev/shm``) where the hot tier's shared memory lives.
    """

    hot: bool = True
    local: str | None = None
    local_every_seconds: Every = 300.0
    durable_every_seconds: Every = 1800.0
    hot_keep: int = 1
    local_keep: int = 2
    grace_seconds: float = 60.0
    memory_dir: str = "/dev/shm"

    def __post_init__(self) -> None:
        if not self.hot and self.local is None:
            raise ValueError("Tiers(hot=False) needs local=<directory>: a tiered run needs a tier above durable")
        if self.local is not None:
            if not isinstance(self.local, (str, os.PathLike)) or "://" in str(self.local):
                raise ValueError(f"Tiers(local={self.local!r}): give a node-local directory path")
            object.__setattr__(self, "local", os.path.abspath(os.fspath(self.local)))
        _check_every("local_every_seconds", self.local_every_seconds, optional=self.local is None)
        _check_every("durable_every_seconds", self.durable_every_seconds, optional=False)
        for name in ("hot_keep", "local_keep"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Tiers({name}={value!r}): give an int >= 1")
        grace = self.grace_seconds
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not 0 <= grace < float("inf"):
            raise ValueError(f"Tiers(grace_seconds={grace!r}): give seconds >= 0 (finite: the keeper must persist one day)")
        if not os.path.isdir(self.memory_dir):
            raise ValueError(f"Tiers(memory_dir={self.memory_dir!r}) is not a directory (a tmpfs such as /dev/shm)")

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def hot_root(memory_dir: str, durable_url: str, rank: int = 0) -> str:
    """The hot tier's directory for one rank of the run at ``durable_url`` (the same in every
    process of the run on this machine, so a restarted process finds it)."""
    key = hashlib.sha256(f"{durable_url}\0{rank}".encode()).hexdigest()[:16]
    return os.path.join(memory_dir, f"ckptguard-{os.getuid()}", key)
