"""Restoring a tiered run: the newest checkpoint any tier holds, from the fastest tier holding it.

Steps are tried newest first; each step from its copies in tier order (hot memory, local disk,
durable), every copy checked against its checksums through the one restore path
(:func:`ckptguard.manager.restoring.restore_first_valid`). A damaged hot copy is marked corrupt in
its tier and the same step is read from the next tier; only when no tier has a usable copy of a
step is an older step tried. Ends as a plain restore does: a step, None (no tier holds any
checkpoint: a fresh run), or :class:`NoValidCheckpointError` listing every copy tried and why.
"""

from __future__ import annotations

import logging

from ckptguard.capture.state import MismatchReport, TrainState
from ckptguard.distributed.coordination import Coordinator
from ckptguard.errors import CheckpointNotFoundError, NoValidCheckpointError
from ckptguard.manager.restoring import restore_first_valid
from ckptguard.run.catalog import CheckpointInfo, scan
from ckptguard.storage import Storage
from ckptguard.tiers.tiered import Tier, TierSet, tier_listing

__all__ = ["restore_tiered", "warn_if_tiered"]

log = logging.getLogger(__name__)


def restore_tiered(
    tiers: TierSet, state: TrainState, *, coord: Coordinator, verify: bool, strict: bool, step: int | None
) -> tuple[Storage, tuple[CheckpointInfo, MismatchReport] | None]:
    """Restore the newest usable checkpoint of any tier (or exactly ``step``); return the tier's
    storage it came from and what :func:`restore_first_valid` returns (see the module docstring).
    This process becomes the hot tier's trainer first (its keeper stops waiting for one)."""
    tiers.attach(to_save=False)
    copies: dict[int, list[tuple[Tier, CheckpointInfo]]] = {}
    for tier, c in tiers.listing():
        copies.setdefault(c.step, []).append((tier, c))
    if step is not None and step not in copies:
        have = ", ".join(str(s) for s in sorted(copies)[-10:]) or "none"
        raise CheckpointNotFoundError(
            f"No checkpoint for step {step} in any tier of {tiers.chain[-1].storage.url} (steps available: {have}). "
            "Run 'ckptguard ls' to list them."
        )
    failures: list[tuple[str, str]] = []
    for s in sorted(copies, reverse=True) if step is None else [step]:
        for tier, c in copies[s]:
            try:
                found = restore_first_valid(
                    tier.storage, [c], state, coord=coord, verify=verify, strict=strict, explicit=step is not None
                )
            except NoValidCheckpointError as e:
                failures.extend(e.failures)
                continue
            if found is None:
                continue
            if failures:
                log.warning("Restored step %d from the %s tier after %d unusable cop%s", s, tier.name,
                            len(failures), "y" if len(failures) == 1 else "ies")
            else:
                log.info("Restored step %d from the %s tier (%s)", s, tier.name, c.path)
            return tier.storage, found
    if failures:
        lines = "\n  ".join(f"{path}: {why}" for path, why in failures[:20])
        url = tiers.chain[-1].storage.url
        raise NoValidCheckpointError(
            f"No usable checkpoint in any tier of {url}: {len(failures)} cop{'y' if len(failures) == 1 else 'ies'} "
            f"tried, none restorable:\n  {lines}\nRun 'ckptguard verify {url}' for details.",
            path=url, failures=tuple(failures),
        )
    return tiers.chain[-1].storage, None


def warn_if_tiered(durable: Storage, restored: int | None) -> None:
    """A manager without ``tiers=`` restored ``restored`` (None: nothing) from a run whose faster
    tiers on this host hold newer checkpoints: say so (they are restored only with ``tiers=``)."""
    tiers, _ = tier_listing(durable)
    newer = [(name, c) for name, tier in tiers[:-1] for c in scan(tier, check_files=False) if c.valid and c.step > (restored or 0)]
    if newer:
        name, c = max(newer, key=lambda x: x[1].step)
        log.warning(
            "%s is a tiered run: its %s tier on this host holds step %d (%s), newer than what was restored (%s). "
            "Only a manager with tiers=Tiers(...) restores it (and its keeper persists it only while no other writer holds the run).",
            durable.url, name, c.step, c.path, restored if restored is not None else "nothing: a fresh start",
        )
