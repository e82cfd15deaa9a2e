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
from collections.abc import Callable, Iterable

from ckptguard.capture.state import MismatchReport, TrainState
from ckptguard.distributed.coordination import Coordinator
from ckptguard.errors import CheckpointError, CheckpointNotFoundError, NoValidCheckpointError
from ckptguard.format.manifest import checkpoint_name
from ckptguard.manager.restoring import restore_first_valid, select_candidates
from ckptguard.policies.slimming import slimmed_record
from ckptguard.run.catalog import BAD_STATUSES, SUPERSEDED, CheckpointInfo, scan
from ckptguard.storage import Storage
from ckptguard.tiers.replica import send_checkpoint
from ckptguard.tiers.tiered import Tier, TierSet, tier_listing

__all__ = ["restore_run", "restore_tiered", "warn_if_tiered"]

log = logging.getLogger(__name__)
MAX_ROUNDS = 50  # agreements of a distributed restore (each marks a damaged copy or tries an older step)
ATTEMPTS = 3  # of one step, before an older one is tried


def _not_found(where: str, step: int, steps: Iterable[int]) -> CheckpointNotFoundError:
    have = ", ".join(str(s) for s in sorted(steps)[-10:]) or "none"
    return CheckpointNotFoundError(
        f"No checkpoint for step {step} in {where} (steps available: {have}). Run 'ckptguard ls' to list them."
    )


def _none_usable(where: str, url: str, failures: list[tuple[str, str]]) -> NoValidCheckpointError:
    lines = "\n  ".join(f"{path}: {why}" for path, why in failures[:20])
    return NoValidCheckpointError(
        f"No usable checkpoint in {where}: {len(failures)} cop{'y' if len(failures) == 1 else 'ies'} tried, none "
        f"restorable:\n  {lines}\nRun 'ckptguard verify {url}' for details.", path=url, failures=tuple(failures),
    )


def restore_tiered(
    tiers: TierSet, state: TrainState, *, coord: Coordinator, verify: bool, strict: bool, step: int | None
) -> tuple[Storage, tuple[CheckpointInfo, MismatchReport] | None]:
    """Restore the newest usable checkpoint of any tier (or exactly ``step``); return the tier's
    storage it came from and what :func:`restore_first_valid` returns (see the module docstring).
    This process becomes the hot tier's trainer first (its keeper stops waiting for one)."""
    tiers.attach(to_save=False)
    if tiers.nodes is not None:
        return _restore_nodes(tiers, state, coord=coord, verify=verify, strict=strict, step=step)
    copies: dict[int, list[tuple[Tier, CheckpointInfo]]] = {}
    for tier, c in tiers.listing():
        copies.setdefault(c.step, []).append((tier, c))
    url = tiers.chain[-1].storage.url
    if step is not None and step not in copies:
        raise _not_found(f"any tier of {url}", step, copies)
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
        raise _none_usable(f"any tier of {url}", url, failures)
    return tiers.chain[-1].storage, None


def _usable(c: CheckpointInfo, explicit: bool) -> bool:
    """A copy every rank would try (a marked, superseded or slimmed one is skipped by the restore
    pipeline on one rank only: not offered, so the ranks stay in step), or any copy of the step asked for."""
    return c.valid and (explicit or (c.status not in BAD_STATUSES and c.status != SUPERSEDED and slimmed_record(c.manifest) is None))


def _faster_copies(tiers: TierSet, explicit: bool) -> dict[int, tuple[Tier, CheckpointInfo]]:
    """Step -> the fastest usable copy in this node's faster tiers."""
    faster: dict[int, tuple[Tier, CheckpointInfo]] = {}
    for tier in tiers.chain[:-1]:
        for c in scan(tier.storage):
            if _usable(c, explicit):
                faster.setdefault(c.step, (tier, c))
    return faster


def _durable_copies(tiers: TierSet, explicit: bool) -> dict[int, CheckpointInfo]:
    return {c.step: c for c in scan(tiers.chain[-1].storage) if _usable(c, explicit)}


