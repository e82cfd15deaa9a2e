"""Lightning (2.6) with ckptguard's callback and CheckpointIO: real Trainer, CPU, tiny model.

tests/frameworks/lightning_train.py is a user-shaped script (augmentation in two DataLoader
workers, dropout, gradient accumulation, AdamW + a per-step StepLR, save_hyperparameters) resumed
through Lightning's own path, ``trainer.fit(model, ckpt_path="last")``. It is killed with SIGKILL
at seeded random moments (mid-epoch, and inside a save: the script kills itself from the storage
while the save's files are being written), sent SIGTERM inside an accumulation window, and resumed
after its newest checkpoint was corrupted; each time the final weights, optimizer state, LR and
step must equal an uninterrupted run's bit for bit. Loading never unpickles anything.

The same scenarios with Lightning's own ModelCheckpoint (side by side) run under
CKPTGUARD_TEST_FULL=1, as do more kill seeds.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import FULL

pytest.importorskip("lightning")

SCRIPT = Path(__file__).parent / "frameworks" / "lightning_train.py"
TIMEOUT = 300.0
SRC = str(Path(__file__).resolve().parents[1] / "src")

pytestmark = [pytest.mark.xdist_group("lightning")]


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


STEP = re.compile(r"^step (\d+)", re.M)  # a line may run on: the saving thread prints too


def _steps(log: str) -> list[int]:
    return [int(m) for m in STEP.findall(log)]


def _last_step(log: Path) -> int:
    steps = _steps(log.read_text())
    return steps[-1] if steps else 0


def train(run: Path, out: Path, *, kill_after: tuple[int, float] | None = None, **env: str) -> tuple[int, str]:
    """Run the script once (its own process group); ``kill_after=(step, delay)``: SIGKILL it there.

    Returns (exit code, output)."""
    log = run.parent / f"{run.name}-{time.monotonic_ns()}.log"
    with log.open("wb") as f:
        p = subprocess.Popen([sys.executable, str(SCRIPT), str(run), str(out)], stdout=f, stderr=subprocess.STDOUT,
                             env=_env(**env), start_new_session=True)
    deadline = time.monotonic() + TIMEOUT
    if kill_after is not None:
        at, delay = kill_after
        while p.poll() is None and _last_step(log) < at:
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.005)
        time.sleep(delay)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    try:
        code = p.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        pytest.fail(f"{SCRIPT.name} hung:\n{log.read_text()[-3000:]}")
    return code, log.read_text()


def _assert_identical(ref: Path, got: Path, context: Any = "") -> None:
    a = torch.load(ref, weights_only=True)
    b = torch.load(got, weights_only=True)
    assert a["global_step"] == b["global_step"], context
    assert a["lr"] == b["lr"] and a["scheduler_epoch"] == b["scheduler_epoch"], context
    for part in ("model", "optimizer"):
        flat_a = _flat(a[part])
        flat_b = _flat(b[part])
        assert flat_a.keys() == flat_b.keys(), (part, context)
        diff = [k for k in flat_a if not torch.equal(flat_a[k], flat_b[k])]
        assert diff == [], (part, diff, context)


def _flat(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}.{key}").items()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One uninterrupted run (20 optimizer steps, 3 1/3 epochs): (run dir, final state file)."""
    tmp = tmp_path_factory.mktemp("lightning_ref")
    run, out = tmp / "run", tmp / "final.pt"
    code, log = train(run, out)
    assert code == 0, log[-3000:]
    return run, out


def _kill_schedule(seed: int, kills: int) -> list[tuple[str, int, float]]:
    """Seeded, alternating: ("save", k, 0) kills inside the k-th save of that incarnation, and
    ("step", n, delay) kills a random delay after optimizer step n (mid-epoch most of the time)."""
    rng = random.Random(seed)
    return [("save", rng.randint(2, 4) if i == 0 else rng.randint(1, 2), 0.0) if i % 2 == 0
            else ("step", rng.randint(7, 17), rng.uniform(0.0, 0.2)) for i in range(kills)]


SEEDS = [17, 5, 23] if FULL else [17]


