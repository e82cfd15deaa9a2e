"""``export_checkpoint``: one plain, self-contained safetensors file from any checkpoint.

Works for regular and incremental (``chunked``) checkpoints alike: every tensor is read through
the verified readers (a corrupt byte stops the export), then written as a standard safetensors
file that ``safetensors.torch.load_file`` (or any other safetensors reader) loads.

- weights only (default): the model's tensors under their state-dict names.
- ``full=True``: model, optimizer and extra tensors, prefixed ``model/``, ``optimizer/`` and
  ``state/``; the JSON state (scheduler, scaler, sampler, RNG, step, extra), ``config.yaml`` and the
  source manifest's step go into ``__metadata__`` (strings only, as safetensors requires).
- ``obj="ema"``: the tensors of one Stateful object of the TrainState (``TrainState(ema=...)``: an
  EMA or SWA copy), keyed as its ``state_dict()`` (nested keys joined with dots), a plain model
  file; its non-tensor entries (a decay, a counter) go into ``__metadata__`` as JSON.

The output is written to a temp file beside the target, fsync'd, renamed into place and the
directory fsync'd: an interrupted export never leaves a half-written ``model.safetensors``.
The tensors of one checkpoint are held in memory while writing (one copy of the state). Before
anything is allocated, the sizes the manifest declares are checked against the files really
stored and against the memory this machine has available, so a hostile or damaged manifest
declaring a huge tensor is refused with a clear error. An existing output file is replaced only
with ``overwrite=True`` (``--force``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckptguard.distributed.restoring import is_dcp
from ckptguard.errors import CheckpointError, CheckpointNotFoundError
from ckptguard.format.manifest import ITEMSIZE
from ckptguard.format.tensorfile import numel, write_tensor_file
from ckptguard.persist.reader import CheckpointReader
from ckptguard.run.catalog import read_manifest, scan
from ckptguard.storage import LocalStorage, Storage
from ckptguard.storage.base import join
from ckptguard.verification.verify import resolve_target

if TYPE_CHECKING:
    import torch

__all__ = ["ExportResult", "available_memory", "check_declared_sizes", "export_checkpoint", "object_tensor_keys", "pick_checkpoint"]

# the file names of ckptguard.capture.state (not imported: it imports torch)
MODEL_FILE, OPTIM_FILE, EXTRA_FILE = "model.safetensors", "optimizer.safetensors", "state.safetensors"
PREFIXES = {MODEL_FILE: "model/", OPTIM_FILE: "optimizer/", EXTRA_FILE: "state/"}


@dataclasses.dataclass(frozen=True)
class ExportResult:
    source: str
    output: str
    step: int
    tensors: int
    bytes: int
    full: bool
    object: str | None = None


def pick_checkpoint(path: str | os.PathLike[str], storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """(run storage, checkpoint name) to export: the checkpoint itself, or a run's newest valid one."""
    storage, names = resolve_target(path, storage_options)
    if len(names) == 1 and storage.exists(f"{names[0]}/MANIFEST.json"):
        return storage, names[0]
    valid = [c for c in scan(storage) if c.valid]
    if not valid:
        raise CheckpointNotFoundError(
            f"{storage.describe('')} holds no valid checkpoint to export. Run 'ckptguard ls' on it."
        )
    return storage, valid[-1].name  # a run directory: its newest valid checkpoint


def export_checkpoint(
    path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    full: bool = False,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    obj: str | None = None,
) -> ExportResult:
    """Export checkpoint ``path`` (or the newest valid one of a run) to the local file ``output``.

    ``obj``: export the tensors of that user object (``TrainState(ema=...)``) instead of the model.
    Refuses (CheckpointError) an existing ``output`` unless ``overwrite=True``.
    """
    if obj is not None and full:
        raise CheckpointError("Pass either --object NAME or --full, not both: --object exports one object's tensors.")
    out = Path(output).expanduser().absolute()
    if out.is_dir():
        raise CheckpointError(f"{out} is a directory; pass a file name such as {out / 'model.safetensors'}.")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise CheckpointError(f"{out} already exists; pass overwrite=True to replace it, or choose another output path.")
    storage, name = pick_checkpoint(path, storage_options)
    manifest = read_manifest(storage, name)
    reader = CheckpointReader(storage, name, manifest)
    where = storage.describe(name)
    if obj is not None:
        return _export_object(reader, obj, out)
    if not reader.has(MODEL_FILE) and is_dcp(manifest):
        return _export_sharded(reader, out, full=full)
    if not reader.has(MODEL_FILE):
        raise CheckpointError(f"{where} has no {MODEL_FILE}: there are no model weights to export.")
    check_declared_sizes(storage, name, manifest, [MODEL_FILE] if not full else list(PREFIXES))
    tensors: dict[str, torch.Tensor] = {}
    metadata = {"format": "pt", "ckptguard.source": where, "ckptguard.step": str(manifest["step"])}
    if not full:
        tensors = reader.tensors(MODEL_FILE)
    else:
        for fname, prefix in PREFIXES.items():
            for tname, t in reader.tensors(fname).items():
                tensors[prefix + tname] = t
        if reader.has("state.json"):
            metadata["ckptguard.state_json"] = reader.blob("state.json").decode("utf-8")
        if reader.has("config.yaml"):
            metadata["ckptguard.config_yaml"] = reader.blob("config.yaml").decode("utf-8")
        metadata["ckptguard.metrics_json"] = json.dumps(manifest.get("metrics") or {})
    nbytes = _write_atomically(out, tensors, metadata)
    return ExportResult(where, str(out), int(manifest["step"]), len(tensors), nbytes, full)


