"""``ckptguard export CKPT --object NAME``: a user object's tensors (an EMA, an SWA copy) as a plain model file.

A real training loop keeps an EMA of its model (torch's ``AveragedModel`` and a hand-written EMA
class), registers it in the TrainState, saves; the exported file loads into a fresh model and
equals the EMA's weights. Every ending of the command is pinned (exit code and message).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import ckptguard as cg
from test_cli_endings import run_cli
from trainlib import Net, make_setup, train_step


class ShadowEMA:
    """The EMA people write by hand: a decay, an update counter and a shadow copy of the weights."""

    def __init__(self, model: nn.Module, decay: float = 0.9) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        for k, v in model.state_dict().items():
            self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.decay, self.updates = sd["decay"], sd["updates"]
        self.shadow = {k: v.clone() for k, v in sd["shadow"].items()}


def _train_with_emas(run: Any, steps: int = 12, **manager_kwargs: Any) -> dict[str, Any]:
    """A real loop: train, update both EMAs, save every 4 steps with the EMAs in the TrainState."""
    s = make_setup()
    swa = AveragedModel(s["model"], multi_avg_fn=get_ema_multi_avg_fn(0.9))
    shadow = ShadowEMA(s["model"])
    state = cg.TrainState(model=s["model"], optimizer=s["opt"], scheduler=s["sched"], dataloader=s["loader"],
                          ema=swa, shadow=shadow, counter=_Counter())
    with cg.CheckpointManager(run, every_steps=4, **manager_kwargs) as mgr:
        step = 0
        while step < steps:
            for xb, yb in s["loader"]:
                loss = train_step(s, xb, yb)
                swa.update_parameters(s["model"])
                shadow.update(s["model"])
                step += 1
                mgr.save(step, state, metrics={"loss": loss})
                if step >= steps:
                    break
    return {"swa": swa, "shadow": shadow, "model": s["model"]}


class _Counter:
    """A Stateful object without tensors."""

    def state_dict(self) -> dict[str, Any]:
        return {"n": 3}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        pass


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    run = tmp_path_factory.mktemp("export_object") / "run"
    return run, _train_with_emas(run)


def test_averaged_model_ema_exports_and_loads_into_a_fresh_model(
    trained: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, live = trained
    out = tmp_path / "ema.safetensors"
    code, stdout, _ = run_cli(capsys, "export", run / "step-000000012", "--object", "ema", "-o", out)
    assert code == 0 and "exported object 'ema' of step 12" in stdout
    loaded = load_file(str(out))
    assert loaded.keys() == live["swa"].state_dict().keys()  # keys as the object's state_dict
    fresh = AveragedModel(Net(), multi_avg_fn=get_ema_multi_avg_fn(0.9))
    fresh.load_state_dict(loaded)
    for k, v in live["swa"].state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    # the averaged weights are not the model's: an EMA lags behind
    assert not torch.equal(loaded["module.head.weight"], live["model"].state_dict()["head.weight"])
    assert not [p for p in tmp_path.iterdir() if p.name != "ema.safetensors"]  # no temp file left
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ckptguard.object"] == "ema" and meta["ckptguard.step"] == "12"


def test_hand_written_ema_nested_keys_and_metadata(
    trained: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, live = trained
    out = tmp_path / "shadow.safetensors"
    code, stdout, _ = run_cli(capsys, "export", run, "--object", "shadow", "-o", out, "--json")  # a run: its newest
    assert code == 0
    assert json.loads(stdout)["object"] == "shadow" and json.loads(stdout)["step"] == 12
    loaded = load_file(str(out))
    assert set(loaded) == {f"shadow.{k}" for k in live["shadow"].shadow}
    fresh = Net()
    fresh.load_state_dict({k.removeprefix("shadow."): v for k, v in loaded.items()})
    for k, v in live["shadow"].shadow.items():
        assert torch.equal(fresh.state_dict()[k], v), k
    with safe_open(str(out), "pt") as f:
        state = json.loads(f.metadata()["ckptguard.object_state_json"])
    assert state["decay"] == 0.9 and state["updates"] == 12  # the non-tensor entries travel along


def test_every_ending(trained: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = trained
    ckpt = run / "step-000000012"
    out = tmp_path / "ema.safetensors"
    out.write_bytes(b"precious")
    code, _, err = run_cli(capsys, "export", ckpt, "--object", "ema", "-o", out)
    assert code == 2 and "already exists; pass --force" in err
    assert out.read_bytes() == b"precious"
    code, _, _ = run_cli(capsys, "export", ckpt, "--object", "ema", "-o", out, "--force")
    assert code == 0 and "module.head.weight" in load_file(str(out))

    code, _, err = run_cli(capsys, "export", ckpt, "--object", "emma", "-o", tmp_path / "x.safetensors")
    assert code == 2
    assert "holds no object 'emma' (objects saved: counter, ema, shadow)" in err and str(ckpt) in err
    code, _, err = run_cli(capsys, "export", ckpt, "--object", "counter", "-o", tmp_path / "x.safetensors")
    assert code == 2
    assert "the object 'counter' holds no tensors" in err and "(objects with tensors: ema, shadow)" in err
    code, _, err = run_cli(capsys, "export", ckpt, "--object", "ema", "--full", "-o", tmp_path / "x.safetensors")
    assert code == 2 and "either --object NAME or --full" in err
    assert not (tmp_path / "x.safetensors").exists()

    code, _, err = run_cli(capsys, "export", tmp_path / "nope", "--object", "ema", "-o", tmp_path / "x.safetensors")
    assert code == 2 and "does not exist" in err


def test_a_run_without_objects_and_a_damaged_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = tmp_path / "plain"
    m = nn.Linear(3, 2)
    with cg.CheckpointManager(plain) as mgr:
        mgr.save(1, cg.TrainState(model=m), force=True)
    code, _, err = run_cli(capsys, "export", plain, "--object", "ema", "-o", tmp_path / "x.safetensors")
    assert code == 2 and "holds no object 'ema' (objects saved: none" in err

    damaged = tmp_path / "damaged"
    ema = AveragedModel(m)
    with cg.CheckpointManager(damaged) as mgr:
        mgr.save(1, cg.TrainState(model=m, ema=ema), force=True)
    f = damaged / "step-000000001" / "state.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    code, _, err = run_cli(capsys, "export", damaged / "step-000000001", "--object", "ema", "-o", tmp_path / "x.safetensors")
    assert code == 2 and "it is damaged" in err and "Nothing was written" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_a_sharded_checkpoint_is_refused_with_the_next_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = Path(__file__).parent / "fixtures" / "fsdp-legacy-run" / "step-000000002"  # a committed FSDP2/DCP checkpoint
    code, _, err = run_cli(capsys, "export", ckpt, "--object", "ema", "-o", tmp_path / "x.safetensors")
    assert code == 2
    assert "holds sharded (FSDP2/DCP) state: --object is not supported for sharded checkpoints yet" in err
    assert "mgr.restore(state, step=2)" in err and not (tmp_path / "x.safetensors").exists()


def test_object_export_from_an_incremental_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    live = _train_with_emas(run, steps=8, incremental=True)
    out = tmp_path / "ema.safetensors"
    code, _, _ = run_cli(capsys, "export", run, "--object", "ema", "-o", out)
    assert code == 0
    loaded = load_file(str(out))
    assert loaded.keys() == live["swa"].state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in live["swa"].state_dict().items())


def test_object_export_from_s3(s3_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    live = _train_with_emas(s3_url, steps=4)
    out = tmp_path / "ema.safetensors"
    code, stdout, _ = run_cli(capsys, "export", f"{s3_url}/step-000000004", "--object", "ema", "-o", out)
    assert code == 0 and "s3://" in stdout
    loaded = load_file(str(out))
    assert all(torch.equal(loaded[k], v) for k, v in live["swa"].state_dict().items())
