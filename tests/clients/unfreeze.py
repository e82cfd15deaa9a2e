"""Progressive unfreezing: the head trains first; at step 10 the encoder is unfrozen and added
to the optimizer as a second param group with its own learning rate. On restart the script
asks the manager which checkpoint it will resume and rebuilds the optimizer's groups first.

    python unfreeze.py RUN_DIR OUT_FILE
"""

import sys

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ckptguard as cg

UNFREEZE_AT, TOTAL_STEPS = 10, 24


class Classifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU())
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(32, 3))

    def forward(self, x):
        return self.head(self.encoder(x))


def unfreeze(model, opt):
    model.encoder.requires_grad_(True)
    opt.add_param_group({"params": list(model.encoder.parameters()), "lr": 5e-4})


def main(run_dir, out_file):
    torch.manual_seed(8)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(90, 12, generator=g)
    ds = TensorDataset(x, x[:, :3].argmax(1))
    model = Classifier()
    model.encoder.requires_grad_(False)
    opt = torch.optim.AdamW(model.head.parameters(), lr=3e-3)
    loader = DataLoader(ds, batch_size=9, sampler=cg.ResumableSampler(ds, seed=2))
    state = cg.TrainState(model=model, optimizer=opt, dataloader=loader, extra={"unfrozen": False})
    mgr = cg.CheckpointManager(run_dir, every_steps=3, async_save=True)

    latest = mgr.latest()
    if latest is not None and latest.step >= UNFREEZE_AT:
        unfreeze(model, opt)
    step = mgr.restore(state) or 0
    while step < TOTAL_STEPS:
        for xb, yb in loader:
            loss = nn.functional.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            print(f"step {step} loss {loss.item():.4f} groups {len(opt.param_groups)}", flush=True)
            if step == UNFREEZE_AT:
                unfreeze(model, opt)
                state.extra["unfrozen"] = True
            mgr.save(step, state, metrics={"loss": loss.item()})
            if step == TOTAL_STEPS:
                break
    mgr.close()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "extra": state.extra}, out_file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
