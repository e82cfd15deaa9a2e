"""A ckptguard checkpoint of a Hugging Face model as a folder ``from_pretrained`` loads.

>>> export_hf_folder("runs/exp1", "exported/")       # the newest valid checkpoint of the run
>>> AutoModelForCausalLM.from_pretrained("exported/")

The folder holds ``model.safetensors`` (the weights, every byte verified while reading, written by
ckptguard.report.export) and ``config.json`` (the model's ``PretrainedConfig``, which
:class:`ckptguard.integrations.hf.CkptguardTrainer` stores in each checkpoint's ``state.json``).
It is written beside its destination and renamed into place: an interrupted export leaves no
half folder. Needs neither transformers nor torch's pickle: nothing in the checkpoint runs code.
``ckptguard export CKPT --format hf -o DIR`` calls it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from ckptguard.errors import CheckpointError
from ckptguard.persist.reader import CheckpointReader
from ckptguard.report.export import export_checkpoint, pick_checkpoint
from ckptguard.run.catalog import read_manifest

__all__ = ["HF_CONFIG_KEY", "HFExportResult", "export_hf_folder"]

HF_CONFIG_KEY = "hf_model_config"  # extra[...] in state.json: model.config as a JSON object


@dataclasses.dataclass(frozen=True)
class HFExportResult:
    source: str
    output: str
    step: int
    tensors: int
    bytes: int


def _model_config(reader: CheckpointReader, where: str) -> dict[str, Any]:
    state = reader.json("state.json") if reader.has("state.json") else {}
    extra = state.get("extra") if isinstance(state, dict) else None
    config = extra.get(HF_CONFIG_KEY) if isinstance(extra, dict) else None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise CheckpointError(
            f"{where} holds no Hugging Face model config (extra[{HF_CONFIG_KEY!r}] in state.json): it was "
            "not saved by ckptguard.integrations.hf.CkptguardTrainer. Export the weights alone "
            "('ckptguard export CKPT -o model.safetensors') and load them into a model you build."
        )
    return config


def export_hf_folder(
    path: str | os.PathLike[str], output: str | os.PathLike[str], *, overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> HFExportResult:
    """Write ``output/`` (config.json + model.safetensors) from checkpoint ``path`` or a run's newest valid one."""
    out = Path(output).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file; --format hf writes a folder: choose a folder name for -o.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out} is not empty; pass --force to replace it, or choose another -o.")
    storage, name = pick_checkpoint(path, storage_options)
    where = storage.describe(name)
    config = _model_config(CheckpointReader(storage, name, read_manifest(storage, name)), where)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        source = f"{storage.url.rstrip('/')}/{name}"
        result = export_checkpoint(source, tmp / "model.safetensors", storage_options=storage_options)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return HFExportResult(where, str(out), result.step, result.tensors, result.bytes)
