"""A warm-up + cosine schedule written as a module-level function, bound with functools.partial
into LambdaLR; a config dataclass; Adam; drop_last; two workers without randomness.

    python lambda_partial.py RUN_DIR OUT_FILE
"""

import dataclasses
import functools
import math
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ckptguard as cg


@dataclasses.dataclass
class Config:
    lr: float = 4e-3
    warmup: int = 5
    total_steps: int = 26
    hidden: int = 48
    batch_size: int = 7


def warmup_cosine(step, warmup, total):
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def main(run_dir, out_file):
    cfg = Config()
    torch.manual_seed(3)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(100, 6, generator=g)
    ds = TensorDataset(x, torch.sin(x.sum(1, keepdim=True)))
    model = nn.Sequential(nn.Linear(6, cfg.hidden), nn.Tanh(), nn.Dropout(0.1), nn.Linear(cfg.hidden, 1))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, functools.partial(warmup_cosine, warmup=cfg.warmup, total=cfg.total_steps))
    loader = DataLoader(ds, batch_size=cfg.batch_size, sampler=cg.ResumableSampler(ds, seed=1), drop_last=True, num_workers=2)
    state = cg.TrainState(model=model, optimizer=opt, scheduler=sched, dataloader=loader, config=cfg)
    mgr = cg.CheckpointManager(run_dir, every_steps=4, async_save=True)

    step = mgr.restore(state) or 0
    while step < cfg.total_steps:
        for xb, yb in loader:
            loss = nn.functional.mse_loss(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            print(f"step {step} loss {loss.item():.5f} lr {sched.get_last_lr()[0]:.5f}", flush=True)
            mgr.save(step, state, metrics={"loss": loss.item(), "lr": sched.get_last_lr()[0]})
            if step == cfg.total_steps:
                break
    mgr.save(step, state, force=True)
    mgr.close()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, out_file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
