"""Incremental checkpoints: cost when everything changes, and disk use when little does.

1. Full training (every tensor changes between saves): median save time of a synchronous
   ``CheckpointManager.save`` with ``incremental=True`` vs plain, saves interleaved (each round
   one of each, the order alternating) so both see the same machine noise; retention keeps the last 2, so the
   incremental figure includes pruning and garbage collection. Target: ratio <= 1.05.
2. Fine-tuning a head on a frozen ~34 MB body, 10 checkpoints: bytes on storage, incremental vs
   plain, as a multiple of one body. Target: <= 1.3x.

    PYTHONPATH=src python benchmarks/incremental.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ckptguard as cg
from ckptguard.report.sizes import run_sizes
from ckptguard.run.catalog import scan
from ckptguard.storage import open_storage


def transformer_like(width: int, blocks: int) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.LayerNorm(width), nn.Linear(width, 3 * width), nn.Linear(width, width),
                   nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.Linear(4 * width, width)]
    return nn.Sequential(nn.Embedding(8192, width), *layers)


def full_training(width: int, blocks: int, saves: int, root: Path) -> dict[str, Any]:
    torch.manual_seed(0)
    model = transformer_like(width, blocks)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # one real step so Adam state exists
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    state = cg.TrainState(model=model, optimizer=opt)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    nbytes += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    ntensors = len(model.state_dict()) + sum(len(s) for s in opt.state.values())
    mgrs = {
        mode: cg.CheckpointManager(root / mode, incremental=(mode == "incremental"), retention=cg.Retention(keep_last=2))
        for mode in ("plain", "incremental")
    }
    times: dict[str, list[float]] = {m: [] for m in mgrs}
    cpu: dict[str, list[float]] = {m: [] for m in mgrs}  # process CPU time: steadier on a busy host
    with torch.no_grad():
        for i in range(saves + 1):
            order = list(mgrs.items()) if i % 2 else list(mgrs.items())[::-1]  # no mode always goes first
            for mode, mgr in order:
                for p in model.parameters():  # an optimizer step: every tensor changes
                    p.grad.normal_(0, 1e-3)
                opt.step()
                c0, t0 = time.process_time(), time.perf_counter()
                mgr.save(i + 1, state, force=True)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if i > 0:  # the first save of each run grows the page cache: left out
                    times[mode].append(dt)
                    cpu[mode].append(dc)
    for mgr in mgrs.values():
        mgr.close()
    med = {m: statistics.median(v) for m, v in times.items()}
    return {
        "state_bytes": nbytes,
        "tensors": ntensors,
        "saves": saves,
        "plain_median_s": round(med["plain"], 4),
        "incremental_median_s": round(med["incremental"], 4),
        "ratio": round(med["incremental"] / med["plain"], 4),
        # each incremental save against the plain save just before it (same machine noise)
        "paired_ratio_median": round(statistics.median(i / p for p, i in zip(times["plain"], times["incremental"])), 4),
        "cpu_ratio": round(statistics.median(cpu["incremental"]) / statistics.median(cpu["plain"]), 4),
        "plain_all_s": [round(x, 4) for x in times["plain"]],
        "incremental_all_s": [round(x, 4) for x in times["incremental"]],
    }


def fine_tune(root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in ("plain", "incremental"):
        torch.manual_seed(0)
        body = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(8)]).requires_grad_(False)
        head = nn.Linear(1024, 4)
        model = nn.Sequential(body, nn.ReLU(), head)
        opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
        state = cg.TrainState(model=model, optimizer=opt)
        body_bytes = sum(p.numel() * p.element_size() for p in body.parameters())
        with cg.CheckpointManager(root / f"ft-{mode}", incremental=(mode == "incremental")) as mgr:
            for step in range(1, 11):
                loss = model(torch.randn(16, 1024)).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                mgr.save(step, state, force=True)
        storage = open_storage(root / f"ft-{mode}")
        sizes = run_sizes(storage, scan(storage))
        out["body_bytes"] = body_bytes
        out[f"{mode}_bytes"] = sizes.physical
        out[f"{mode}_x_body"] = round(sizes.physical / body_bytes, 3)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 0.5 GB state instead of 1.16 GB")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    width, blocks, saves = (512, 12, 9) if args.quick else (1024, 7, 15)
    root = Path(tempfile.mkdtemp(prefix="ckptguard-bench-incr-", dir="."))
    try:
        result = {"full_training": full_training(width, blocks, saves, root), "fine_tune": fine_tune(root)}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ft, ftune = result["full_training"], result["fine_tune"]
    sys.stdout.write(
        f"full training, {ft['state_bytes'] / 1e9:.3f} GB in {ft['tensors']} tensors, median of "
        f"{ft['saves']} saves: plain {ft['plain_median_s']:.3f}s, incremental "
        f"{ft['incremental_median_s']:.3f}s, ratio {ft['ratio']:.3f} (paired median "
        f"{ft['paired_ratio_median']:.3f}, CPU time {ft['cpu_ratio']:.3f}; target <= 1.05)\n"
        f"fine-tune, frozen body {ftune['body_bytes'] / 1e6:.1f} MB, 10 checkpoints on storage: plain "
        f"{ftune['plain_bytes'] / 1e6:.1f} MB ({ftune['plain_x_body']}x body), incremental "
        f"{ftune['incremental_bytes'] / 1e6:.1f} MB ({ftune['incremental_x_body']}x body; target <= 1.3x)\n"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