@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_mid_epoch_and_inside_a_save_resumes_bit_for_bit(reference: tuple[Path, Path], tmp_path: Path, seed: int) -> None:
    run, out = tmp_path / "run", tmp_path / "final.pt"
    outcomes: list[tuple[str, int, int]] = []
    for kind, at, delay in _kill_schedule(seed, 4 if FULL else 2):
        if kind == "save":
            code, log = train(run, out, LT_KILL_IN_SAVE=str(at))
            if code == -signal.SIGKILL:
                assert "killing myself inside a save" in log
                assert any(n.startswith(".tmp-") for n in os.listdir(run)), "the kill did not land inside a save"
        else:
            code, log = train(run, out, kill_after=(at, delay))
        if code == 0:
            break
        assert code == -signal.SIGKILL, log[-3000:]
        outcomes.append((kind, at, _last_step_of(log)))
    assert outcomes and outcomes[0][0] == "save", outcomes
    code, log = train(run, out)
    assert code == 0, log[-3000:]
    assert "Restored all states from the checkpoint" in log
    assert "not resumable" not in log  # Lightning's mid-epoch warning: the loader is resumable here
    _assert_identical(reference[1], out, outcomes)


def _last_step_of(log: str) -> int:
    steps = _steps(log)
    return steps[-1] if steps else 0


def test_sigterm_inside_an_accumulation_window_saves_at_the_step_boundary_and_exits(
    reference: tuple[Path, Path], tmp_path: Path,
) -> None:
    run, out = tmp_path / "run", tmp_path / "final.pt"
    # batch 15 opens the window of optimizer step 8 (2 batches per step)
    code, log = train(run, out, LT_SIGTERM_AT="15")
    assert code == 128 + signal.SIGTERM, log[-3000:]
    assert "Preemption (signal SIGTERM): saving step 8" in log
    # exited right after the save (the callback saves before the module prints "step 8")
    assert _last_step_of(log) == 7 and "Trainer.fit` stopped" not in log
    manifest = json.loads((run / "step-000000008" / "MANIFEST.json").read_text())
    assert manifest["reason"] == "preemption"
    code, log = train(run, out)
    assert code == 0, log[-3000:]
    assert _first_step_of(log) == 9
    _assert_identical(reference[1], out)


def _first_step_of(log: str) -> int:
    return _steps(log)[0]


def _flip(path: Path, offset: int = -40) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_newest_checkpoint_falls_back_says_so_and_ends_identical(reference: tuple[Path, Path], tmp_path: Path) -> None:
    run, out = tmp_path / "run", tmp_path / "final.pt"
    shutil.copytree(reference[0], run)
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000000018", "step-000000020"]
    _flip(run / "step-000000020" / "model.safetensors")
    (run / "metrics.csv").unlink()  # the resumed run writes its own rows
    code, log = train(run, out, LT_MAX_STEPS="20")
    assert code == 0, log[-3000:]
    assert "step-000000020 is corrupt (model.safetensors); falling back" in log
    assert "Restored step 18" in log
    assert _first_step_of(log) == 19
    _assert_identical(reference[1], out)
    import ckptguard as cg

    assert cg.verify(run).ok  # the corrupt step 20 was replaced by the resumed run's own


# ---- in-process: the plugin, hostile files, hparams, the CLI ---------------------------------


def _module() -> Any:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import lightning_train
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return lightning_train.make_model()


