"""Checkpoints use canonical keys: DDP and torch.compile wrappers round-trip with plain models."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import ckptguard as cg
from ckptguard.capture.state import canonical_key, unwrap_model


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.fixture(scope="module")
def one_rank_group() -> Iterator[None]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _save(path: Path, model: nn.Module) -> None:
    with cg.CheckpointManager(path) as mgr:
        mgr.save(1, cg.TrainState(model=model), force=True)


def _load(path: Path, model: nn.Module) -> None:
    with cg.CheckpointManager(path) as mgr:
        assert mgr.restore(cg.TrainState(model=model)) == 1


def _keys(path: Path) -> set[str]:
    from safetensors.torch import load_file

    return set(load_file(str(path / "step-000000001" / "model.safetensors")))


def test_compiled_model_saves_canonical_keys_and_restores_into_plain(tmp_path: Path) -> None:
    compiled = torch.compile(_net(1))
    _save(tmp_path / "a", compiled)
    assert _keys(tmp_path / "a") == {"0.weight", "0.bias", "2.weight", "2.bias"}
    plain = _net(2)
    _load(tmp_path / "a", plain)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), _net(1).state_dict().values()))
    back = torch.compile(_net(3))
    _save(tmp_path / "b", plain)
    _load(tmp_path / "b", back)
    assert torch.equal(back._orig_mod[0].weight, _net(1)[0].weight)


def test_nested_compiled_submodule_key(tmp_path: Path) -> None:
    outer = nn.Sequential(torch.compile(nn.Linear(2, 2)))
    assert canonical_key("0._orig_mod.weight") == "0.weight"
    _save(tmp_path / "a", outer)
    assert _keys(tmp_path / "a") == {"0.weight", "0.bias"}
    plain = nn.Sequential(nn.Linear(2, 2))
    _load(tmp_path / "a", plain)
    assert torch.equal(plain[0].weight, outer[0]._orig_mod.weight)


def test_ddp_wrapped_roundtrip(tmp_path: Path, one_rank_group: None) -> None:
    ddp = nn.parallel.DistributedDataParallel(_net(4))
    assert unwrap_model(ddp) is ddp.module
    _save(tmp_path / "a", ddp)
    assert _keys(tmp_path / "a") == {"0.weight", "0.bias", "2.weight", "2.bias"}
    plain = _net(5)
    _load(tmp_path / "a", plain)
    assert torch.equal(plain[2].bias, _net(4)[2].bias)
    ddp2 = nn.parallel.DistributedDataParallel(_net(6))
    _save(tmp_path / "b", plain)
    _load(tmp_path / "b", ddp2)
    assert torch.equal(ddp2.module[0].weight, _net(4)[0].weight)
