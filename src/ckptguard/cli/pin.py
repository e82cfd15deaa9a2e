"""``ckptguard pin RUN STEP [--note TEXT]`` and ``ckptguard unpin RUN STEP``.

A pinned checkpoint is never deleted by retention, ``prune`` or a byte budget. Safe while the run
is live: the pin is a marker file inside the checkpoint directory (see ckptguard.policies.pins).
"""

from __future__ import annotations

import argparse
from typing import Any

from ckptguard.cli.common import add_json_flag, console, print_json, require_run
from ckptguard.policies.pins import pin, unpin
from ckptguard.storage import open_storage


def register(sub: Any) -> None:
    p = sub.add_parser("pin", help="protect a checkpoint from retention")
    p.add_argument("run", help="run directory or URL")
    p.add_argument("step", type=int, help="step of the checkpoint")
    p.add_argument("--note", default="", help="why it is pinned (shown by prune)")
    add_json_flag(p)
    p.set_defaults(func=run_pin)
    u = sub.add_parser("unpin", help="remove a checkpoint's pin")
    u.add_argument("run", help="run directory or URL")
    u.add_argument("step", type=int, help="step of the checkpoint")
    add_json_flag(u)
    u.set_defaults(func=run_unpin)


def run_pin(args: argparse.Namespace) -> int:
    require_run(args.run, "pin")
    storage = open_storage(args.run)
    pin(storage, args.step, args.note)
    if args.json:
        print_json({"run": storage.describe(""), "step": args.step, "pinned": True, "note": args.note})
    else:
        console().print(f"pinned step {args.step} of {storage.describe('')}")
    return 0


def run_unpin(args: argparse.Namespace) -> int:
    require_run(args.run, "unpin")
    storage = open_storage(args.run)
    was = unpin(storage, args.step)
    if args.json:
        print_json({"run": storage.describe(""), "step": args.step, "pinned": False, "was_pinned": was})
    else:
        console().print(f"unpinned step {args.step}" if was else f"step {args.step} was not pinned")
    return 0
