"""Incremental (content-addressed) checkpoints: the fine-tune disk target, exact restores after
pruning, shared-chunk corruption reported for every user, object stores, exact resume."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ckptguard as cg
from ckptguard.persist.incremental import OBJECTS, chunk_refs
from ckptguard.report.sizes import run_sizes
from ckptguard.run.catalog import scan
from ckptguard.storage import open_storage
from trainlib import run_training, same_weights

WIDTH = 1024
BODY_LAYERS = 8  # 8 x (1024*1024 + 1024) float32 = 33.6 MB: the "frozen 34 MB body"


class FineTuneNet(nn.Module):
    def __init__(self, width: int = WIDTH) -> None:
        super().__init__()
        self.body = nn.Sequential(*[nn.Linear(width, width) for _ in range(BODY_LAYERS)])
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def body_bytes(model: FineTuneNet) -> int:
    return sum(p.numel() * p.element_size() for p in model.body.parameters())


def make_finetune(seed: int = 0, width: int = WIDTH) -> tuple[FineTuneNet, torch.optim.Optimizer, cg.TrainState]:
    torch.manual_seed(seed)
    model = FineTuneNet(width)
    model.body.requires_grad_(False)
    opt = torch.optim.AdamW(model.head.parameters(), lr=1e-2)
    return model, opt, cg.TrainState(model=model, optimizer=opt, extra={"phase": "finetune"})


def finetune(run: Any, saves: int, *, async_save: bool, width: int = WIDTH, **mgr_kw: Any) -> dict[int, dict[str, torch.Tensor]]:
    """Train the head for ``saves`` checkpoints; return the model weights saved at each step."""
    model, opt, state = make_finetune(width=width)
    g = torch.Generator().manual_seed(1)
    saved = {}
    with cg.CheckpointManager(run, every_steps=1, async_save=async_save, incremental=True, **mgr_kw) as mgr:
        for step in range(1, saves + 1):
            x = torch.randn(16, width, generator=g)
            loss = nn.functional.cross_entropy(model(x), torch.arange(16) % 4)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if mgr.save(step, state, metrics={"loss": loss.item()}):
                saved[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return saved


def restore_into_fresh(run: Any, step: int, width: int = WIDTH, **mgr_kw: Any) -> dict[str, torch.Tensor]:
    model, _, state = make_finetune(seed=99, width=width)  # different init: the restore must overwrite all
    with cg.CheckpointManager(run, incremental=True, lock=False, **mgr_kw) as mgr:
        assert mgr.restore(state, step=step) == step
    return model.state_dict()


def test_finetune_ten_checkpoints_cost_about_one_body(run_dir: Path, async_save: bool) -> None:
    saved = finetune(run_dir, 10, async_save=async_save)
    assert len(saved) == 10
    storage = open_storage(run_dir)
    ckpts = scan(storage)
    sizes = run_sizes(storage, ckpts)
    body = body_bytes(FineTuneNet())
    assert body > 33_000_000
    assert sizes.physical <= 1.3 * body, (sizes.physical, body)
    assert sizes.logical >= 10 * body  # each checkpoint still describes the whole model
    # the first checkpoint carries the body; every later one adds only the head and its optimizer
    per = [sizes.checkpoints[c.name].physical for c in ckpts]
    assert per[0] > body and max(per[1:]) < 0.01 * body
    assert all(c.manifest["files"]["model.safetensors"]["kind"] == "chunked" for c in ckpts)
    for step, weights in saved.items():
        assert same_weights(restore_into_fresh(run_dir, step), weights), step


def test_prune_then_restore_every_kept_checkpoint(run_dir: Path) -> None:
    retention = cg.Retention(keep_last=2, keep_every=3)
    saved = finetune(run_dir, 8, async_save=False, retention=retention)
    storage = open_storage(run_dir)
    kept = [c.step for c in scan(storage)]
    assert kept == [3, 6, 7, 8]
    # packs of pruned checkpoints are gone: every pack on storage is referenced
    referenced = {p for c in scan(storage) for _, _, p, _ in chunk_refs(c.manifest)}
    assert set(storage.listdir(OBJECTS)) == referenced
    for step in kept:
        assert same_weights(restore_into_fresh(run_dir, step), saved[step]), step


def _flip_byte_in_shared_chunk(run_dir: Path) -> tuple[str, str]:
    ckpts = scan(open_storage(run_dir))
    info = ckpts[0].manifest["files"]["model.safetensors"]["tensors"]["body.3.weight"]
    chunk = info["chunks"][0]
    path = run_dir / OBJECTS / chunk["pack"]
    with open(path, "r+b") as f:
        f.seek(chunk["offset"] + 1000)
        b = f.read(1)
        f.seek(chunk["offset"] + 1000)
        f.write(bytes([b[0] ^ 0x40]))
    return chunk["pack"], chunk["digest"]


def test_corrupt_shared_chunk_is_reported_for_every_checkpoint(run_dir: Path) -> None:
    finetune(run_dir, 3, async_save=False)
    pack, digest = _flip_byte_in_shared_chunk(run_dir)
    report = cg.verify(run_dir)
    assert not report.ok
    assert [c.ok for c in report.checkpoints] == [False, False, False]
    for c in report.checkpoints:
        assert any(pack in p.message and digest in p.message and "body.3.weight" in p.message for p in c.problems)
    _model, _, state = make_finetune()
    with cg.CheckpointManager(run_dir, incremental=True) as mgr:
        with pytest.raises(cg.CorruptCheckpointError) as ei:
            mgr.restore(state)
    # every checkpoint was tried and each failure names the shared object
    assert str(ei.value).count(pack) == 3 and "3 checkpoint(s), none restorable" in str(ei.value)


def test_corrupt_chunk_is_never_reused_by_later_saves(run_dir: Path) -> None:
    finetune(run_dir, 2, async_save=False)
    _flip_byte_in_shared_chunk(run_dir)
    model, _opt, state = make_finetune()
    with cg.CheckpointManager(run_dir, incremental=True) as mgr:
        with pytest.raises(cg.CorruptCheckpointError):
            mgr.restore(state)  # marks both corrupt
        mgr.save(100, state, force=True)
    with cg.CheckpointManager(run_dir, incremental=True, lock=False) as mgr:
        fresh_model, _, fresh = make_finetune(seed=5)
        assert mgr.restore(fresh) == 100
    assert same_weights(fresh_model.state_dict(), model.state_dict())


OBJECT_STORE_WIDTH = 256  # a 2 MB body: the checks below are relative to it, and less goes through the server


@pytest.mark.parametrize("store", ["memory", "s3"])
def test_object_store(store: str, async_save: bool, request: pytest.FixtureRequest) -> None:
    """Deduplication, GC of unreferenced packs and bit-exact restores on fsspec storage: an
    in-memory store and a real S3-protocol server (moto on 127.0.0.1)."""
    width = OBJECT_STORE_WIDTH
    if store == "s3":
        url = request.getfixturevalue("s3_url")
    else:
        url = f"memory://ckptguard-incr-{uuid.uuid4().hex[:8]}/run"
    saved = finetune(url, 4, async_save=async_save, width=width, retention=cg.Retention(keep_last=2))
    storage = open_storage(url)
    kept = [c.step for c in scan(storage)]
    assert kept == [3, 4]
    referenced = {p for c in scan(storage) for _, _, p, _ in chunk_refs(c.manifest)}
    assert set(storage.listdir(OBJECTS)) == referenced
    assert run_sizes(storage, scan(storage)).physical < 1.3 * body_bytes(FineTuneNet(width))
    for step in kept:
        assert same_weights(restore_into_fresh(url, step, width), saved[step])
    assert cg.verify(url).ok


def test_exact_resume_with_incremental_saves(tmp_path: Path, async_save: bool) -> None:
    """Promise 1 holds with incremental saves: stop, resume, bit-identical final weights."""
    ref = run_training(tmp_path / "ref", 30, every_steps=5)
    kw = {"async_save": async_save, "manager_kwargs": {"incremental": True}}
    run_training(tmp_path / "run", 30, stop_at=17, **kw)
    resumed = run_training(tmp_path / "run", 30, **kw)
    assert same_weights(ref, resumed)
    manifest = json.loads((tmp_path / "run" / "step-000000030" / "MANIFEST.json").read_text())
    assert {e["kind"] for e in manifest["files"].values()} == {"chunked", "blob"}
    assert not list((tmp_path / "run" / "step-000000030").glob("*.safetensors"))


def test_large_tensor_is_split_into_chunks(run_dir: Path) -> None:
    from ckptguard.persist.incremental import IncrementalSave, build_index
    from ckptguard.persist.reader import READERS

    storage = open_storage(run_dir)
    storage.makedirs("ck")
    t = torch.arange(10_000, dtype=torch.float32)
    small = torch.ones(3, dtype=torch.int64)
    entry = IncrementalSave(build_index([]), chunk_bytes=4096)(storage, "ck/m.safetensors", {"t": t, "s": small})
    assert len(entry["tensors"]["t"]["chunks"]) == 10 and "xxh3_128" not in entry["tensors"]["t"]
    assert len(entry["tensors"]["s"]["chunks"]) == 1
    from ckptguard.format.manifest import FILE_KIND_VALIDATORS

    FILE_KIND_VALIDATORS["chunked"](entry, "x", "m.safetensors")
    out = READERS["chunked"](storage, "ck", "m.safetensors", entry)
    assert torch.equal(out["t"], t) and torch.equal(out["s"], small)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: e["packs"].update({"../../etc/passwd": 1}),
        lambda e: next(iter(e["tensors"].values()))["chunks"][0].update(pack="../x.pack"),
        lambda e: next(iter(e["tensors"].values()))["chunks"][0].update(size=10**9),
        lambda e: next(iter(e["tensors"].values()))["chunks"].pop(),
    ],
    ids=["pack-path", "chunk-pack-path", "chunk-beyond-pack", "missing-chunk"],
)
def test_hostile_chunked_entries_are_refused(run_dir: Path, mutate: Any) -> None:
    from ckptguard.format.manifest import FILE_KIND_VALIDATORS
    from ckptguard.persist.incremental import IncrementalSave, build_index

    storage = open_storage(run_dir)
    storage.makedirs("ck")
    entry = IncrementalSave(build_index([]))(storage, "ck/m.safetensors", {"w": torch.ones(4)})
    mutate(entry)
    with pytest.raises(cg.CorruptCheckpointError):
        FILE_KIND_VALIDATORS["chunked"](entry, "x", "m.safetensors")
