"""A spot-instance user's loop with tiers: host memory every few steps, a node-local directory
and the durable run directory less often; augmentation in two DataLoader workers, gradient
accumulation, an EMA, a LambdaLR; killed at random and restarted by its supervisor.

    python spot_tiers.py RUN_DIR LOCAL_DIR OUT_FILE TOTAL [--grace S] [--durable-every S] [--kill-at STEP]

Prints ``RESTORED <step> <tier>`` and ``DONE`` lines for the test that drives it.
"""

import argparse
import functools
import logging
import os
import random
import re
import sys

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import ckptguard as cg
from ckptguard.tiers import Tiers


class Noisy(Dataset):
    def __init__(self, n=256):
        g = torch.Generator().manual_seed(5)
        self.x = torch.randn(n, 16, generator=g)
        self.y = (self.x[:, :4].sum(1) > 0).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = self.x[i] * (1.0 + 0.1 * random.random()) + 0.05 * torch.randn(16)
        return torch.roll(x, int(np.random.randint(0, 3))), self.y[i]


def warmup(step, n):
    return min(1.0, (step + 1) / n)


class EMA:
    def __init__(self, model):
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model):
        for k, v in model.state_dict().items():
            self.shadow[k].mul_(0.9).add_(v, alpha=0.1)

    def state_dict(self):
        return {"shadow": self.shadow}

    def load_state_dict(self, sd):
        for k, v in sd["shadow"].items():
            self.shadow[k].copy_(v)


class Tap(logging.Handler):
    """Prints which tier the restore came from (for the test)."""

    def emit(self, record):
        m = re.match(r"Restored step (\d+) from the (\w+) tier", record.getMessage())
        if m:
            print("RESTORED", m.group(1), m.group(2), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("local")
    p.add_argument("out")
    p.add_argument("total", type=int)
    p.add_argument("--grace", type=float, default=600.0)
    p.add_argument("--durable-every", default="2.0")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--kill-at", type=int, default=None)
    p.add_argument("--storage-options", default=None)
    a = p.parse_args()
    logging.getLogger("ckptguard").setLevel(logging.INFO)
    logging.getLogger("ckptguard").addHandler(Tap())
    warnings = logging.StreamHandler()
    warnings.setLevel(logging.WARNING)
    logging.getLogger("ckptguard").addHandler(warnings)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = nn.Sequential(nn.Linear(16, a.hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(a.hidden, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(warmup, n=10))
    ema = EMA(model)
    ds = Noisy()
    sampler = cg.ResumableSampler(ds, shuffle=True, seed=0)
    loader = DataLoader(ds, batch_size=8, sampler=sampler, num_workers=2)
    state = cg.TrainState(model=model, optimizer=opt, scheduler=sched, dataloader=loader, ema=ema, extra={"micro": 0})
    durable_every = a.durable_every if a.durable_every == "auto" else float(a.durable_every)
    options = {"storage_options": __import__("json").loads(a.storage_options)} if a.storage_options else {}
    mgr = cg.CheckpointManager(
        a.run, every_steps=2, async_save=True, mtbf_seconds=3600, **options,
        tiers=Tiers(local=a.local, local_every_seconds=0.3, durable_every_seconds=durable_every, grace_seconds=a.grace),
    )
    step = mgr.restore(state) or 0
    if step == 0:
        print("RESTORED 0 none", flush=True)
    accum = 2
    with mgr.preemption_guard():
        while step < a.total:
            for xb, yb in loader:
                loss = nn.functional.cross_entropy(model(xb), yb) / accum
                loss.backward()
                state.extra["micro"] += 1
                if state.extra["micro"] % accum:
                    continue
                opt.step()
                opt.zero_grad(set_to_none=True)
                sched.step()
                ema.update(model)
                step += 1
                mgr.save(step, state, metrics={"loss": loss.item()})
                if step == a.kill_at:
                    mgr.wait()
                    os.kill(os.getpid(), 9)
                if step >= a.total:
                    break
    mgr.close()
    torch.save({"model": model.state_dict(), "ema": ema.shadow, "opt": opt.state_dict()["state"]}, a.out)
    print("DONE", step, flush=True)


if __name__ == "__main__":
    sys.exit(main())
