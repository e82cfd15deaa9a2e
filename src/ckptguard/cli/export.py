"""``ckptguard export CKPT -o model.safetensors [--full]``: a plain safetensors file other tools load."""

from __future__ import annotations

import argparse
import dataclasses
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
    p.add_argument("--force", action="store_true", help="replace the output file if it exists")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ckptguard.report.export import export_checkpoint

    check_target(args.checkpoint, want="checkpoint")
    result = export_checkpoint(args.checkpoint, args.output, full=args.full, overwrite=args.force)
    if args.json:
        print_json(dataclasses.asdict(result))
        return 0
    what = "full state" if result.full else "weights"
    console().print(
        f"[green]exported[/] {what} of step {result.step} ({result.tensors} tensors, "
        f"{human_bytes(result.bytes)}) from {result.source} to {result.output}",
        highlight=False,
    )
    return 0
