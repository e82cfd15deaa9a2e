"""Performance paths: parallel writes, async saves, in-place restores, reused staging buffers.

No timing assertions here (speed lives in benchmarks/); these check that the fast paths are
correct: same bytes, same tensors, errors surfaced, nothing lost at interpreter exit.
"""

from __future__ import annotations

import errno
import filecmp
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import ckptguard as cg
from ckptguard.errors import AsyncSaveError, CheckpointError
from ckptguard.persist.parallel_io import (
    IOV_MAX,
    ParallelTensorWriter,
    Segment,
    _pieces,
    _segments,
    stream_tensor_file,
    write_segments,
)
from ckptguard.storage import open_storage
from ckptguard.storage.base import Writer

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {f"w{i}": torch.randn(n, generator=g) for i, n in enumerate([3, 100_000, 1_300_001, 7, 4096])}
    out["empty"] = torch.empty(0)
    out["ints"] = torch.arange(11, dtype=torch.int64)
    out["half"] = torch.randn(33, generator=g).half()
    out["transposed"] = torch.randn(30, 40, generator=g).t()  # not contiguous
    out["flags"] = torch.tensor([True, False, True])
    return out


@pytest.mark.parametrize(
    "writer",
    [
        ParallelTensorWriter(),
        ParallelTensorWriter(threads=3, piece_bytes=8192),
        ParallelTensorWriter(direct=True, piece_bytes=1 << 20),
        ParallelTensorWriter(threads=1, direct=True, piece_bytes=4096),
    ],
    ids=["default", "small-pieces", "direct", "direct-1-thread"],
)
def test_parallel_writer_matches_sequential_bytes(tmp_path: Path, writer: ParallelTensorWriter) -> None:
    storage = open_storage(tmp_path)
    tensors = _tensors()
    expected = stream_tensor_file(storage, "seq.safetensors", tensors)
    entry = writer(storage, "par.safetensors", tensors)
    assert entry == expected  # same per-tensor digests, header digest and Merkle root
    assert filecmp.cmp(tmp_path / "seq.safetensors", tmp_path / "par.safetensors", shallow=False)
    loaded = load_file(str(tmp_path / "par.safetensors"))  # the standard safetensors reader
    assert loaded.keys() == tensors.keys()
    for k, t in tensors.items():
        assert torch.equal(loaded[k], t), k


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 20), max_size=12),
    piece=st.integers(1, 8),
    aligned=st.booleans(),
)
def test_pieces_cover_the_stream_exactly(sizes: list[int], piece: int, aligned: bool) -> None:
    data = bytes(range(256)) * 2
    views = [memoryview(data[:n]) for n in sizes]
    pieces = list(_pieces(_segments(b"", views), piece, aligned=aligned))
    flat = [seg for p in pieces for seg in p]
    assert b"".join(bytes(seg.view) for seg in flat) == b"".join(bytes(v) for v in views)
    offset = 0
    for seg in flat:  # contiguous, in file order, nothing empty
        assert seg.offset == offset and len(seg.view)
        offset += len(seg.view)
    for k, p in enumerate(pieces):
        n = sum(len(seg.view) for seg in p)
        if aligned:  # job k is exactly [k * piece, (k + 1) * piece), the last one may be short
            assert p[0].offset == k * piece
            assert n == piece or k == len(pieces) - 1
        assert n <= piece and len(p) <= IOV_MAX


def test_lazy_segments_are_written_while_later_ones_are_produced(tmp_path: Path) -> None:
    """Incremental saves hash chunk k+1 while chunk k is written: the writer must not wait
    for the whole stream."""
    produced: list[int] = []
    produced_when_written: list[int] = []
    blocks = [bytes([i]) * 4096 for i in range(6)]

    def lazy() -> Iterator[Segment]:
        for i, b in enumerate(blocks):
            produced.append(i)
            yield Segment(i * 4096, memoryview(b))

    storage = open_storage(tmp_path)
    w = storage.create("pack")
    size = write_segments(w, lazy(), ParallelTensorWriter(threads=1, piece_bytes=4096, direct=True),
                          after=lambda piece: produced_when_written.append(len(produced)))
    w.close()
    assert size == 6 * 4096
    assert (tmp_path / "pack").read_bytes() == b"".join(blocks)
    assert produced_when_written == [1, 2, 3, 4, 5, 6]  # piece k written before k+1 was produced


