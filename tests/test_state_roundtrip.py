"""Every kind of state goes through a checkpoint and comes back equal."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import ckptguard as cg
from ckptguard.capture.rng import rng_fingerprint


def _roundtrip(tmp: Path, make_state, step: int = 3, *, mutate=None) -> tuple[cg.TrainState, cg.TrainState]:
    saved = make_state()
    with cg.CheckpointManager(tmp / "run") as mgr:
        mgr.save(step, saved, force=True)
    fresh = make_state()
    if mutate:
        mutate(fresh)
    with cg.CheckpointManager(tmp / "run") as mgr:
        assert mgr.restore(fresh) == step
    return saved, fresh


def _trained_optimizer(cls: type, **kw: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    opt = cls(m.parameters(), **kw)
    for _ in range(3):
        m(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return m, opt


@pytest.mark.parametrize(
    "cls,kw",
    [
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
        (torch.optim.Adam, {"lr": 1e-3, "amsgrad": True}),
        (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.1}),
        (torch.optim.RMSprop, {"lr": 1e-3, "centered": True}),
        (torch.optim.Adagrad, {"lr": 1e-2}),
        (torch.optim.Adamax, {"lr": 1e-2}),
        (torch.optim.NAdam, {"lr": 1e-2}),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_optimizer_roundtrip(tmp_path: Path, cls: type, kw: dict[str, Any]) -> None:
    def make() -> cg.TrainState:
        m, opt = _trained_optimizer(cls, **kw)
        return cg.TrainState(model=m, optimizer=opt)

    saved, fresh = _roundtrip(tmp_path, make, mutate=lambda s: s.optimizer.state.clear())
    a, b = saved.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for k, st in a["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, b["state"][k][name]), name
            else:
                assert v == b["state"][k][name]


def _sched_state(kind: str) -> cg.TrainState:
    torch.manual_seed(0)
    m = nn.Linear(2, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
    S = torch.optim.lr_scheduler
    if kind == "sequential":
        sched = S.SequentialLR(opt, [S.LinearLR(opt, 0.1, total_iters=3), S.ExponentialLR(opt, 0.9)], milestones=[3])
    elif kind == "chained":
        sched = S.ChainedScheduler([S.ConstantLR(opt, 0.5, total_iters=4), S.ExponentialLR(opt, 0.95)])
    elif kind == "onecycle":
        sched = S.OneCycleLR(opt, max_lr=1.0, total_steps=20)
    elif kind == "plateau":
        sched = S.ReduceLROnPlateau(opt, patience=1)
    else:
        sched = S.LambdaLR(opt, _halving)
    for _ in range(5):
        opt.step()
        sched.step(1.0) if kind == "plateau" else sched.step()
    return cg.TrainState(model=m, optimizer=opt, scheduler=sched)


def _halving(epoch: int) -> float:
    return 0.5 ** (epoch // 2)


@pytest.mark.parametrize("kind", ["sequential", "chained", "onecycle", "plateau", "lambda-function"])
def test_scheduler_roundtrip_then_continues_identically(tmp_path: Path, kind: str) -> None:
    saved = _sched_state(kind)
    with cg.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(5, saved, force=True)
    fresh = _sched_state(kind)
    # perturb the fresh one so that a no-op restore would be caught
    for g in fresh.optimizer.param_groups:
        g["lr"] = 123.0
    with cg.CheckpointManager(tmp_path / "run") as mgr:
        mgr.restore(fresh)
    for st in (saved, fresh):
        st.optimizer.step()
        st.scheduler.step(1.0) if kind == "plateau" else st.scheduler.step()
    assert [g["lr"] for g in saved.optimizer.param_groups] == [g["lr"] for g in fresh.optimizer.param_groups]


class _Holder:
    def __init__(self) -> None:
        self.fn = lambda e: 1.0

    def __call__(self, epoch: int) -> float:
        return self.fn(epoch)


def test_scheduler_holding_a_lambda_gets_a_clear_error(tmp_path: Path) -> None:
    m = nn.Linear(2, 2)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _Holder())
    with cg.CheckpointManager(tmp_path / "run") as mgr:
        with pytest.raises(cg.UnsupportedStateError, match="holds a function.*never code"):
            mgr.save(1, cg.TrainState(model=m, optimizer=opt, scheduler=sched), force=True)
        assert mgr.checkpoints() == []
        # the failed save did not break the manager: a state without the lambda still saves
        assert mgr.save(2, cg.TrainState(model=m, optimizer=opt), force=True)


def test_grad_scaler_roundtrip(tmp_path: Path) -> None:
    def make() -> cg.TrainState:
        sc = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=3)
        m = nn.Linear(2, 1)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        return cg.TrainState(model=m, optimizer=opt, scaler=sc)

    saved = make()
    for _ in range(4):
        saved.scaler.scale(saved.model(torch.ones(1, 2)).sum()).backward()
        saved.scaler.step(saved.optimizer)
        saved.scaler.update()
    with cg.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(4, saved, force=True)
    fresh = make()
    with cg.CheckpointManager(tmp_path / "run") as mgr:
        mgr.restore(fresh)
    assert fresh.scaler.state_dict() == saved.scaler.state_dict()
    assert fresh.scaler.get_scale() == 2048.0


def test_rng_of_python_numpy_torch_roundtrip(tmp_path: Path) -> None:
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.rand(), torch.rand(3)
    st = cg.TrainState(model=nn.Linear(1, 1))
    with cg.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(1, st, force=True)
    before = rng_fingerprint()
    expect = (random.random(), float(np.random.rand()), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    with cg.CheckpointManager(tmp_path / "run") as mgr:
        mgr.restore(st)
    assert rng_fingerprint() == before
    got = (random.random(), float(np.random.rand()), torch.rand(2))
    assert got[0] == expect[0] and got[1] == expect[1] and torch.equal(got[2], expect[2])


class Ema:
    """A user object with tensors and plain values in its state."""

    def __init__(self) -> None:
        self.shadow = {"w": torch.zeros(3), "b": torch.zeros(1, dtype=torch.float64)}
        self.decay = 0.99
        self.updates = 0

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": self.shadow, "decay": self.decay, "updates": self.updates, "tags": ("a", 1), "bad": float("nan")}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.shadow, self.decay, self.updates = sd["shadow"], sd["decay"], sd["updates"]
        self.loaded = sd


@dataclasses.dataclass
class Cfg:
    lr: float = 3e-4
    layers: int = 4
    name: str = "exp"


def test_user_objects_extra_and_config(tmp_path: Path) -> None:
    def make() -> cg.TrainState:
        return cg.TrainState(model=nn.Linear(3, 1), config=Cfg(), extra={"epoch": 0, "best": None}, ema=Ema())

    saved = make()
    saved.objects["ema"].shadow["w"] += 1.5
    saved.objects["ema"].updates = 7
    saved.extra.update(epoch=4, best=0.25, history=[1, 2, {"x": [3.5]}])
    with cg.CheckpointManager(tmp_path / "run") as mgr:
        mgr.save(9, saved, force=True)
    fresh = make()
    extra_ref = fresh.extra
    with cg.CheckpointManager(tmp_path / "run") as mgr:
        mgr.restore(fresh)
    ema = fresh.objects["ema"]
    assert torch.equal(ema.shadow["w"], torch.full((3,), 1.5)) and ema.shadow["b"].dtype == torch.float64
    assert ema.updates == 7 and ema.loaded["tags"] == ("a", 1) and ema.loaded["bad"] != ema.loaded["bad"]
    assert fresh.extra is extra_ref and fresh.extra == {"epoch": 4, "best": 0.25, "history": [1, 2, {"x": [3.5]}]}
    ckpt = tmp_path / "run" / "step-000000009"
    assert yaml.safe_load((ckpt / "config.yaml").read_text()) == {"layers": 4, "lr": 3e-4, "name": "exp"}
    m = cg.CheckpointManager(tmp_path / "run", lock=False).latest()
    assert m is not None and m.manifest is not None and m.manifest["config_hash"].startswith("sha256:")


def test_object_without_state_dict_is_refused() -> None:
    with pytest.raises(cg.UnsupportedStateError, match="state_dict"):
        cg.TrainState(thing=object())  # type: ignore[arg-type]


def test_two_named_optimizers(tmp_path: Path) -> None:
    def make() -> cg.TrainState:
        g, d = _trained_optimizer(torch.optim.Adam, lr=1e-3)
        h, e = _trained_optimizer(torch.optim.SGD, lr=0.1, momentum=0.5)
        model = nn.ModuleDict({"g": g, "d": h})
        return cg.TrainState(model=model, optimizer={"gen": d, "disc": e})

    saved, fresh = _roundtrip(tmp_path, make, mutate=lambda s: [o.state.clear() for o in s.optimizers.values()])
    for name in ("gen", "disc"):
        a, b = saved.optimizers[name].state_dict()["state"], fresh.optimizers[name].state_dict()["state"]
        assert a.keys() == b.keys()
        for k in a:
            for n, v in a[k].items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(b[k][n]))