def _export_sharded(reader: CheckpointReader, out: Path, *, full: bool) -> ExportResult:
    """A sharded (FSDP2 / DCP) checkpoint: its model tensors consolidated into one plain file."""
    from ckptguard.distributed.shard_io import model_tensors  # imports torch.distributed.checkpoint

    where = reader.where
    if full:
        raise CheckpointError(
            f"{where} holds sharded (FSDP2/DCP) state: --full (optimizer and training state) is not "
            "exported from sharded checkpoints yet. Export the model weights without --full."
        )
    tensors = model_tensors(reader)
    step = int(reader.manifest["step"])
    metadata = {"format": "pt", "ckptguard.source": where, "ckptguard.step": str(step)}
    nbytes = _write_atomically(out, tensors, metadata)
    return ExportResult(where, str(out), step, len(tensors), nbytes, full)


def object_tensor_keys(saved: Any, prefix: str = "") -> dict[str, str]:
    """The tensors of one object's encoded state (``state.json``'s ``objects.NAME``): its
    ``state_dict()`` key (nested keys joined with dots) -> the stored tensor's name. Reads no
    tensor; anything that is not a tensor reference is left out."""
    out: dict[str, str] = {}
    stack: list[tuple[str, Any, int]] = [(prefix, saved, 0)]
    while stack:
        key, node, depth = stack.pop()
        if depth > 200:
            continue  # the JSON parser caps depth already; never recurse unbounded on hostile data
        if isinstance(node, dict) and len(node) == 1 and next(iter(node)) in ("__tensor__", "__ndarray__"):
            ref = next(iter(node.values()))
            if isinstance(ref, str):
                out[key] = ref
            continue
        if isinstance(node, dict) and len(node) == 1 and next(iter(node)) == "__tuple__":
            node = next(iter(node.values()))
        if isinstance(node, dict) and len(node) == 1 and next(iter(node)) == "__map__":
            pairs = next(iter(node.values()))
            items = [(str(p[0]), p[1]) for p in pairs if isinstance(p, list) and len(p) == 2] if isinstance(pairs, list) else []
        elif isinstance(node, dict):
            items = [(str(k), v) for k, v in node.items()]
        elif isinstance(node, list):
            items = [(str(i), v) for i, v in enumerate(node)]
        else:
            continue
        stack.extend((f"{key}.{k}" if key else k, v, depth + 1) for k, v in reversed(items))
    return out