def _restore_nodes(
    tiers: TierSet, state: TrainState, *, coord: Coordinator, verify: bool, strict: bool, step: int | None
) -> tuple[Storage, tuple[CheckpointInfo, MismatchReport] | None]:
    """A distributed tiered restore: the ranks agree on the newest step that every rank can obtain
    (from its node's tiers, the durable tier, or another node, which sends it to the nodes
    without it: :func:`ckptguard.tiers.replica.send_checkpoint`), then each restores it from the
    fastest copy its node holds. A copy that turns out damaged is marked and the ranks agree again."""
    assert tiers.nodes is not None
    nodes = tiers.nodes
    failures: list[tuple[str, str]] = []
    attempts: dict[int, int] = {}
    url = tiers.chain[-1].storage.url
    for _ in range(MAX_ROUNDS):
        faster = _faster_copies(tiers, step is not None)
        durable = _durable_copies(tiers, step is not None) if coord.rank == 0 else {}  # the run's: listed once
        views = coord.all_gather((sorted(faster), sorted(durable)))
        held = [set(views[leader][0]) for leader in nodes.leaders]
        on_durable = set(views[0][1])
        every = set().union(*held) | on_durable
        if step is not None and step not in every and not failures:
            raise _not_found(f"any tier of any node of {url}", step, every)
        left = sorted((s for s in every if attempts.get(s, 0) < ATTEMPTS and (step is None or s == step)), reverse=True)
        if not left:
            break
        s = left[0]
        attempts[s] = attempts.get(s, 0) + 1
        lacking = [nodes.leaders[n] for n in range(nodes.count) if s not in held[n]]
        if lacking and s not in on_durable:
            sender = nodes.leaders[next(n for n in range(nodes.count) if s in held[n])]
            try:
                send_checkpoint(coord, checkpoint_name(s), sender, lacking, faster[s][0].storage if s in faster else None,
                                tiers.first.storage)
            except CheckpointError as e:
                failures.append((f"{checkpoint_name(s)} (sent by rank {sender})", str(e)))
                continue
            faster = _faster_copies(tiers, step is not None)
        if s not in faster and s not in durable:  # this rank reads the durable tier's copy
            durable = _durable_copies(tiers, step is not None)
        tier, c = faster[s] if s in faster else (tiers.chain[-1], durable[s])
        try:
            found = restore_first_valid(tier.storage, [c], state, coord=coord, verify=verify, strict=strict,
                                        explicit=step is not None)
        except NoValidCheckpointError as e:
            failures.extend(e.failures)
            continue
        if found is not None:
            log.info("Restored step %d from the %s tier of node %d (rank %d)", s, tier.name, nodes.index, coord.rank)
            return tier.storage, found
    if failures:
        raise _none_usable(f"any tier of any node of {url}", url, failures)
    return tiers.chain[-1].storage, None


def restore_run(
    storage: Storage, tiers: TierSet | None, state: TrainState, *, coord: Coordinator, verify: bool, strict: bool,
    step: int | None, listing: Callable[[], list[CheckpointInfo]],
) -> tuple[Storage, tuple[CheckpointInfo, MismatchReport] | None]:
    """The manager's restore: of the run at ``storage`` (``listing``: its checkpoints, listed again
    after one vanished), or of its ``tiers``; the storage the checkpoint came from and what
    :func:`restore_first_valid` returns. A plain restore warns when faster tiers hold newer copies."""
    if tiers is not None:
        return restore_tiered(tiers, state, coord=coord, verify=verify, strict=strict, step=step)
    found = restore_first_valid(storage, select_candidates(listing(), step, storage.url), state, coord=coord,
                                verify=verify, strict=strict, rescan=listing, explicit=step is not None)
    warn_if_tiered(storage, found[0].step if found else None)  # newer copies only tiers= would see
    return storage, found


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
