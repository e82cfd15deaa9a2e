"""``ckptguard export CKPT -o model.safetensors [--full | --object NAME]``: a plain safetensors file
other tools load (``--object ema``: the tensors of a user object of the TrainState, e.g. an EMA)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any

from ckptguard.cli.common import add_json_flag, check_target, console, human_bytes, print_json


def register(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint as one self-contained safetensors file",
        description="Export a checkpoint (or the newest valid one of a run) as a plain safetensors "
        "file. Every byte is verified while reading. Incremental checkpoints export the same way.",
    )
    p.add_argument("checkpoint", help="checkpoint directory (RUN/step-N) or run directory; URLs too")
    p.add_argument("-o", "--output", required=True, help="output file, e.g. model.safetensors")
    p.add_argument(
        "--full", action="store_true",
        help="the whole state: model/, optimizer/, state/ tensors plus the JSON state in __metadata__",
    )
    p.add_argument(
        "--object", default=None, metavar="NAME", dest="object",
        help="export the tensors of this TrainState object (TrainState(ema=...): --object ema) instead of the model",
    )
    p.add_argument("--force", action="store_true", help="replace the output file if it exists")
    p.add_argument("--format", choices=["safetensors", "hf"], default="safetensors",
                   help="hf: a folder (config.json + model.safetensors) that transformers' from_pretrained loads")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ckptguard.errors import CheckpointError, CorruptCheckpointError
    from ckptguard.report.export import export_checkpoint

    kind = check_target(args.checkpoint, want="checkpoint")
    if args.format == "hf":  # a Hugging Face folder (ckptguard.integrations.hf_export)
        from ckptguard.integrations.hf_export import export_hf_folder

        hf = export_hf_folder(args.checkpoint, args.output, overwrite=args.force)
        if args.json:
            print_json(dataclasses.asdict(hf))
        else:
            console().print(f"[green]exported[/] step {hf.step} ({hf.tensors} tensors) from {hf.source} to {hf.output}/ (from_pretrained)", highlight=False)
        return 0
    out = os.path.abspath(os.path.expanduser(args.output))
    if os.path.lexists(out) and not os.path.isdir(out) and not args.force:
        raise CheckpointError(f"{out} already exists; pass --force to replace it, or choose another -o.")
    try:
        result = export_checkpoint(args.checkpoint, args.output, full=args.full, overwrite=args.force, obj=args.object)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(_damaged(args.checkpoint, kind, e), path=e.path, file=e.file) from e
    if args.json:
        print_json(dataclasses.asdict(result))
        return 0
    what = "full state" if result.full else f"object {result.object!r}" if result.object else "weights"
    console().print(
        f"[green]exported[/] {what} of step {result.step} ({result.tensors} tensors, "
        f"{human_bytes(result.bytes)}) from {result.source} to {result.output}",
        highlight=False,
    )
    return 0


def _damaged(target: str, kind: str, e: BaseException) -> str:
    """What an exporter reads when the checkpoint's bytes are damaged: the damage, then another step to export."""
    text = str(e)
    for tail in ("; restore falls back to an older checkpoint.", " restore falls back to an older checkpoint."):
        text = text.replace(tail, ".")
    run = os.path.dirname(os.path.abspath(target.rstrip("/"))) if kind == "checkpoint" else target
    return (f"Cannot export {target}: it is damaged. {text} Nothing was written. Export another checkpoint: "
            f"'ckptguard ls {run}' lists the run's checkpoints with their status; pass RUN/step-N of a sound one.")