def _export_object(reader: CheckpointReader, obj: str, out: Path) -> ExportResult:
    """One user object's tensors as a plain model file (see the module docstring)."""
    where, manifest = reader.where, reader.manifest
    step = int(manifest["step"])
    if is_dcp(manifest):
        raise CheckpointError(
            f"{where} holds sharded (FSDP2/DCP) state: --object is not supported for sharded checkpoints yet. "
            f"Restore it into your TrainState (mgr.restore(state, step={step})) and save the object's "
            "state_dict() with safetensors.torch.save_file."
        )
    state = reader.json("state.json") if reader.has("state.json") else {}
    objects = state.get("objects") if isinstance(state, dict) else None
    objects = objects if isinstance(objects, dict) else {}
    keys = {n: object_tensor_keys(v) for n, v in objects.items()}
    with_tensors = ", ".join(sorted(n for n, k in keys.items() if k)) or "none"
    if obj not in objects:
        have = ", ".join(sorted(objects)) or "none: the TrainState had no objects beyond model, optimizer, scheduler, scaler"
        raise CheckpointError(
            f"{where} holds no object {obj!r} (objects saved: {have}). Pass one of them to --object; "
            "objects are the TrainState's extra keyword arguments, e.g. TrainState(model=m, ema=ema)."
        )
    if not keys[obj]:
        raise CheckpointError(
            f"{where}: the object {obj!r} holds no tensors, there are no weights to export "
            f"(objects with tensors: {with_tensors}). Pass one of those to --object, or 'ckptguard inspect {where}'."
        )
    check_declared_sizes(reader.storage, reader.name, manifest, [EXTRA_FILE])
    stored = reader.tensors(EXTRA_FILE, names=set(keys[obj].values()))
    missing = sorted(k for k, ref in keys[obj].items() if ref not in stored)
    if missing:
        raise CheckpointError(
            f"{where}: state.json references tensors of {obj!r} that {EXTRA_FILE} does not hold ({', '.join(missing[:5])}). "
            f"The checkpoint is damaged: run 'ckptguard verify {where}'."
        )
    tensors = {k: stored[ref] for k, ref in keys[obj].items()}
    metadata = {
        "format": "pt", "ckptguard.source": where, "ckptguard.step": str(step), "ckptguard.object": obj,
        "ckptguard.object_state_json": json.dumps(objects[obj]),
    }
    nbytes = _write_atomically(out, tensors, metadata)
    return ExportResult(where, str(out), step, len(tensors), nbytes, False, obj)


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable``), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _real_size(storage: Storage, rel: str) -> int:
    """A stored file's size; for a local sparse file, the bytes really allocated."""
    size = storage.size(rel)
    if isinstance(storage, LocalStorage):
        try:
            blocks = getattr(os.stat(storage.describe(rel)), "st_blocks", None)
        except OSError:
            return size
        if blocks is not None and blocks * 512 + 1024 * 1024 < size // 2:
            return int(blocks) * 512
    return size


def _declared_vs_stored(storage: Storage, name: str, fname: str, entry: dict[str, Any], where: str) -> tuple[int, int]:
    """(bytes the entry's tensors declare uniquely, bytes really stored for them)."""
    if entry.get("kind") == "chunked":
        from ckptguard.persist.incremental import pack_path

        chunks = {(c["pack"], c["offset"], c["size"]) for info in entry["tensors"].values() for c in info.get("chunks", ())}
        stored = 0
        for pack in {c[0] for c in chunks}:
            rel = pack_path(pack)
            if not storage.exists(rel):
                raise CheckpointError(f"{where}: {fname} references {storage.describe(rel)}, which is missing. Run 'ckptguard verify' on the run.")
            stored += _real_size(storage, rel)
        return sum(c[2] for c in chunks), stored
    rel = join(name, fname)
    if not storage.exists(rel):
        raise CheckpointError(f"{where}: {fname} is missing. Run 'ckptguard verify {where}'.")
    declared = sum(numel(info["shape"]) * ITEMSIZE.get(info["dtype"], 8) for info in entry["tensors"].values())
    return declared, _real_size(storage, rel)


def check_declared_sizes(storage: Storage, name: str, manifest: dict[str, Any], fnames: list[str]) -> int:
    """Refuse, before any allocation, tensor sizes the stored files cannot hold or this machine
    cannot hold in memory. Returns the bytes the export will allocate."""
    where = storage.describe(name)
    total = 0
    for fname in fnames:
        entry = manifest["files"].get(fname)
        if not isinstance(entry, dict) or "tensors" not in entry:
            continue
        unique, stored = _declared_vs_stored(storage, name, fname, entry, where)
        if unique > stored:
            raise CheckpointError(
                f"{where}: {fname} declares {unique} bytes of tensors but only {stored} bytes are stored "
                "(a damaged or hostile manifest, or a sparse file). Nothing was allocated. "
                f"Run 'ckptguard verify {where}'."
            )
        total += sum(numel(info["shape"]) * ITEMSIZE.get(info["dtype"], 8) for info in entry["tensors"].values())
    avail = available_memory()
    if avail is not None and total > avail:
        raise CheckpointError(
            f"{where}: exporting needs {total} bytes of memory for its tensors, this machine has {avail} available. "
            "Export on a machine with more memory (or export weights only, without --full)."
        )
    return total


def _write_atomically(out: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    folder = LocalStorage(out.parent)
    folder.makedirs("")
    tmp = f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    w = folder.create(tmp)
    try:
        entry = write_tensor_file(w, tensors, metadata)
        w.close()
        os.replace(folder.describe(tmp), out)
    except BaseException:
        w.abort()
        raise
    folder.sync_dir("")
    return int(entry["size"])
