"""``export_checkpoint``: one plain, self-contained safetensors file from any checkpoint.

Works for regular and incremental (``chunked``) checkpoints alike: every tensor is read through
the verified readers (a corrupt byte stops the export), then written as a standard safetensors
file that ``safetensors.torch.load_file`` (or any other safetensors reader) loads.

- weights only (default): the model's tensors under their state-dict names.
- ``full=True``: model, optimizer and extra tensors, prefixed ``model/``, ``optimizer/`` and
  ``state/``; the JSON state (scheduler, scaler, sampler, RNG, step, extra), ``config.yaml`` and the
  source manifest's step go into ``__metadata__`` (strings only, as safetensors requires).

The output is written to a temp file beside the target, fsync'd, renamed into place and the
directory fsync'd: an interrupted export never leaves a half-written ``model.safetensors``.
The tensors of one checkpoint are held in memory while writing (one copy of the state).
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch

from ckptguard.catalog import read_manifest, scan
from ckptguard.errors import CheckpointError, CheckpointNotFoundError
from ckptguard.reader import CheckpointReader
from ckptguard.state import EXTRA_FILE, MODEL_FILE, OPTIM_FILE
from ckptguard.storage import LocalStorage
from ckptguard.tensorfile import write_tensor_file
from ckptguard.verify import resolve_target

__all__ = ["ExportResult", "export_checkpoint"]

PREFIXES = {MODEL_FILE: "model/", OPTIM_FILE: "optimizer/", EXTRA_FILE: "state/"}


@dataclasses.dataclass(frozen=True)
class ExportResult:
    source: str
    output: str
    step: int
    tensors: int
    bytes: int
    full: bool


def _pick(path: str | os.PathLike[str], storage_options: dict[str, Any] | None) -> tuple[Any, str]:
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
    storage_options: dict[str, Any] | None = None,
) -> ExportResult:
    """Export checkpoint ``path`` (or the newest valid one of a run) to the local file ``output``."""
    storage, name = _pick(path, storage_options)
    manifest = read_manifest(storage, name)
    reader = CheckpointReader(storage, name, manifest)
    where = storage.describe(name)
    if not reader.has(MODEL_FILE):
        raise CheckpointError(f"{where} has no {MODEL_FILE}: there are no model weights to export.")
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
    out = Path(output).expanduser().absolute()
    nbytes = _write_atomically(out, tensors, metadata)
    return ExportResult(where, str(out), int(manifest["step"]), len(tensors), nbytes, full)


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
