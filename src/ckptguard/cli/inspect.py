"""``ckptguard inspect CKPT``: what a checkpoint holds and where it came from."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from ckptguard.cli.common import add_json_flag, check_target, console, human_bytes, print_json
from ckptguard.errors import CheckpointNotFoundError
from ckptguard.format.manifest import MANIFEST
from ckptguard.run.catalog import CheckpointInfo, info_for
from ckptguard.storage.base import Storage, join
from ckptguard.verification.verify import resolve_target


def register(sub: Any) -> None:
    p = sub.add_parser("inspect", help="show a checkpoint's manifest, files and tensors")
    p.add_argument("ckpt", help="checkpoint directory (RUN/step-000001200) or a run (its newest)")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    add_json_flag(p)
    p.set_defaults(func=run)


def _newest_committed(target: str) -> tuple[Storage, str]:
    """The storage and the newest committed checkpoint of a run (or the checkpoint itself)."""
    kind = check_target(target, want="checkpoint")
    storage, names = resolve_target(target)
    committed = sorted(n for n in names if storage.exists(join(n, MANIFEST)))
    if not committed:
        if kind == "checkpoint" and len(names) == 1:  # a step directory without a manifest
            raise CheckpointNotFoundError(
                f"{storage.describe(names[0])} has no {MANIFEST}: it is not a committed checkpoint "
                "(debris of an interrupted save, removed by the next save or 'ckptguard prune')."
            )
        raise CheckpointNotFoundError(
            f"No committed checkpoint in {storage.describe('')}"
            + (f" ({len(names)} step directories without a manifest: debris of interrupted saves)" if names else "")
            + ". Pass a run directory or RUN/step-N; 'ckptguard ls' lists a run."
        )
    return storage, committed[-1]


def run(args: argparse.Namespace) -> int:
    storage, name = _newest_committed(args.ckpt)
    info = info_for(storage, name)  # the same status 'ckptguard ls' shows
    if info.manifest is None:  # unreadable: exit 2 like any unreadable input
        from ckptguard.errors import CorruptCheckpointError

        raise CorruptCheckpointError(f"{storage.describe(name)} cannot be inspected: {'; '.join(info.problems)} "
                                     f"Run 'ckptguard verify {storage.describe(name)}'.")
    m = info.manifest
    if args.json:
        print_json({**m, "status": info.status, "valid": info.valid, "problems": list(info.problems)})
        return 0
    c = console()
    c.print(_summary(storage.describe(name), m, info))
    t = Table(title="files")
    for col in ("file", "kind", "size", "tensors", "xxh3-128"):
        t.add_column(col)
    for fname, e in m["files"].items():
        t.add_row(fname, e["kind"], human_bytes(e["size"]), str(len(e.get("tensors", {})) or ""), e.get("xxh3_128", "")[:16])
    c.print(t)
    if args.tensors:
        tt = Table(title="tensors")
        for col in ("file", "name", "dtype", "shape"):
            tt.add_column(col)
        for fname, e in m["files"].items():
            for tname, tinfo in e.get("tensors", {}).items():
                tt.add_row(fname, tname, tinfo["dtype"], str(tuple(tinfo["shape"])))
        c.print(tt)
    return 0


def _summary(where: str, m: dict[str, Any], info: CheckpointInfo) -> Table:
    env = m.get("environment") or {}
    git = env.get("git") or {}
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    rows = [
        ("checkpoint", where),
        ("step", str(m["step"])),
        ("created", f"{m.get('created')}  (save took {m.get('save_seconds', 0):.3f}s, reason: {m.get('reason', '')})"),
        ("format", f"{m.get('format')} v{m.get('format_version')}, checksum {m.get('checksum')}"),
        ("status", info.status if info.valid else f"{info.status}: {'; '.join(info.problems)}"),
        ("metrics", ", ".join(f"{k}={v}" for k, v in (m.get("metrics") or {}).items()) or "-"),
        ("config hash", str(m.get("config_hash"))),
        ("git", f"{git.get('commit', '?')[:12]}{' (dirty)' if git.get('dirty') else ''}" if git else "not a git work tree"),
        ("versions", f"python {env.get('python')}, torch {env.get('torch')}, numpy {env.get('numpy')}, ckptguard {env.get('ckptguard')}"),
        ("host / device", f"{env.get('host')} / {env.get('device')}"),
    ]
    for k, v in rows:
        head.add_row(k, v)
    return head