def test_refused_o_direct_mid_stream_falls_back_to_buffered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem that accepts O_DIRECT opens but refuses the writes (EINVAL) still gets the
    whole file, including the segments produced before the refusal."""
    real_pwrite = os.pwrite
    calls = {"n": 0}

    def pwrite(fd: int, data: Any, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] >= 3:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    blocks = [bytes([i + 1]) * 5000 for i in range(7)]
    storage = open_storage(tmp_path)
    w = storage.create("f")
    segs = _segments(b"head", (memoryview(b) for b in blocks))
    assert write_segments(w, segs, ParallelTensorWriter(threads=2, piece_bytes=8192, direct=True)) == 4 + 7 * 5000
    w.close()
    assert calls["n"] >= 3
    assert (tmp_path / "f").read_bytes() == b"head" + b"".join(blocks)


def test_parallel_writer_options_are_validated() -> None:
    with pytest.raises(ValueError, match="threads"):
        ParallelTensorWriter(threads=0)
    with pytest.raises(ValueError, match="piece_bytes"):
        ParallelTensorWriter(piece_bytes=1000)


def _model_and_opt(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(5, 16)).sum().backward()
    opt.step()
    return model, opt


def _ptrs(model: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[list[int], list[int]]:
    params = [p.data_ptr() for p in model.parameters()]
    state = [v.data_ptr() for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return params, state


def test_restore_reads_into_existing_parameter_and_optimizer_storage(run_dir: Path, async_save: bool) -> None:
    model, opt = _model_and_opt(0)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = {k: v.clone() for s in opt.state.values() for k, v in s.items()}
    with cg.CheckpointManager(run_dir, async_save=async_save) as mgr:
        mgr.save(1, cg.TrainState(model=model, optimizer=opt), force=True)
    other, other_opt = _model_and_opt(1)  # different values, same shapes, optimizer has state
    before = _ptrs(other, other_opt)
    with cg.CheckpointManager(run_dir) as mgr:
        assert mgr.restore(cg.TrainState(model=other, optimizer=other_opt)) == 1
    assert _ptrs(other, other_opt) == before  # no second copy: same storage, new values
    for k, v in other.state_dict().items():
        assert torch.equal(v, saved_model[k]), k
    got = {k: v for s in other_opt.state.values() for k, v in s.items()}
    assert all(torch.equal(got[k], saved_opt[k]) for k in saved_opt)


def test_restore_into_fresh_optimizer_allocates_state(run_dir: Path) -> None:
    model, opt = _model_and_opt(0)
    with cg.CheckpointManager(run_dir) as mgr:
        mgr.save(1, cg.TrainState(model=model, optimizer=opt), force=True)
    torch.manual_seed(2)
    other = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    other_opt = torch.optim.Adam(other.parameters(), lr=1e-2)
    with cg.CheckpointManager(run_dir) as mgr:
        mgr.restore(cg.TrainState(model=other, optimizer=other_opt))
    assert opt.state_dict()["state"].keys() == other_opt.state_dict()["state"].keys()
    for a, b in zip(opt.state.values(), other_opt.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_staging_buffers_are_reused_across_async_saves(run_dir: Path) -> None:
    model, opt = _model_and_opt(0)
    state = cg.TrainState(model=model, optimizer=opt)
    with cg.CheckpointManager(run_dir, async_save=True) as mgr:
        mgr.save(1, state, force=True)
        first = {k: b.data_ptr() for k, b in mgr.host_buffers.items()}
        model(torch.randn(5, 16)).sum().backward()
        opt.step()
        mgr.save(2, state, force=True)
        second = {k: b.data_ptr() for k, b in mgr.host_buffers.items()}
        mgr.wait()
    assert first and first == second
    # the second checkpoint holds the second state, not stale buffer contents
    restored, restored_opt = _model_and_opt(3)
    with cg.CheckpointManager(run_dir) as mgr:
        mgr.restore(cg.TrainState(model=restored, optimizer=restored_opt), step=2)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))


def test_first_async_save_uses_buffers_prepared_by_an_earlier_call(run_dir: Path) -> None:
    """A save() that is not due allocates the host buffers in the background; the first real
    save copies into exactly those buffers (no allocation on the training thread)."""
    model, opt = _model_and_opt(0)
    model(torch.randn(5, 16)).sum().backward()
    opt.step()  # Adam's moments exist: the optimizer's tensors are prepared too
    state = cg.TrainState(model=model, optimizer=opt)
    with cg.CheckpointManager(run_dir, async_save=True, every_steps=3) as mgr:
        assert not mgr.host_buffers
        assert mgr.save(1, state) is False
        prepared = {k: b.data_ptr() for k, b in mgr.host_buffers.items()}
        n_opt = sum(1 for f, _ in prepared if f.startswith("optim"))
        assert n_opt >= 2 * len(list(model.parameters()))  # at least exp_avg and exp_avg_sq of each
        assert all(not b.any() for b in mgr.host_buffers.values())  # touched (zero-filled)
        assert mgr.save(2, state) is False  # prepared once only
        assert mgr.save(3, state) is True
        staged = {k: b.data_ptr() for k, b in mgr.host_buffers.items()}
        mgr.wait()
    assert prepared == staged
    restored, restored_opt = _model_and_opt(3)
    with cg.CheckpointManager(run_dir) as mgr:
        assert mgr.restore(cg.TrainState(model=restored, optimizer=restored_opt)) == 3
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))


def test_async_manifest_records_blocked_and_waited_seconds(run_dir: Path) -> None:
    model, opt = _model_and_opt(0)
    state = cg.TrainState(model=model, optimizer=opt)
    with cg.CheckpointManager(run_dir, async_save=True) as mgr:
        mgr.save(1, state, force=True)
        mgr.save(2, state, force=True)  # waits for step 1 when it is still in flight
        assert mgr.last_waited_seconds is not None and mgr.last_waited_seconds >= 0
    for step in (1, 2):
        manifest = json.loads((run_dir / f"step-{step:09d}" / "MANIFEST.json").read_text())
        assert manifest["blocked_seconds"] >= 0 and manifest["waited_seconds"] >= 0


class _FailingStorage:
    """Local storage whose tensor-file creation fails after ``ok`` files (a real OSError path)."""

    def __init__(self, root: Path, ok: int) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self._inner = open_storage(root)
        self._ok = ok

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def create(self, path: str) -> Writer:
        if path.endswith(".safetensors"):
            if self._ok <= 0:
                raise OSError(28, "No space left on device (injected)")
            self._ok -= 1
        return self._inner.create(path)


@pytest.mark.parametrize("surface", ["save", "wait", "close"])
def test_async_error_surfaces_on_next_call(tmp_path: Path, surface: str) -> None:
    model, opt = _model_and_opt(0)
    state = cg.TrainState(model=model, optimizer=opt)
    storage = _FailingStorage(tmp_path / "run", ok=0)
    mgr = cg.CheckpointManager(storage, async_save=True)  # type: ignore[arg-type]
    mgr.save(1, state, force=True)  # returns at once; the background write fails
    with pytest.raises(AsyncSaveError, match="No space left"):
        if surface == "save":
            while mgr.pending:  # let it finish so the next save sees the error
                time.sleep(0.01)
            mgr.save(2, state, force=True)
        elif surface == "wait":
            mgr.wait()
        else:
            mgr.close()
    mgr.close()
    assert not any(p.name.startswith("step-") for p in (tmp_path / "run").iterdir())
    assert isinstance(AsyncSaveError("x"), CheckpointError)


EXIT_SCRIPT = r"""
import sys, torch, ckptguard as cg
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])
opt = torch.optim.Adam(model.parameters())
model(torch.randn(4, 512)).sum().backward()
opt.step()
mgr = cg.CheckpointManager(sys.argv[1], async_save=True)
mgr.save(7, cg.TrainState(model=model, optimizer=opt), force=True)
torch.save(model.state_dict(), sys.argv[2])
# exit at once: no wait(), no close(); the pending save must still be committed
"""


def test_async_save_is_committed_at_interpreter_exit(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", EXIT_SCRIPT, str(run), str(tmp_path / "ref.pt")],
        check=False, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = cg.verify(str(run / "step-000000007"))
    assert report.ok, report.problems
    ref = torch.load(tmp_path / "ref.pt", weights_only=True)
    model = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(8)])
    with cg.CheckpointManager(run) as mgr:
        assert mgr.restore(cg.TrainState(model=model), strict=False) == 7
    assert all(torch.equal(ref[k], v) for k, v in model.state_dict().items())
