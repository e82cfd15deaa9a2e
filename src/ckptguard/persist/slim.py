"""Slimming one committed checkpoint: a new manifest without its training-only files, committed
atomically, then those files removed.

The retention policy decides which checkpoints are slim (``Retention(full_last=N)``,
:mod:`ckptguard.policies.slimming`, which also says what "training-only" means);
:func:`ckptguard.persist.prune.apply_decisions` calls :func:`slim_checkpoint` for each, under the
run lock. The steps, and what a kill at each leaves::

    read and validate step-N/MANIFEST.json      nothing changed: the full checkpoint
    remove MANIFEST.json.tmp-* a kill left      the full checkpoint
    replace MANIFEST.json (one atomic replace:  the full checkpoint, or the slimmed one with the
      temp file + fsync + rename + fsync of     dropped files still there (not in its manifest:
      step-N/; an object store: one PUT)        leftovers)
    remove each dropped file                    the slimmed checkpoint, some leftovers

Either manifest verifies: every file it lists is untouched, and a file a manifest does not list
is never read. Leftovers are removed by the next :func:`slim_checkpoint` of that checkpoint (the
manager runs retention after every save; ``ckptguard prune`` too), which finds the checkpoint
slimmed and only removes its training-only files that are still there. Only names of
:data:`~ckptguard.policies.slimming.TRAINING_ONLY_FILES` are ever removed, never a path taken
from a manifest. In an incremental run the dropped files are manifest entries whose chunks live
in shared packs: nothing is removed here, and :mod:`ckptguard.persist.gc` frees a pack once no
committed manifest references it (the new manifest is durable before this returns).

A reader that listed the checkpoint before the replace and reads a dropped file after its
removal finds the manifest changed: restore treats that as a checkpoint that vanished (no
mark) and lists the run again.

>>> freed = slim_checkpoint(storage, "step-000001200")
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ckptguard.errors import CheckpointError
from ckptguard.format.manifest import MANIFEST, SELF_DIGEST_KEY, encode_manifest
from ckptguard.policies.slimming import SLIMMED, TRAINING_ONLY_FILES, slimmed_record, training_only_files
from ckptguard.run.catalog import SIDE_FILE_TEMP, read_manifest
from ckptguard.storage.base import Storage, join

__all__ = ["remove_leftovers", "slim_checkpoint", "slim_note", "slim_quietly", "slimmed_manifest"]

log = logging.getLogger(__name__)


def slimmed_manifest(manifest: dict[str, Any], *, now: float | None = None) -> dict[str, Any]:
    """The manifest of ``manifest``'s checkpoint without its training-only files, with the
    :data:`~ckptguard.policies.slimming.SLIMMED` record; everything else is kept as it was."""
    drop = training_only_files(manifest)
    files = {k: v for k, v in manifest["files"].items() if k not in drop}
    record: dict[str, Any] = {
        "dropped": drop,
        "at": round(time.time() if now is None else now, 3),
        "bytes_freed": sum(int(manifest["files"][f].get("size", 0)) for f in drop),
        "kinds": {f: manifest["files"][f].get("kind") for f in drop},
    }
    out = {k: v for k, v in manifest.items() if k not in (SELF_DIGEST_KEY, "files")}
    out["files"] = files
    out[SLIMMED] = record
    return out


def slim_checkpoint(storage: Storage, name: str, *, slimmed_before: bool = False) -> int:
    """Slim the committed checkpoint ``name`` (see the module docstring for the steps); return
    the bytes of the files it dropped (0 when slimmed before: then only leftovers are removed).
    ``slimmed_before``: the caller's plan found it slimmed (under the run lock): only its
    leftovers are looked for (one stat per training-only file name), its manifest is not read.
    Call only while holding the run lock. Raises a CheckpointError when the manifest cannot be
    read or replaced (nothing changed, or only leftovers remain: the next call finishes)."""
    if slimmed_before:
        remove_leftovers(storage, name)
        return 0
    manifest = read_manifest(storage, name)
    if slimmed_record(manifest) is not None:
        remove_leftovers(storage, name)
        return 0
    drop = training_only_files(manifest)
    if not drop:
        return 0
    for temp in storage.listdir(name):  # a replace a kill interrupted before its rename
        if temp.startswith(f"{MANIFEST}.tmp-") and SIDE_FILE_TEMP.fullmatch(temp):
            storage.remove_file(join(name, temp))
    new = slimmed_manifest(manifest)
    storage.replace_file(join(name, MANIFEST), encode_manifest(new))
    remove_leftovers(storage, name)
    freed = int(new[SLIMMED]["bytes_freed"])
    log.info("Slimmed %s to its weights: dropped %s (%d bytes)", storage.describe(name), ", ".join(drop), freed)
    return freed


def remove_leftovers(storage: Storage, name: str) -> list[str]:
    """Remove the files a slimmed checkpoint dropped that are still there (a kill, or a failed
    removal, left them); return their names. Call only for a checkpoint whose committed manifest
    is slimmed: such a manifest lists none of TRAINING_ONLY_FILES, the only names touched."""
    removed = []
    for fname in TRAINING_ONLY_FILES:
        rel = join(name, fname)
        if storage.exists(rel) and not storage.isdir(rel):
            storage.remove_file(rel)
            removed.append(fname)
    return removed


def slim_note(manifest: dict[str, Any] | None, where: str) -> str | None:
    """What restoring a slimmed checkpoint means, for warnings and reports (None: not slimmed)."""
    rec = slimmed_record(manifest)
    if rec is None:
        return None
    at = rec.get("at")
    when = time.strftime(" on %Y-%m-%d %H:%M UTC", time.gmtime(at)) if isinstance(at, (int, float)) else ""
    dropped = rec.get("dropped")
    what = ", ".join(map(str, dropped)) if isinstance(dropped, list) and dropped else "its training state"
    return (
        f"{where} was slimmed to its weights{when} (retention's full_last; dropped {what}): it "
        "cannot resume training exactly. Only the model's weights are restored; the optimizer, "
        "scheduler, data position, RNG and extra state are left as they are. To resume exactly, "
        "restore a full checkpoint ('ckptguard ls' shows which are slimmed)."
    )


def slim_quietly(storage: Storage, name: str, *, slimmed_before: bool = False) -> tuple[int, str | None]:
    """:func:`slim_checkpoint` for the retention pass: (bytes freed, error text or None)."""
    try:
        return slim_checkpoint(storage, name, slimmed_before=slimmed_before), None
    except CheckpointError as e:
        log.warning("Retention could not slim %s (%s); the next save or 'ckptguard prune' retries.", storage.describe(name), e)
        return 0, str(e)
