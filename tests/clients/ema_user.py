"""An EMA of the weights as a plain user class (state_dict/load_state_dict), passed to
TrainState as a keyword; image-like data with random flips and crops in two persistent
workers whose worker_init_fn is the one from the PyTorch FAQ; a validation loss every 6 steps
that retention keeps the best of.

    python ema_user.py RUN_DIR OUT_FILE
"""

import random
import sys

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import ckptguard as cg

TOTAL_STEPS = 30


class EMA:
    def __init__(self, model, decay=0.97):
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.dtype.is_floating_point}

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1 - d)

    def state_dict(self):
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, sd):
        self.decay, self.updates = sd["decay"], sd["updates"]
        for k, v in sd["shadow"].items():
            self.shadow[k].copy_(v)


class Shapes(Dataset):
    def __init__(self, n=72):
        g = torch.Generator().manual_seed(11)
        self.images = torch.rand(n, 1, 12, 12, generator=g)
        self.labels = (self.images.mean((1, 2, 3)) > 0.5).long()

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = self.images[i]
        if random.random() < 0.5:
            img = img.flip(-1)
        top, left = np.random.randint(0, 3, size=2)
        img = img[:, top : top + 10, left : left + 10]
        return img + 0.02 * torch.randn_like(img), self.labels[i]


def seed_worker(worker_id):  # the PyTorch FAQ's recipe
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def main(run_dir, out_file):
    torch.manual_seed(42)
    torch.set_num_threads(1)
    ds = Shapes()
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.25), nn.Linear(8 * 8 * 8, 2))
    ema = EMA(model)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    loader = DataLoader(ds, batch_size=8, sampler=cg.ResumableSampler(ds, seed=5), num_workers=2,
                        persistent_workers=True, worker_init_fn=seed_worker)
    val_x, val_y = ds.images[:16, :, 1:11, 1:11], ds.labels[:16]
    state = cg.TrainState(model=model, optimizer=opt, dataloader=loader, ema=ema, extra={"epoch": 0, "best": None})
    mgr = cg.CheckpointManager(run_dir, every_steps=4,
                               retention=cg.Retention(keep_last=2, keep_best=1, metric="val_loss", mode="min"))

    step = mgr.restore(state) or 0
    while step < TOTAL_STEPS:
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            ema.update(model)
            step += 1
            metrics = {"loss": loss.item()}
            if step % 6 == 0:
                model.eval()
                with torch.no_grad():
                    metrics["val_loss"] = nn.functional.cross_entropy(model(val_x), val_y).item()
                model.train()
                best = state.extra["best"]
                state.extra["best"] = metrics["val_loss"] if best is None else min(best, metrics["val_loss"])
            print(f"step {step} " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
            mgr.save(step, state, metrics=metrics)
            if step == TOTAL_STEPS:
                break
        state.extra["epoch"] += 1
    mgr.close()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "ema": ema.state_dict(), "extra": state.extra}, out_file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
