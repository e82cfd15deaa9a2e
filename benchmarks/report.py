"""Targets (ratios within one run) and the tables: rich on the terminal, markdown for BENCHMARKS.md."""

from __future__ import annotations

from typing import Any

MB = 1e6

SAVE_LABELS = {
    "ckptguard_sync": "ckptguard sync save",
    "ckptguard_async": "ckptguard async save",
    "ckptguard_buffered": "ckptguard sync save, buffered (no O_DIRECT)",
    "torch_save": "torch.save + fsync",
    "safetensors": "safetensors save_file + fsync",
    "dcp_1thread": "DCP save, 1 thread",
    "dcp_2threads": "DCP save, 2 threads",
    "dcp_async": "DCP async_save",
    "raw_write": "raw contiguous write + fsync",
    "raw_direct": "raw contiguous O_DIRECT write + fsync (the disk's limit)",
    "copy_reused": "copy into reused host buffers",
}
RESTORE_LABELS = {
    "ckptguard": "ckptguard restore (verified, in place)",
    "torch_load": "torch.load(weights_only=True) + load_state_dict",
    "safetensors": "safetensors load_file + load_state_dict",
    "dcp": "DCP load (in place) + set_state_dict",
    "raw_read": "raw read into an existing buffer",
}


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, value: float, limit: float, unit: str = "x") -> None:
        out.append({"target": name, "value": value, "limit": limit, "unit": unit, "met": value <= limit})

    save = res.get("save")
    if save:
        for regime in ("first", "resave"):
            sync = save["ckptguard_sync"][regime]["durable"]
            add(f"sync save / torch.save ({regime})", _ratio(sync, save["torch_save"][regime]["durable"]), 0.5)
            add(f"sync save / DCP 2 threads ({regime})", _ratio(sync, save["dcp_2threads"][regime]["durable"]), 1.0)
            add(f"sync save / raw write ({regime})", _ratio(sync, save["raw_write"][regime]["durable"]), 2.0)
            blocked = save["ckptguard_async"][regime]["blocked"]
            add(f"async blocked / bare copy ({regime})", _ratio(blocked, save["copy_reused"][regime]["durable"]), 1.5)
            add(f"async blocked / DCP async_save blocked ({regime})", _ratio(blocked, save["dcp_async"][regime]["blocked"]), 0.5)
    rest = res.get("restore")
    if rest:
        add("restore / torch.load", _ratio(rest["ckptguard"]["seconds"], rest["torch_load"]["seconds"]), 1.0)
        add("restore peak extra RSS / state", _ratio(rest["ckptguard"]["extra_rss"], res["spec"]["nbytes"]), 0.10)
    train = res.get("train")
    if train:
        modes = train["modes"]
        if "cost" in modes["async"]:
            add("throughput lost, async saves (stalls + slowed steps, in-segment)", modes["async"]["cost"], 0.03, "%")
        add("throughput lost, async saves (segment rates vs none)", 1 - _ratio(modes["async"]["rate"], modes["none"]["rate"]), 0.03, "%")
    return out


def _fmt_target(t: dict[str, Any]) -> tuple[str, str, str, str]:
    if t["unit"] == "%":
        value, limit = f"{100 * t['value']:.1f}%", f"<= {100 * t['limit']:.0f}%"
    else:
        value, limit = f"{t['value']:.2f}x", f"<= {t['limit']:.2f}x"
    return t["target"], value, limit, "met" if t["met"] else "MISSED"


def _save_rows(res: dict[str, Any]) -> list[list[str]]:
    rows = []
    save = res["save"]
    raw = {r: save["raw_write"][r]["durable"] for r in ("first", "resave")}
    for m, label in SAVE_LABELS.items():
        if m not in save:
            continue
        f, r = save[m]["first"], save[m]["resave"]
        blocked = f"{f['blocked']:.3f} / {r['blocked']:.3f}" if m.endswith("async") else ""
        rows.append([
            label, f"{f['durable']:.3f}", f"{r['durable']:.3f}", blocked,
            f"{f['durable'] / raw['first']:.2f}x / {r['durable'] / raw['resave']:.2f}x",
            f"{max(f['extra_rss'], r['extra_rss']) / MB:.0f}",
        ])
    return rows


