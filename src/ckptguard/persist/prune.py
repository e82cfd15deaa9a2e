"""Carry out a retention plan: delete every checkpoint the plan does not keep, slim every kept
one it decides slim (``Retention(full_last=N)``, see :mod:`ckptguard.persist.slim`).

Policies (``ckptguard.policies.retention``) only decide; this is the one place their decisions
turn into deletes and slimmings, for the manager after a save and for ``ckptguard prune``.

>>> deleted, failed = apply_decisions(storage, plan_retention(ckpts, retention))
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from ckptguard.errors import CheckpointError
from ckptguard.persist.slim import slim_quietly
from ckptguard.persist.writer import delete_checkpoint
from ckptguard.policies.retention import Decision
from ckptguard.storage.base import Storage

__all__ = ["apply_decisions"]

log = logging.getLogger(__name__)


def apply_decisions(
    storage: Storage, decisions: Sequence[Decision], *, reap: Callable[[str], None] | None = None
) -> tuple[list[int], dict[int, str]]:
    """Delete every checkpoint a plan does not keep (manifest first: a crash leaves debris),
    then slim every kept one decided ``slim`` (one slimmed before: its leftovers are removed).
    ``reap``: frees the uncommitted data instead of this call (see ``delete_checkpoint``).

    Returns (deleted steps, {step: error} for deletes and slimmings that failed); never raises
    for one.
    """
    deleted: list[int] = []
    failed: dict[int, str] = {}
    for d in decisions:
        if d.keep:
            continue
        try:
            delete_checkpoint(storage, d.name, reap=reap)
            deleted.append(d.step)
            log.info("Retention deleted %s (%s)", d.name, "; ".join(d.reasons))
        except CheckpointError as e:
            failed[d.step] = str(e)
            log.warning("Retention could not delete %s: %s", d.name, e)
    for d in decisions:
        if d.keep and d.slim:
            error = slim_quietly(storage, d.name, slimmed_before=d.slimmed)[1]
            if error is not None:
                failed[d.step] = error
    return deleted, failed
