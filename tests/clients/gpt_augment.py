"""A small character-level GPT, trained the way users write it.

Augmentation runs in two DataLoader workers: a random crop (numpy), random token corruption
(torch) and a coin flip (python ``random``). Dropout, AdamW with weight decay, warm-up + cosine
through ``SequentialLR``, async checkpoints every 5 steps, the README's loop.

    python gpt_augment.py RUN_DIR OUT_FILE
"""

import math
import random
import sys

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import ckptguard as cg

TEXT = "a checkpoint is a promise to the future; keep it and the run survives the night. " * 12
BLOCK, TOTAL_STEPS = 16, 44


class RandomCrops(Dataset):
    def __init__(self, text, n_samples):
        self.chars = sorted(set(text))
        self.data = torch.tensor([self.chars.index(c) for c in text])
        self.n = n_samples

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        start = (i * 13 + np.random.randint(0, 40)) % (len(self.data) - BLOCK - 1)
        chunk = self.data[start : start + BLOCK + 1]
        x, y = chunk[:-1].clone(), chunk[1:].clone()
        if random.random() < 0.5:
            noise = torch.rand(BLOCK) < 0.1
            x[noise] = torch.randint(0, len(self.chars), (int(noise.sum()),))
        return x, y


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=0.1, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(0.1))

    def forward(self, x):
        n = x.shape[1]
        mask = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab, d=32, heads=2, layers=2):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(1, BLOCK, d))
        self.drop = nn.Dropout(0.1)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        x = self.drop(self.tok(idx) + self.pos[:, : idx.shape[1]])
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x))


def main(run_dir, out_file):
    torch.manual_seed(1337)
    random.seed(1337)
    np.random.seed(1337)
    torch.set_num_threads(1)
    ds = RandomCrops(TEXT, 64)
    model = GPT(len(ds.chars))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.2, total_iters=6)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TOTAL_STEPS - 6)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [warmup, cosine], milestones=[6])
    sampler = cg.ResumableSampler(ds, shuffle=True, seed=0)
    loader = DataLoader(ds, batch_size=8, sampler=sampler, num_workers=2)
    cfg = {"d": 32, "layers": 2, "lr": 3e-3, "block": BLOCK}
    state = cg.TrainState(model=model, optimizer=opt, scheduler=sched, dataloader=loader, config=cfg, extra={"epoch": 0})
    mgr = cg.CheckpointManager(run_dir, every_steps=5, async_save=True, retention=cg.Retention(keep_last=3))

    step = mgr.restore(state) or 0
    with mgr.preemption_guard():
        while step < TOTAL_STEPS:
            for x, y in loader:
                logits = model(x)
                loss = nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                step += 1
                print(f"step {step} loss {loss.item():.4f} ppl {math.exp(loss.item()):.2f}", flush=True)
                mgr.save(step, state, metrics={"loss": loss.item(), "lr": sched.get_last_lr()[0]})
                if step >= TOTAL_STEPS:
                    break
            state.extra["epoch"] += 1
    mgr.save(TOTAL_STEPS, state, force=True)
    mgr.close()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "extra": state.extra}, out_file)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
