"""Restoring into existing storage: the optimizer's live state tensors as read targets.

A resumed job whose optimizer already holds state (a restore after a fall-back, or a restore into
a running job) would otherwise allocate a second copy of the whole optimizer state, then drop the
old one. Encoding the current ``state_dict()`` the way ``capture`` does gives the same tensor keys
as the saved file, so the reader can fill those tensors in place; ``load_state_dict`` then keeps
them (``Tensor.to`` returns the tensor itself when dtype and device already match).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

from ckptguard.errors import CheckpointError
from ckptguard.format.codec import encode

__all__ = ["optimizer_targets"]

log = logging.getLogger(__name__)


def optimizer_targets(optimizers: Mapping[str, torch.optim.Optimizer]) -> dict[str, torch.Tensor]:
    """Live optimizer tensors keyed as ``capture`` keys them in ``optimizer.safetensors``.

    Only tensors whose dtype, shape and layout match the saved ones are filled in place (the
    reader checks); others are read into fresh memory. Empty when no optimizer has state yet.
    """
    out: dict[str, torch.Tensor] = {}
    if not any(opt.state for opt in optimizers.values()):
        return out
    try:
        for name, opt in optimizers.items():
            encode(opt.state_dict(), out, name, f"optimizer {name!r}")
    except CheckpointError as e:  # state the codec cannot express: read fresh tensors instead
        log.debug("Optimizer state not restored in place: %s", e)
        return {}
    return out
