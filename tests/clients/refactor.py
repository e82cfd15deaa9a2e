"""A refactor between save and resume that keeps the checkpoint compatible.

Version 1 builds the network as one ``nn.Sequential`` and writes the loop inline. Version 2
(``CLIENT_REFACTORED=1``, what the resumed process runs) has a named ``MLP`` class that
registers the same children under the same names, a ``ResidualNet`` with its own forward, and
the step moved into a function: the state dict keys and the arithmetic are unchanged, so the
resumed run must match an uninterrupted version-1 run bit for bit.

    python refactor.py RUN_DIR OUT_FILE
"""

import os
import random
import sys

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ckptguard as cg

TOTAL_STEPS = 22
REFACTORED = os.environ.get("CLIENT_REFACTORED") == "1"


def build_v1():
    net = nn.Module()
    net.body = nn.Sequential(nn.Linear(5, 24), nn.SiLU(), nn.Dropout(0.15), nn.Linear(24, 24))
    net.out = nn.Linear(24, 1)
    return net


def forward_v1(net, x):
    return net.out(net.body(x) + x.sum(1, keepdim=True))


class MLP(nn.Module):  # version 2: same children, same names ("0", "1", "2", "3")
    def __init__(self, d_in, d_hidden, p):
        super().__init__()
        for i, m in enumerate([nn.Linear(d_in, d_hidden), nn.SiLU(), nn.Dropout(p), nn.Linear(d_hidden, d_hidden)]):
            self.add_module(str(i), m)

    def forward(self, x):
        for m in self.children():
            x = m(x)
        return x


class ResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = MLP(5, 24, 0.15)
        self.out = nn.Linear(24, 1)

    def forward(self, x):
        skip = x.sum(1, keepdim=True)
        return self.out(self.body(x) + skip)


def train_step(model, opt, xb, yb):
    pred = model(xb)
    loss = nn.functional.smooth_l1_loss(pred, yb)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def main(run_dir, out_file):
    torch.manual_seed(21)
    np.random.seed(21)
    random.seed(21)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(80, 5, generator=g)
    ds = TensorDataset(x, x.pow(2).sum(1, keepdim=True))
    model = ResidualNet() if REFACTORED else build_v1()
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, momentum=0.5)
    loader = DataLoader(ds, batch_size=8, sampler=cg.ResumableSampler(ds, seed=4))
    state = cg.TrainState(model=model, optimizer=opt, dataloader=loader, config={"hidden": 24, "lr": 1e-3})
    mgr = cg.CheckpointManager(run_dir, every_steps=4)

    step = mgr.restore(state) or 0
    while step < TOTAL_STEPS:
        for xb, yb in loader:
            xb = xb + 0.01 * float(np.random.randn())  # numpy jitter in the main process
            if REFACTORED:
                loss = train_step(model, opt, xb, yb)
            else:
                loss = nn.functional.smooth_l1_loss(forward_v1(model, xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss = loss.item()
            step += 1
            print(f"step {step} loss {loss:.5f}", flush=True)
            mgr.save(step, state, metrics={"loss": loss})
            if step == TOTAL_STEPS:
                break
    mgr.close()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, out_file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
