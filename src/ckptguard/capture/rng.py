"""Random-number-generator state of python, numpy, torch CPU and every CUDA device, as JSON.

Also the per-sample seeding of DataLoader workers (:func:`seed_sample`): a worker's global
generators are re-seeded before each sample from ``(base seed, epoch, position)``, so what a
sample draws does not depend on what that worker drew before (see ckptguard.capture.sampler).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import random
from typing import Any

import numpy as np
import torch

from ckptguard.errors import CorruptCheckpointError

__all__ = ["capture_rng", "restore_rng", "rng_fingerprint", "sample_key", "seed_sample"]

log = logging.getLogger(__name__)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s, validate=True)), dtype=torch.uint8)


def capture_rng() -> dict[str, Any]:
    """Snapshot every global generator. CUDA generators are included whenever CUDA is usable."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": {"version": version, "state": list(mt), "gauss_next": gauss},
        "numpy": {
            "bit_generator": name,
            "keys": [int(k) for k in keys],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch_cpu": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        out["torch_cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return out


def restore_rng(state: dict[str, Any], where: str = "state.json") -> None:
    """Put every generator back. A device-count change restores the devices both runs have."""
    try:
        py = state["python"]
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"]), py["gauss_next"]))
        npy = state["numpy"]
        np.random.set_state(
            (
                str(npy["bit_generator"]),
                np.asarray(npy["keys"], dtype=np.uint32),
                int(npy["pos"]),
                int(npy["has_gauss"]),
                float(npy["cached_gaussian"]),
            )
        )
        torch.set_rng_state(_unb64(state["torch_cpu"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CorruptCheckpointError(
            f"{where}: the RNG state is malformed ({type(e).__name__}: {e}). The checkpoint is "
            "damaged; restore falls back to an older one."
        ) from e
    cuda = state.get("torch_cuda")
    if cuda and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if n != len(cuda):
            log.warning(
                "Checkpoint holds RNG state for %d CUDA devices, this process sees %d; restoring "
                "the first %d. Resume is exact only with the same device count.",
                len(cuda), n, min(n, len(cuda)),
            )
        for i, s in enumerate(cuda[:n]):
            torch.cuda.set_rng_state(_unb64(s), device=i)
    elif cuda:
        log.warning("Checkpoint holds CUDA RNG state but CUDA is not available; it is not restored.")


def rng_fingerprint() -> str:
    """A short digest of the current generator states (for tests and the demo)."""
    import xxhash

    h = xxhash.xxh3_64()
    h.update(repr(random.getstate()).encode())
    h.update(np.random.get_state()[1].tobytes())  # type: ignore[index]
    h.update(torch.get_rng_state().numpy().tobytes())
    return h.hexdigest()


_SAMPLE_PERSON = b"ckptguard-smpl"


def sample_key(base_seed: int, epoch: int, position: int) -> bytes:
    """16 bytes that depend only on the loader's base seed and a sample's (epoch, position).

    ``position`` is the sample's place in the epoch over all replicas (see ResumableSampler).
    The digest mixes the three numbers, so neighbouring positions get unrelated streams.
    """
    raw = b"".join(int(v).to_bytes(16, "little", signed=True) for v in (base_seed, epoch, position))
    return hashlib.blake2b(raw, digest_size=16, person=_SAMPLE_PERSON).digest()


def seed_sample(base_seed: int, epoch: int, position: int) -> None:
    """Seed python ``random``, numpy's global generator and torch's CPU generator for one sample.

    Runs inside a DataLoader worker before ``dataset[i]``: ``torch.initial_seed()`` then returns
    the sample's torch seed, so a generator the dataset builds from it is keyed the same way.
    CUDA generators are left alone (workers do not use CUDA). About 30 us per call.
    """
    key = sample_key(base_seed, epoch, position)
    random.seed(int.from_bytes(key, "little"))
    np.random.seed(np.frombuffer(key, dtype="<u4"))
    torch.default_generator.manual_seed(int.from_bytes(key[:8], "little"))
