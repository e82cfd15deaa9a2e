"""Gradient accumulation: 4 micro-batches per optimizer step, the step counter counts optimizer
steps, checkpoints only at optimizer-step boundaries. A GradScaler, gradient clipping, SGD with
Nesterov momentum and python ``random`` jitter in the main process (``num_workers=0``).

    python grad_accum.py RUN_DIR OUT_FILE
"""

import random
import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ckptguard as cg

ACCUM, TOTAL_STEPS = 4, 14


def make_data():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(120, 10, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    return TensorDataset(x, y)


def main(run_dir, out_file):
    torch.manual_seed(0)
    random.seed(0)
    torch.set_num_threads(1)
    ds = make_data()
    model = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    loader = DataLoader(ds, batch_size=6, sampler=cg.ResumableSampler(ds, shuffle=True, seed=3))
    state = cg.TrainState(model=model, optimizer=opt, scheduler=sched, scaler=scaler, dataloader=loader, extra={"micro": 0})
    mgr = cg.CheckpointManager(run_dir, every_steps=3)

    step = mgr.restore(state) or 0
    running = 0.0
    while step < TOTAL_STEPS:
        for x, y in loader:
            x = x * (1 + 0.05 * random.gauss(0, 1))
            loss = nn.functional.cross_entropy(model(x), y) / ACCUM
            scaler.scale(loss).backward()
            running += loss.item()
            state.extra["micro"] += 1
            if state.extra["micro"] % ACCUM:
                continue
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
            sched.step()
            step += 1
            print(f"step {step} loss {running:.4f}", flush=True)
            mgr.save(step, state, metrics={"loss": running})
            running = 0.0
            if step == TOTAL_STEPS:
                break
    mgr.close()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "extra": state.extra}, out_file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