SAVE_HEAD = ["method", "first save s", "re-save s", "blocked s (first / re-save)", "vs raw write", "peak extra RSS MB"]
RESTORE_HEAD = ["method", "cold restore s", "vs torch.load", "peak extra RSS MB"]
TRAIN_HEAD = ["saving", "steps/s", "vs no saves", "saves", "blocked s (total)", "steps beside a save", "slowed s", "time lost (in-segment)"]


def _restore_rows(res: dict[str, Any]) -> list[list[str]]:
    rest = res["restore"]
    base = rest["torch_load"]["seconds"]
    return [[label, f"{rest[m]['seconds']:.3f}", f"{rest[m]['seconds'] / base:.2f}x", f"{rest[m]['extra_rss'] / MB:.0f}"]
            for m, label in RESTORE_LABELS.items()]


def _train_rows(res: dict[str, Any]) -> list[list[str]]:
    modes = res["train"]["modes"]
    base = modes["none"]["rate"]
    return [[m, f"{v['rate']:.3f}", f"{v['rate'] / base:.3f}", f"{v['saves']:.0f}", f"{v['blocked']:.2f}",
             f"{v.get('overlapped_steps', 0):.0f}", f"{v.get('slowed', 0):.2f}", f"{100 * v.get('cost', 0):.2f}%"]
            for m, v in modes.items()]


def render_tables(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()

    def show(title: str, head: list[str], rows: list[list[str]]) -> None:
        table = Table(title=title)
        for h in head:
            table.add_column(h)
        for r in rows:
            table.add_row(*r)
        console.print(table)

    spec = res["spec"]
    console.print(f"state: {spec['params'] / 1e6:.1f}M params + Adam, {spec['nbytes'] / 1e9:.3f} GB; machine: {res['machine']}")
    if "save" in res:
        show("Saves (median, seconds to durable)", SAVE_HEAD, _save_rows(res))
    if "restore" in res:
        show("Restores (median, cold page cache)", RESTORE_HEAD, _restore_rows(res))
    if "train" in res:
        show("Training throughput", TRAIN_HEAD, _train_rows(res))
    show("Targets", ["target", "measured", "limit", ""], [list(_fmt_target(t)) for t in res["targets"]])


def _md(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(res: dict[str, Any]) -> str:
    m, spec = res["machine"], res["spec"]
    parts = [
        f"Command: `{res['command']}` — {m['date']}, {res['reps']} repetitions per method (medians).",
        f"Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gb']} GB RAM, Linux {m['kernel']}, "
        f"Python {m['python']}, torch {m['torch']}. Shared with other jobs: compare ratios, not absolutes.",
        f"State: {spec['layers']} x Linear({spec['width']}, {spec['width']}) + Adam after one step: "
        f"{spec['params'] / 1e6:.1f}M parameters, {spec['nbytes'] / 1e9:.3f} GB.",
    ]
    if "save" in res:
        parts += ["### Saves", _md(SAVE_HEAD, _save_rows(res))]
    if "restore" in res:
        parts += ["### Restores", _md(RESTORE_HEAD, _restore_rows(res))]
    if "train" in res:
        t = res["train"]
        ts = t["spec"]
        parts += [
            "### Training throughput",
            f"{ts['layers']} x Linear({ts['width']}) + Adam, batch {t['batch']}, one step {t['step_seconds']:.3f} s; "
            f"a save every {t['every']} steps (~{t['every'] * t['step_seconds']:.0f} s of compute); {t['seconds']:.0f} s per run.",
            _md(TRAIN_HEAD, _train_rows(res)),
        ]
    parts += ["### Targets", _md(["target", "measured", "limit", ""], [list(_fmt_target(t)) for t in res["targets"]])]
    return "\n\n".join(parts)
