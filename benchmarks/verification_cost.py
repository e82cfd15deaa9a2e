"""What behavioural verification (probe=) costs per save: the probe forward on the training thread
(adds to the save's blocking time) and the post-commit check (load back from storage into a CPU
copy + forward), against the same save without a probe.

    PYTHONPATH=src python benchmarks/verification_cost.py [--width 2048] [--layers 6] [--saves 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import ckptguard as cg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--saves", type=int, default=5)
    ap.add_argument("--probe-rows", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(args.layers):
        layers += [nn.Linear(args.width, args.width), nn.GELU()]
    model = nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, args.width)).sum().backward()
    opt.step()
    state = cg.TrainState(model=model, optimizer=opt)
    nparams = sum(p.numel() for p in model.parameters())
    probe = torch.randn(args.probe_rows, args.width)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, kw in (("no probe", {}), ("probe", {"probe": probe})):
            mgr = cg.CheckpointManager(Path(tmp) / label.replace(" ", "_"), **kw)
            times, fields, verify = [], [], []
            for i in range(args.saves + 1):
                t0 = time.perf_counter()
                mgr.save(i + 1, state, force=True)
                times.append(time.perf_counter() - t0)
            if mgr.verifier is not None:
                # isolate the two parts on the last checkpoint
                for _ in range(args.saves):
                    t0 = time.perf_counter()
                    mgr.verifier.manifest_fields(99, state)
                    fields.append(time.perf_counter() - t0)
                    m = mgr.checkpoints()[-1].manifest
                    t0 = time.perf_counter()
                    res = mgr.verifier.verify(m)
                    verify.append(time.perf_counter() - t0)
                    assert res.status == "verified", res
            mgr.close()
            rows[label] = (statistics.median(times[1:]), statistics.median(fields) if fields else 0.0,
                           statistics.median(verify) if verify else 0.0)
    print(f"model {nparams / 1e6:.1f}M params ({nparams * 4 / 1e9:.2f} GB fp32 + Adam state), "
          f"probe {args.probe_rows}x{args.width}, {args.saves} saves, medians")
    for label, (save, fields, verify) in rows.items():
        print(f"  {label:9s} save (sync, incl. verification) {save:.3f}s   probe forward at save {fields * 1e3:.1f} ms"
              f"   post-commit verify {verify:.3f}s")
    base, with_probe = rows["no probe"][0], rows["probe"][0]
    print(f"  verification adds {with_probe - base:+.3f}s per sync save ({with_probe / base:.2f}x)")


if __name__ == "__main__":
    main()
