"""A Lightning training script written the way users write one, with ckptguard's callback.

    python lightning_train.py RUN_DIR OUT_FILE

ckptguard: every 3 optimizer steps, async saves, keep the last 2, probe verification.
Quirks on purpose: random augmentation in two DataLoader workers (python ``random``, numpy and
torch), dropout, gradient accumulation (2 batches per optimizer step), AdamW with a per-step LR
scheduler, ``save_hyperparameters``. Resumes through Lightning's own path:
``trainer.fit(model, ckpt_path="last")``. Prints ``step N`` after each optimizer step; at the end
writes the final weights, optimizer and scheduler state to OUT_FILE (``torch.save``, tensors only).

Environment (for the tests):
- ``LT_MODE=plain``: Lightning alone (``ModelCheckpoint(every_n_train_steps=3, save_last=True)``
  into RUN_DIR, a plain DataLoader with ``shuffle=True``), for the side-by-side comparison.
- ``LT_KILL_IN_SAVE=k``: SIGKILL the whole process group from inside the k-th save: ckptguard: at
  the 2nd file written into the staging folder; plain: 1 ms into ``TorchCheckpointIO.save_checkpoint``.
- ``LT_SIGTERM_AT=n``: the training step of batch n sends SIGTERM to the process (mid-window).
- ``LT_MAX_STEPS`` (default 20), ``LT_WORKERS`` (default 2).
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import ckptguard as cg
from ckptguard.integrations.lightning import CkptguardCallback, resumable_loader
from ckptguard.storage import LocalStorage

MODE = os.environ.get("LT_MODE", "ckptguard")
MAX_STEPS = int(os.environ.get("LT_MAX_STEPS", "20"))
WORKERS = int(os.environ.get("LT_WORKERS", "2"))
KILL_IN_SAVE = int(os.environ.get("LT_KILL_IN_SAVE", "0"))
SIGTERM_AT = int(os.environ.get("LT_SIGTERM_AT", "0"))


def die() -> None:
    print("killing myself inside a save", flush=True)
    os.killpg(os.getpgid(0), signal.SIGKILL)


class Augmented(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(96, 8, generator=g)
        self.y = self.x[:, :2].sum(1, keepdim=True)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        noise = 0.1 * torch.randn(8) + random.random() * 0.01 + float(np.random.rand()) * 0.01
        return self.x[i] + noise, self.y[i]


class Regressor(L.LightningModule):
    def __init__(self, hidden: int = 32, lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.99)) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(0.2), nn.Linear(hidden, 1))
        self.batches = 0
        self.printed = -1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.batches += 1
        if SIGTERM_AT and self.batches == SIGTERM_AT:
            os.kill(os.getpid(), signal.SIGTERM)
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def on_train_start(self) -> None:
        self.printed = self.trainer.global_step

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        if self.trainer.global_step != self.printed:  # an optimizer step happened
            self.printed = self.trainer.global_step
            print(f"step {self.printed}", flush=True)

    def configure_optimizers(self) -> dict[str, object]:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, betas=self.hparams.betas)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.8)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader[tuple[torch.Tensor, torch.Tensor]]:
        ds = Augmented()
        if MODE == "plain":
            return DataLoader(ds, batch_size=8, shuffle=True, num_workers=WORKERS)
        loader = DataLoader(ds, batch_size=8, num_workers=WORKERS, sampler=cg.ResumableSampler(ds, shuffle=True, seed=3))
        return resumable_loader(loader)


class KillingStorage(LocalStorage):
    """LocalStorage that SIGKILLs the process at the 2nd file of the KILL_IN_SAVE-th staged save."""

    saves = 0
    files = 0

    def create(self, path: str):  # type: ignore[no-untyped-def]
        if KILL_IN_SAVE and path.startswith(".tmp-"):
            if path.endswith("model.safetensors"):
                KillingStorage.saves += 1
                KillingStorage.files = 0
            KillingStorage.files += 1
            if KillingStorage.saves == KILL_IN_SAVE and KillingStorage.files == 2:
                die()
        return super().create(path)


def plain_callbacks(run_dir: str) -> tuple[list[L.Callback], list[object]]:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class KillingIO(TorchCheckpointIO):
        saves = 0

        def save_checkpoint(self, checkpoint, path, storage_options=None):  # type: ignore[no-untyped-def]
            KillingIO.saves += 1
            if KILL_IN_SAVE and KillingIO.saves == KILL_IN_SAVE:
                threading.Timer(0.001, die).start()
            super().save_checkpoint(checkpoint, path, storage_options)

    mc = ModelCheckpoint(dirpath=run_dir, every_n_train_steps=3, save_top_k=2, monitor="step", mode="max", save_last=True)
    return [mc], [KillingIO()]


def main(run_dir: str, out_file: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    model = Regressor()
    if MODE == "plain":
        callbacks, plugins = plain_callbacks(run_dir)
    else:
        probe = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))  # behavioural verification
        cb = CkptguardCallback(KillingStorage(run_dir), every_steps=3, async_save=True, probe=probe,
                               retention=cg.Retention(keep_last=2))
        callbacks, plugins = [cb], []
    trainer = L.Trainer(
        max_steps=MAX_STEPS, accumulate_grad_batches=2, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=callbacks, plugins=plugins, default_root_dir=run_dir,
    )
    trainer.fit(model, ckpt_path="last")
    opt = trainer.optimizers[0]
    sched = trainer.lr_scheduler_configs[0].scheduler
    torch.save({
        "model": model.state_dict(),
        "optimizer": opt.state_dict()["state"],
        "lr": [g["lr"] for g in opt.param_groups],
        "scheduler_epoch": sched.last_epoch,
        "global_step": trainer.global_step,
    }, out_file)
    print(f"done {trainer.global_step}", flush=True)




def make_model() -> Regressor:
    """The factory ``ckptguard doctor CKPT --model lightning_train.py:make_model`` builds."""
    return Regressor()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