class Payload:
    """Unpickling this creates ``marker``: proof that code ran on load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_loading_never_unpickles_and_lightning_state_round_trips(reference: tuple[Path, Path], tmp_path: Path) -> None:
    from ckptguard.errors import UnsafeCheckpointError
    from ckptguard.integrations.lightning_io import CkptguardCheckpointIO
    from ckptguard.manager.manager import CheckpointManager

    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    marker = tmp_path / "code-ran"
    evil = pickle.dumps(Payload(marker))
    for where in (run / "last.ckpt", run / "step-000000020" / "model.ckpt", run / "step-000000020" / "data.pkl"):
        where.write_bytes(evil)
    torch.save({"state_dict": Payload(marker)}, run / "epoch=0-step=20.ckpt")

    io = CkptguardCheckpointIO(CheckpointManager(run, lock=False))
    io.module = _module()
    ckpt = io.load_checkpoint(str(run))
    assert ckpt["global_step"] == 20 and isinstance(ckpt["epoch"], int)
    assert ckpt["hyper_parameters"] == {"hidden": 32, "lr": 0.01, "betas": (0.9, 0.99)}  # the tuple survives
    assert isinstance(ckpt["optimizer_states"][0]["state"][0]["exp_avg"], torch.Tensor)  # int keys survive
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 20
    assert set(ckpt["loops"]["fit_loop"]["state_dict"]) >= {"combined_loader"}
    assert "CkptguardCallback" in ckpt["callbacks"]
    saved = torch.load(reference[1], weights_only=True)["model"]
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in saved.items())

    for bad in (run / "last.ckpt", run / "epoch=0-step=20.ckpt"):  # Lightning's pickled files: refused
        with pytest.raises(UnsafeCheckpointError, match="never loads"):
            io.load_checkpoint(str(bad))
    # a state.json replaced by a pickle: its checksum fails; the older checkpoint is used
    (run / "step-000000020" / "state.json").write_bytes(evil)
    assert io.load_checkpoint(str(run))["global_step"] == 18
    assert not marker.exists()
    io.manager.close()


def test_cli_ls_verify_doctor_plot_read_the_run(
    reference: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ckptguard.cli import main

    run = reference[0]
    monkeypatch.chdir(SCRIPT.parent)  # doctor's --model lightning_train.py:make_model

    def cli(*args: str) -> tuple[int, str]:
        code = main(list(args))
        return code, capsys.readouterr().out

    code, out = cli("ls", str(run), "--json")
    assert code == 0, out
    listed = json.loads(out)["checkpoints"]
    assert [c["step"] for c in listed] == [18, 20] and all(c["valid"] for c in listed)
    assert [c["status"] for c in listed] == ["verified", "verified"]  # read back, probe re-run: same output
    assert "loss" in listed[0]["metrics"] and "train_loss" in listed[0]["metrics"]
    code, out = cli("verify", str(run))
    assert code == 0 and "sound" in out, out
    code, out = cli("doctor", str(run / "step-000000020"), "--model", "lightning_train.py:make_model", "--json")
    assert code == 0, out
    codes = {f["code"] for f in json.loads(out)["findings"]}
    assert not any(c.startswith(("keys.", "corrupt", "model.")) for c in codes), codes
    (tmp_path / "wider.py").write_text("from lightning_train import Regressor\n\ndef make():\n    return Regressor(hidden=48)\n")
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    code, out = cli("doctor", str(run / "step-000000020"), "--model", f"{tmp_path / 'wider.py'}:make")
    assert code == 1 and "net.0.weight" in out, out  # today's model no longer fits: said before any resume
    code, out = cli("plot", str(run), "-o", str(tmp_path / "loss.png"))
    assert code == 0, out
    assert (tmp_path / "loss.png").stat().st_size > 1000


# ---- side by side: Lightning's own ModelCheckpoint in the same scenarios (FULL) ---------------


def _newest_ckpt_step(run: Path) -> int:
    steps = [int(p.stem.split("step=")[1]) for p in run.glob("epoch=*-step=*.ckpt")]
    return max(steps) if steps else 0


@pytest.mark.skipif(not FULL, reason="side by side with Lightning's own checkpointing: CKPTGUARD_TEST_FULL=1")
def test_side_by_side_lightning_modelcheckpoint(tmp_path: Path) -> None:
    """The same scenarios with Lightning alone (ModelCheckpoint every 3 steps, save_last=True)."""
    plain = {"LT_MODE": "plain"}
    ref_out = tmp_path / "ref.pt"
    code, log = train(tmp_path / "ref", ref_out, **plain)
    assert code == 0, log[-3000:]
    seen: dict[str, Any] = {}

    # SIGKILL mid-epoch: the .ckpt files survive; resume restarts the epoch's data (Lightning warns)
    # and restores no RNG: not bit-exact.
    run = tmp_path / "killed"
    code, _ = train(run, tmp_path / "k.pt", kill_after=(10, 0.0), **plain)
    seen["mid-epoch kill: newest .ckpt step"] = _newest_ckpt_step(run)
    code, log = train(run, tmp_path / "k.pt", **plain)
    assert code == 0, log[-3000:]
    seen["mid-epoch kill: 'not resumable' warning"] = "not resumable" in log
    with pytest.raises(AssertionError):
        _assert_identical(ref_out, tmp_path / "k.pt")

    # SIGKILL inside a save: fsspec's transaction writes a temp file and moves it: no torn .ckpt.
    run = tmp_path / "in-save"
    code, _ = train(run, tmp_path / "s.pt", LT_KILL_IN_SAVE="3", **plain)
    assert code == -signal.SIGKILL
    seen["kill in save: files"] = sorted(p.name for p in run.iterdir())
    code, log = train(run, tmp_path / "s.pt", **plain)
    assert code == 0 and "Restored all states" in log, log[-3000:]
    with pytest.raises(AssertionError):
        _assert_identical(ref_out, tmp_path / "s.pt")

    # SIGTERM inside an accumulation window: Lightning stops after the batch and saves nothing.
    run = tmp_path / "sigterm"
    code, log = train(run, tmp_path / "t.pt", LT_SIGTERM_AT="15", **plain)
    seen["sigterm: exit code"] = code
    seen["sigterm: newest .ckpt step"] = _newest_ckpt_step(run)
    seen["sigterm: last optimizer step run"] = _last_step_of(log)

    # corrupt newest: a flipped byte in last.ckpt's tensor data is loaded silently.
    run = tmp_path / "corrupt"
    code, log = train(run, tmp_path / "c.pt", LT_MAX_STEPS="12", **plain)
    ckpt = run / "last.ckpt"
    with zipfile.ZipFile(ckpt) as z:
        entry = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    offset = entry.header_offset + 30 + len(entry.filename.encode()) + len(entry.extra) + 8
    _flip(ckpt, offset)
    code, log = train(run, tmp_path / "c.pt", **plain)
    seen["corrupt last.ckpt: exit code"] = code
    seen["corrupt last.ckpt: resumed from it"] = "Restored all states from the checkpoint at" in log and "last.ckpt" in log
    print("side by side, Lightning alone:", json.dumps(seen, indent=1))
    assert seen["sigterm: newest .ckpt step"] < 8  # no checkpoint at the step SIGTERM interrupted
    assert seen["corrupt last.ckpt: exit code"] == 0 and seen["corrupt last.ckpt: resumed from it"]


def test_fsspec_url_run_resumes_through_ckpt_path(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An object-store run (memory://): fit, then a new Trainer resumes with ckpt_path=cb.last."""
    import lightning as L
    from torch.utils.data import DataLoader

    import ckptguard as cg
    from ckptguard.integrations.lightning import CkptguardCallback, resumable_loader

    url = f"memory://lightning-{tmp_path.name}"

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            return self.net(batch).pow(2).mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self) -> DataLoader[torch.Tensor]:
            data = torch.arange(40.0).reshape(10, 4) / 40
            return resumable_loader(DataLoader(data, batch_size=2, sampler=cg.ResumableSampler(data, seed=1)))

    def fit(max_steps: int, resume: bool) -> tuple[CkptguardCallback, L.Trainer]:
        cb = CkptguardCallback(url, every_steps=2)
        trainer = L.Trainer(max_steps=max_steps, callbacks=[cb], logger=False, enable_progress_bar=False,
                            enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
        assert (cb.last is not None) == resume
        trainer.fit(Tiny(), ckpt_path=cb.last)
        return cb, trainer

    fit(3, resume=False)  # 5 batches an epoch: stops mid-epoch 0
    with caplog.at_level("INFO"), warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        cb, trainer = fit(7, resume=True)
    assert "Lightning resumes from memory://" in caplog.text and "step-000000003" in caplog.text
    assert not [w for w in warned if "not resumable" in str(w.message)]  # Lightning's mid-epoch warning
    assert trainer.global_step == 7
    assert [c.step for c in cb.manager.checkpoints()] == [2, 3, 4, 6, 7]


def test_loss_guard_rolls_back_a_nan_step_and_training_goes_on(tmp_path: Path) -> None:
    import lightning as L
    from torch.utils.data import DataLoader

    import ckptguard as cg
    from ckptguard.integrations.lightning import CkptguardCallback, resumable_loader

    class Poisoned(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)
            self.poisoned = False

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            loss = self.net(batch).pow(2).mean()
            if self.trainer.global_step == 4 and not self.poisoned:  # the batch of optimizer step 5
                self.poisoned = True
                loss = loss * float("nan")
            return loss

        def configure_optimizers(self) -> Any:
            opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
            sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

        def train_dataloader(self) -> DataLoader[torch.Tensor]:
            data = torch.arange(80.0).reshape(20, 4) / 80
            return resumable_loader(DataLoader(data, batch_size=2, sampler=cg.ResumableSampler(data, seed=1)))

    cb = CkptguardCallback(tmp_path / "run", every_steps=2, loss_guard={"window": 5})
    model = Poisoned()
    trainer = L.Trainer(max_steps=8, callbacks=[cb], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(model, ckpt_path=cb.last)
    assert cb.loss_guard is not None and [(t.step, t.restored_step) for t in cb.loss_guard.trips] == [(5, 4)]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert trainer.global_step == 8
    # the LR schedule went back with the weights: one step behind a run without the bad step (8)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 7
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** (4 + 3))
    steps = [c.step for c in cg.CheckpointManager(tmp_path / "run").checkpoints()]
    assert 5 not in steps and steps[-1] == 8
    manifest = json.loads((tmp_path / "run" / "step-000000008" / "MANIFEST.json").read_text())
    assert manifest["loss_guard"]["trips"][0]["restored_step"] == 4
