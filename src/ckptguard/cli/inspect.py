"""``ckptguard inspect CKPT``: what a checkpoint holds and where it came from."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.table import Table

from ckptguard.cli.common import add_json_flag, check_target, console, err_console, human_bytes, print_json, problem_text, tier_note
from ckptguard.errors import CheckpointError, CheckpointNotFoundError
from ckptguard.format.manifest import MANIFEST
from ckptguard.manager.extensions import custom_fields
from ckptguard.persist.reader import CheckpointReader
from ckptguard.run.catalog import CheckpointInfo, info_for
from ckptguard.storage.base import Storage, join
from ckptguard.verification.verify import resolve_target


def register(sub: Any) -> None:
    p = sub.add_parser("inspect", help="show a checkpoint's manifest, files and tensors")
    p.add_argument("ckpt", help="checkpoint directory (RUN/step-000001200) or a run (its newest)")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    add_json_flag(p)
    p.set_defaults(func=run)


def _newest_committed(target: str) -> tuple[Storage, str, str]:
    """The storage, the newest committed checkpoint of a run (or the checkpoint itself) and, for
    a run, a note saying which one was picked ("" for a checkpoint)."""
    kind = check_target(target, want="checkpoint")
    storage, names = resolve_target(target)
    committed = sorted(n for n in names if storage.exists(join(n, MANIFEST)))
    if not committed:
        if kind == "checkpoint" and len(names) == 1:  # a step directory without a manifest
            raise CheckpointNotFoundError(
                f"{storage.describe(names[0])} has no {MANIFEST}: it is not a committed checkpoint "
                "(debris of an interrupted save, removed by the next save or 'ckptguard prune')."
            )
        note = tier_note(storage)
        raise CheckpointNotFoundError(
            f"No committed checkpoint in {storage.describe('')}"
            + (f" ({len(names)} step directories without a manifest: debris of interrupted saves)" if names else "")
            + ". Pass a run directory or RUN/step-N; 'ckptguard ls' lists a run." + (f" ({note})" if note else "")
        )
    if kind == "checkpoint" or (kind == "url" and target.rstrip("/").rsplit("/", 1)[-1] == committed[-1]):
        return storage, committed[-1], ""
    run = storage.describe("")
    note = (f"the newest of {len(committed)} committed checkpoints of {run} ('ckptguard ls {run}' lists them; "
            "pass RUN/step-N for another)")
    tiers = tier_note(storage)
    note += f"; {tiers}" if tiers else ""
    return storage, committed[-1], note


def run(args: argparse.Namespace) -> int:
    storage, name, picked = _newest_committed(args.ckpt)
    info = info_for(storage, name)  # the same status 'ckptguard ls' shows
    if info.manifest is None:  # unreadable: exit 2 like any unreadable input
        from ckptguard.errors import CorruptCheckpointError

        raise CorruptCheckpointError(f"{storage.describe(name)} cannot be inspected: {'; '.join(info.problems)} "
                                     f"Run 'ckptguard verify {storage.describe(name)}'.")
    m = info.manifest
    state_extra = _state_extra(CheckpointReader(storage, name, m))
    if args.json:
        if picked:
            err_console().print(f"inspecting {storage.describe(name)}: {picked}", highlight=False)
        print_json({**m, "status": info.status, "valid": info.valid, "problems": list(info.problems),
                    "state_extra": state_extra})
        return 0
    c = console()
    c.print(_summary(storage.describe(name), m, info, picked, state_extra))
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


def _state_extra(reader: CheckpointReader) -> Any:
    """The TrainState's ``extra=`` as saved in state.json (checksum verified; tensors appear as
    references), or a note why it cannot be shown."""
    if not reader.has("state.json"):
        return None
    try:
        state = reader.json("state.json")
    except (CheckpointError, ValueError) as e:
        return f"(state.json unreadable: {e})"
    return state.get("extra") if isinstance(state, dict) else None


def _compact(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, separators=(", ", ": "), default=str)
    return text if len(text) <= 300 else text[:297] + "..."


def _summary(where: str, m: dict[str, Any], info: CheckpointInfo, picked: str = "", state_extra: Any = None) -> Table:
    env = m.get("environment") or {}
    git = env.get("git") or {}
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    rows = [
        ("checkpoint", f"{where}\n({picked})" if picked else where),
        ("step", str(m["step"])),
        ("created", f"{m.get('created')}  (save took {m.get('save_seconds', 0):.3f}s, reason: {m.get('reason', '')})"),
        ("format", f"{m.get('format')} v{m.get('format_version')}, checksum {m.get('checksum')}"),
        ("status", info.status if info.valid else f"{info.status}: {'; '.join(problem_text(info.status, p) for p in info.problems)}"),
        ("metrics", ", ".join(f"{k}={v}" for k, v in (m.get("metrics") or {}).items()) or "-"),
        ("config hash", str(m.get("config_hash"))),
        ("git", f"{git.get('commit', '?')[:12]}{' (dirty)' if git.get('dirty') else ''}" if git else "not a git work tree"),
        ("versions", f"python {env.get('python')}, torch {env.get('torch')}, numpy {env.get('numpy')}, ckptguard {env.get('ckptguard')}"),
        ("host / device", f"{env.get('host')} / {env.get('device')}"),
    ]
    rows += [(k, _compact(v)) for k, v in custom_fields(m).items()]  # add_manifest_fields, extra
    if state_extra:
        rows.append(("state extra", _compact(state_extra)))  # TrainState(extra=...), from state.json
    for k, v in rows:
        head.add_row(k, v)
    return head
