"""Measure every="auto" (save cost -> Young/Daly interval) for a 25.2M-parameter model + Adam.

    PYTHONPATH=src python examples/policies_measure_auto.py
"""
import logging
import shutil

import torch

import ckptguard as cg

logging.basicConfig(level=logging.INFO, format="%(message)s")
logging.getLogger("ckptguard.manager.manager").setLevel(logging.WARNING)
for async_save in (False, True):
    run = f"/tmp/measure-auto-{async_save}"
    shutil.rmtree(run, ignore_errors=True)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(6)])  # 25.2M params
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 2048)).sum().backward(); opt.step()
    state = cg.TrainState(model=model, optimizer=opt)
    mgr = cg.CheckpointManager(run, every="auto", mtbf_seconds=3 * 3600, async_save=async_save)
    for step in range(1, 5):
        mgr.save(step, state, force=True)
        mgr.wait()
    d = mgr.schedule.describe()
    mgr.close()
    print(f"async={async_save}: state {sum(p.numel() for p in model.parameters())/1e6:.1f}M params, "
          f"smoothed save cost {d['save_cost_seconds']:.3f}s -> every {d['auto_seconds']:.1f}s at MTBF 3 h")
