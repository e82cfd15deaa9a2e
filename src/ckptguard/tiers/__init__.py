"""Tiered checkpoints: hot host memory owned by a keeper process, node-local disk, durable storage.

``CheckpointManager(url, tiers=Tiers(...))`` saves to the first tier and copies each committed
checkpoint down in the background (ckptguard.tiers.tiered); restore takes the newest checkpoint
any tier holds, from the fastest (ckptguard.tiers.restoring); the keeper (ckptguard.tiers.keeper)
outlives the training process and persists the newest hot checkpoint when nobody restores it. In
a torch.distributed run every node's tiers hold the whole checkpoint (ckptguard.tiers.replica) and
the ranks agree at restore on the newest step every rank can obtain.
"""

from ckptguard.tiers.options import Tiers

__all__ = ["Tiers"]
