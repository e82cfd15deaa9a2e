"""The rot zoo: each planted kind of checkpoint rot is flagged by ``doctor`` and, where it applies,
by ``restore``; unchanged code gives no finding at all.

A real training run saves checkpoints (with a probe) from the model defined in a factory module
written to a temporary directory; each case then asks the doctor (as a CLI subprocess or in
Python) and ``restore`` about a variant of the factory: the code as it might look weeks later.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

import ckptguard as cg
from ckptguard.verification.doctor import DoctorReport, build_current, doctor

FACTORY = '''
import torch
from torch import nn
import ckptguard as cg


class Scale(nn.Module):
    """Input preprocessing (a tokenizer / normaliser stand-in): holds no saved state."""

    def __init__(self, factor):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return x * self.factor


class Net(nn.Module):
    def __init__(self, hidden=16, act="relu", head_name="head", factor=1.0):
        super().__init__()
        self.pre = Scale(factor)
        self.body = nn.Sequential(nn.Linear(8, hidden), nn.ReLU() if act == "relu" else nn.GELU())
        self.head_name = head_name
        setattr(self, head_name, nn.Linear(hidden, 3))

    def forward(self, x):
        return getattr(self, self.head_name)(self.body(self.pre(x)))


def build(hidden=16, act="relu", head_name="head", factor=1.0, lr=1e-2, wd=0.0, t_max=40,
          freeze_body=False, all_params=False, capture_rng=True):
    torch.manual_seed(0)
    model = Net(hidden, act, head_name, factor)
    if freeze_body:
        for p in model.body.parameters():
            p.requires_grad_(False)
    params = list(model.parameters()) if all_params else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max)
    return cg.TrainState(model=model, optimizer=opt, scheduler=sched, capture_rng=capture_rng,
                         config={"lr": lr, "hidden": hidden})


def base():            return build()
def renamed():         return build(head_name="classifier")
def reshaped():        return build(hidden=24)
def activation():      return build(act="gelu")
def preprocessing():   return build(factor=2.0)
def hyperparams():     return build(lr=2e-2, wd=0.1)
def scheduler():       return build(t_max=20)
def no_rng():          return build(capture_rng=False)
def staged():          return build(freeze_body=True)                    # optimizer holds the head only
def staged_all():      return build(freeze_body=True, all_params=True)  # optimizer holds all, body frozen
def model_only():      return Net()
'''

PROBE = torch.linspace(-2, 2, 16 * 8).reshape(16, 8)


def train(state: cg.TrainState, run: Path, steps: int = 10) -> None:
    mgr = cg.CheckpointManager(run, every_steps=5, probe=PROBE)
    g = torch.Generator().manual_seed(1)
    model, opt, sched = state.model, state.optimizer, state.scheduler
    assert model is not None and opt is not None
    for step in range(1, steps + 1):
        x, y = torch.randn(8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        mgr.save(step, state, metrics={"loss": float(loss.detach())})
    mgr.close()


class Zoo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.factory = root / "factories.py"
        self.factory.write_text(FACTORY)
        self.runs: dict[str, Path] = {}

    def state(self, name: str) -> cg.TrainState:
        return build_current(f"{self.factory}:{name}")

    def run(self, variant: str = "base") -> Path:
        """A trained run for the factory ``variant`` (trained once per module)."""
        if variant not in self.runs:
            run = self.root / f"run-{variant}"
            train(self.state(variant), run)
            self.runs[variant] = run
        return self.runs[variant]

    def ckpt(self, variant: str = "base") -> Path:
        return self.run(variant) / "step-000000010"

    def doctor(self, factory: str, variant: str = "base") -> DoctorReport:
        return doctor(self.ckpt(variant), self.state(factory))

    def main(self, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
        """The CLI in this process (cheaper than a subprocess: torch is imported already)."""
        from ckptguard.cli import main

        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        src = str(Path(cg.__file__).resolve().parents[1])  # this tree's code, whatever the cwd
        env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
        return subprocess.run([sys.executable, "-m", "ckptguard.cli", *args], check=False, cwd=self.root,
                              capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zoo]:
    root = tmp_path_factory.mktemp("zoo")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # not a git work tree: the environment is the same at save and doctor time
        yield Zoo(root)


def restore(zoo: Zoo, factory: str, variant: str = "base", strict: bool = True) -> tuple[cg.TrainState, cg.CheckpointManager, int | None]:
    state = zoo.state(factory)
    mgr = cg.CheckpointManager(zoo.run(variant), lock=False)
    step = mgr.restore(state, strict=strict)
    mgr.close()
    return state, mgr, step


def codes(report: DoctorReport, severity: str | None = None) -> set[str]:
    return {f.code for f in report.findings if severity is None or f.severity == severity}


# ---- the zoo -------------------------------------------------------------------------------------


def test_unchanged_code_no_findings_and_clean_resume(zoo: Zoo, capsys: pytest.CaptureFixture[str]) -> None:
    report = zoo.doctor("base")
    assert report.findings == (), [f.to_json() for f in report.findings]
    code, out, err = zoo.main(capsys, "doctor", str(zoo.ckpt()), "--model", f"{zoo.factory}:base")
    assert code == 0, out + err
    assert "no findings" in out
    _, mgr, step = restore(zoo, "base")
    assert step == 10 and mgr.last_restore_report.clean and not mgr.last_restore_report.notes
    assert all(c.status == "verified" for c in mgr.checkpoints())


def test_renamed_layer(zoo: Zoo) -> None:
    res = zoo.cli("doctor", str(zoo.ckpt()), "--model", f"{zoo.factory}:renamed", "--json")
    assert res.returncode == 1, res.stderr
    out = json.loads(res.stdout)
    found = {f["code"]: f for f in out["findings"]}
    assert {"keys.missing", "keys.unexpected", "keys.renamed"} <= set(found)
    assert "head.weight -> classifier.weight" in found["keys.renamed"]["details"]
    with pytest.raises(cg.StateMismatchError, match=r"likely rename: 'head.weight' -> 'classifier.weight'"):
        restore(zoo, "renamed")
    state, mgr, step = restore(zoo, "renamed", strict=False)
    assert step == 10 and ("head.bias", "classifier.bias") in mgr.last_restore_report.renames
    saved = zoo.state("base")
    restore_into(zoo, saved)
    assert torch.equal(state.model.body[0].weight, saved.model.body[0].weight)  # what matches loaded


def test_changed_shape(zoo: Zoo) -> None:
    report = zoo.doctor("reshaped")
    assert "keys.reshaped" in codes(report, "error") and not report.ok
    assert any("body.0.weight: checkpoint (16, 8), model (24, 8)" in d for f in report.findings for d in f.details)
    with pytest.raises(cg.StateMismatchError, match=r"shape of 'body.0.weight': checkpoint has \(16, 8\), model has \(24, 8\)"):
        restore(zoo, "reshaped")


def test_changed_activation_is_behaviour_drift(zoo: Zoo) -> None:
    res = zoo.cli("doctor", str(zoo.ckpt()), "--model", f"{zoo.factory}:activation")
    assert res.returncode == 1, res.stdout + res.stderr
    assert "behaviour.drift" in res.stdout and "loads cleanly, runs differently" in res.stdout
    # strict key matching cannot see it: the restore is clean
    _, mgr, step = restore(zoo, "activation")
    assert step == 10 and mgr.last_restore_report.clean


def test_changed_preprocessing_in_factory(zoo: Zoo) -> None:
    report = zoo.doctor("preprocessing")
    assert codes(report) == {"behaviour.drift"}
    assert report.errors[0].severity == "error"


def test_newly_unfrozen_parameters(zoo: Zoo) -> None:
    report = zoo.doctor("base", variant="staged")  # trained with the body frozen, resumed with all
    cold = [f for f in report.findings if f.code == "optimizer.cold_params"]
    assert cold and cold[0].severity == "error"
    assert set(cold[0].details) == {"body.0.weight", "body.0.bias"}
    with pytest.raises(cg.StateMismatchError, match="strict=False"):
        restore(zoo, "base", variant="staged")
    state, mgr, step = restore(zoo, "base", variant="staged", strict=False)
    assert step == 10 and sorted(mgr.last_restore_report.cold) == ["body.0.bias", "body.0.weight"]
    opt = state.optimizer
    body_w, head_w = state.model.body[0].weight, state.model.head.weight
    assert opt.state.get(body_w, {}) == {}  # cold
    saved = zoo.state("staged")
    restore_into(zoo, saved, "staged")
    assert torch.equal(opt.state[head_w]["exp_avg"], saved.optimizer.state[saved.model.head.weight]["exp_avg"])  # warm


def restore_into(zoo: Zoo, state: cg.TrainState, variant: str = "base") -> None:
    mgr = cg.CheckpointManager(zoo.run(variant), lock=False)
    mgr.restore(state)
    mgr.close()


def test_unfrozen_but_held_by_optimizer_is_reported_cold(zoo: Zoo) -> None:
    report = zoo.doctor("base", variant="staged_all")  # optimizer held the frozen body: no state
    cold = [f for f in report.findings if f.code == "optimizer.cold_params"]
    assert cold and cold[0].severity == "warning" and "body.0.weight" in cold[0].details
    _, mgr, _ = restore(zoo, "base", variant="staged_all")
    assert "body.0.weight" in mgr.last_restore_report.cold


def test_changed_optimizer_hyperparameters(zoo: Zoo) -> None:
    report = zoo.doctor("hyperparams")
    hp = next(f for f in report.findings if f.code == "optimizer.hparams")
    assert hp.severity == "warning"
    assert "group 0 weight_decay: checkpoint 0.0, current code 0.1" in hp.details
    assert "group 0 initial_lr: checkpoint 0.01, current code 0.02" in hp.details
    state, _, _ = restore(zoo, "hyperparams")
    assert state.optimizer.param_groups[0]["weight_decay"] == 0.0  # the silent override warned of


def test_changed_scheduler(zoo: Zoo, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = zoo.main(capsys, "doctor", str(zoo.ckpt()), "--model", f"{zoo.factory}:scheduler", "--json")
    assert code == 0, err  # warnings only
    f = next(f for f in json.loads(out)["findings"] if f["code"] == "scheduler.changed")
    assert "T_max: checkpoint 40, current code 20" in f["details"]
    lr_line = next(d for d in f["details"] if d.startswith("LR at the saved step 10"))
    then, now = (0.01 * (1 + math.cos(math.pi * 10 / t)) / 2 for t in (40, 20))
    assert f"checkpoint [{then:.6g}], current code [{now:.6g}]" in lr_line, lr_line
    state, _, _ = restore(zoo, "scheduler")
    assert state.scheduler.T_max == 40  # the checkpoint's schedule silently wins


def test_dropped_rng(zoo: Zoo) -> None:
    report = zoo.doctor("base", variant="no_rng")
    assert codes(report) == {"rng.missing"}
    _, mgr, _ = restore(zoo, "base", variant="no_rng")
    assert any("no RNG state" in n for n in mgr.last_restore_report.notes)


def test_corrupted_bytes(zoo: Zoo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(zoo.run(), run)
    path = run / "step-000000010" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40
    path.write_bytes(bytes(data))
    code, out, err = zoo.main(capsys, "doctor", str(run / "step-000000010"), "--model", f"{zoo.factory}:base")
    assert code == 1 and "storage.corrupt" in out, out + err
    state = zoo.state("base")
    mgr = cg.CheckpointManager(run, lock=False)
    assert mgr.restore(state) == 5  # falls back past the corrupt one
    mgr.close()


def test_environment_drift(zoo: Zoo) -> None:
    from ckptguard.capture.environment import collect_environment

    env = collect_environment()
    env["torch"] = "9.9.9"
    env["git"] = {"commit": "0" * 40, "dirty": False, "changed_files": []}
    report = doctor(zoo.ckpt(), zoo.state("base"), environment=env)
    assert codes(report) == {"env.torch"}  # no git at save time: only the version is comparable
    manifest = json.loads((zoo.ckpt() / "MANIFEST.json").read_text())
    manifest_env = {**manifest["environment"], "git": {"commit": "1" * 40, "dirty": True, "changed_files": ["train.py"]}}
    from ckptguard.verification.doctor import check_environment

    found = {f.code: f for f in check_environment({**manifest, "environment": manifest_env}, env)}
    assert {"env.git", "env.git_dirty", "env.torch"} <= set(found) and found["env.git_dirty"].details == ("train.py",)


def test_model_only_factory_and_bad_input(zoo: Zoo, capsys: pytest.CaptureFixture[str]) -> None:
    report = zoo.doctor("model_only")
    assert report.ok and "optimizer.cold_params" not in codes(report)
    res = zoo.cli("doctor", str(zoo.ckpt()), "--model", f"{zoo.factory}:nope")
    assert res.returncode == 2 and "no callable 'nope'" in res.stderr
    code, _, err = zoo.main(capsys, "doctor", str(zoo.root / "missing"), "--model", f"{zoo.factory}:base")
    assert code == 2 and "does not exist" in err
