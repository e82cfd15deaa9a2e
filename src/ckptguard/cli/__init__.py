"""The ``ckptguard`` command line. One module per command; each has ``register(subparsers)``.

Exit codes: 0 all sound; 1 the command ran and found problems (verify; doctor on errors, or on
warnings with ``--strict``); 2 bad input (missing path, a regular file or a checkpoint where a run
is expected, unreadable checkpoint, an existing export target without ``--force``, wrong
arguments). ``--json`` prints machine-readable output. Pinned by tests/test_cli_endings.py.
Command modules import torch only inside ``run`` where they need it, so ``ls``, ``inspect``,
``verify``, ``prune``, ``pin`` and ``diff --metadata`` start without it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from ckptguard.errors import CheckpointError
from ckptguard.version import __version__

__all__ = ["COMMANDS", "main"]

# Add a command: create ckptguard/cli/<name>.py with register(sub) and list it here.
COMMANDS = ["ls", "inspect", "verify", "prune", "pin", "doctor", "diff", "export", "plot", "report", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckptguard",
        description="Checkpoints that survive failure and stay trustworthy.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("--version", action="version", version=f"ckptguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"ckptguard.cli.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.verbose == 0 else logging.INFO if args.verbose == 1 else logging.DEBUG
    from rich.logging import RichHandler

    from ckptguard.cli.common import err_console

    logging.basicConfig(level=level, format="%(message)s", handlers=[RichHandler(console=err_console(), show_path=False)])
    try:
        return int(args.func(args) or 0)
    except CheckpointError as e:
        from ckptguard.cli.common import fail

        return fail(e)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
