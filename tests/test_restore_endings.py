"""Every way ``CheckpointManager.restore`` can end, each with its result and the key words of its
message pinned.

Endings: a step (possibly after falling back past corrupt checkpoints, with a warning); ``None``
only for a run with no committed checkpoint (no directory, empty, only debris);
NoValidCheckpointError when checkpoints exist and none can be used (every call); StateMismatchError
for today's code not taking the saved state (user ``load_state_dict`` errors, strict mismatches of
keys, shapes, optimizer class, param groups, dropped state, scheduler class), with nothing marked;
CheckpointNotFoundError for an explicit step that is not there; FormatVersionError for a newer
format whose manifest checks out. Plus: a checkpoint vanishing mid-restore (a pruning writer), a
lock held by another writer, hostile manifests.

The objects are shaped like users' own: an EMA class of their own, LambdaLR over
functools.partial, SequentialLR warm-up, progressive unfreezing.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ckptguard as cg
from ckptguard.cli import main as cli_main
from ckptguard.errors import FormatVersionError, NoValidCheckpointError, StateMismatchError
from ckptguard.format.manifest import encode_manifest
from ckptguard.persist.writer import clean_debris, delete_checkpoint
from ckptguard.run.catalog import find_debris, find_unknown, read_status, scan
from ckptguard.storage import LocalStorage
from conftest import FULL

S = "step-{:09d}".format


# ---- a user's training script, in miniature ------------------------------------------------------


class Net(nn.Module):
    def __init__(self, hidden: int = 16, head: str = "head", out: int = 2) -> None:
        super().__init__()
        self.body = nn.Linear(4, hidden)
        self.head_name = head
        setattr(self, head, nn.Linear(hidden, out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.head_name)(torch.relu(self.body(x)))


class EMA:
    """The user's own exponential moving average of the weights (not a torch object)."""

    def __init__(self, model: nn.Module, decay: float = 0.9) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            self.shadow[k].mul_(self.decay).add_(v.detach(), alpha=1 - self.decay)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        missing = set(self.shadow) - set(sd["shadow"])
        if missing:  # the way users write it: the first missing key
            raise KeyError(sorted(missing)[0])
        self.decay = sd["decay"]
        self.shadow = {k: v.clone() for k, v in sd["shadow"].items()}


class RenamedEMA(EMA):
    """The same EMA after a refactor renamed its state key 'decay' -> 'beta'."""

    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.decay, "shadow": self.shadow}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.decay = sd["beta"]
        self.shadow = dict(sd["shadow"])


def warmup(step: int, total: int) -> float:
    return min(1.0, (step + 1) / total)


def make(kind: str = "lambda", *, head: str = "head", out: int = 2, ema: type[EMA] = EMA, opt: str = "adamw", seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = Net(head=head, out=out)
    if opt == "adamw":
        optim: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    elif opt == "sgd":
        optim = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    elif opt == "two-groups":
        optim = torch.optim.AdamW([
            {"params": model.body.parameters(), "lr": 1e-3},
            {"params": getattr(model, head).parameters(), "lr": 1e-2},
        ])
    elif opt == "head-only":  # progressive unfreezing: the body is frozen again
        for p in model.body.parameters():
            p.requires_grad_(False)
        optim = torch.optim.AdamW(getattr(model, head).parameters(), lr=1e-2)
    else:
        raise AssertionError(opt)
    if kind == "lambda":
        sched: Any = torch.optim.lr_scheduler.LambdaLR(optim, functools.partial(warmup, total=5))
    elif kind == "step":
        sched = torch.optim.lr_scheduler.StepLR(optim, step_size=3, gamma=0.5)
    elif kind == "sequential":
        sched = torch.optim.lr_scheduler.SequentialLR(optim, [
            torch.optim.lr_scheduler.LinearLR(optim, start_factor=0.1, total_iters=2),
            torch.optim.lr_scheduler.StepLR(optim, step_size=3, gamma=0.5),
        ], milestones=[2])
    elif kind == "chained":
        sched = torch.optim.lr_scheduler.ChainedScheduler([
            torch.optim.lr_scheduler.StepLR(optim, step_size=3, gamma=0.5),
            torch.optim.lr_scheduler.ExponentialLR(optim, gamma=0.99),
        ])
    else:
        raise AssertionError(kind)
    e = ema(model)
    state = cg.TrainState(model=model, optimizer=optim, scheduler=sched, config={"lr": 1e-2}, extra={"epoch": 0}, ema=e)
    return {"model": model, "opt": optim, "sched": sched, "ema": e, "state": state}


def train(s: dict[str, Any], run: Path, steps: list[int], *, seed: int = 1) -> dict[int, dict[str, torch.Tensor]]:
    """Train, saving at each of ``steps``; return the model weights saved at each."""
    g = torch.Generator().manual_seed(seed)
    saved = {}
    with cg.CheckpointManager(run) as mgr:
        for step in range(1, max(steps) + 1):
            x = torch.randn(8, 4, generator=g)
            loss = s["model"](x).pow(2).mean()
            s["opt"].zero_grad()
            loss.backward()
            s["opt"].step()
            s["sched"].step()
            s["ema"].update(s["model"])
            if step in steps:
                mgr.save(step, s["state"], force=True)
                saved[step] = {k: v.clone() for k, v in s["model"].state_dict().items()}
    return saved


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A run with checkpoints at steps 2 and 4 (LambdaLR over functools.partial, user EMA)."""
    run = tmp_path_factory.mktemp("base") / "run"
    s = make()
    saved = train(s, run, [2, 4])
    return {"run": run, "saved": saved, "ema": {k: v.clone() for k, v in s["ema"].shadow.items()}, "lr": s["opt"].param_groups[0]["lr"]}


@pytest.fixture()
def run(base: dict[str, Any], tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base["run"], out)
    return out


def flip(path: Path, offset: int = -3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def statuses(run: Path) -> dict[str, Any]:
    store = LocalStorage(run)
    return {c.name: read_status(store, c.name) for c in scan(store)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def restore(run: Path, s: dict[str, Any], **kw: Any) -> int | None:
    with cg.CheckpointManager(run, lock=False) as mgr:
        return mgr.restore(s["state"], **kw)


# ---- None: the run has no committed checkpoint -------------------------------------------------


def test_no_run_directory_is_a_fresh_run(tmp_path: Path) -> None:
    assert restore(tmp_path / "never-created", make()) is None


def test_empty_run_is_a_fresh_run(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    assert restore(tmp_path / "run", make()) is None


def test_only_debris_is_a_fresh_run_and_debris_stays_for_the_next_save(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / ".tmp-step-000000003-1234abcd").mkdir(parents=True)
    (run / ".tmp-step-000000003-1234abcd" / "model.safetensors").write_bytes(b"partial")
    (run / ".trash-step-000000001-feedf00d").mkdir()
    (run / S(5)).mkdir()
    (run / S(5) / "UNCOMMITTED").write_bytes(b"save\n")  # an object-store save killed mid-way
    (run / S(5) / "model.safetensors").write_bytes(b"partial")
    s = make()
    before = s["model"].state_dict()["body.weight"].clone()
    assert restore(run, s) is None
    assert torch.equal(s["model"].state_dict()["body.weight"], before)  # untouched
    assert sorted(find_debris(LocalStorage(run))) == [".tmp-step-000000003-1234abcd", ".trash-step-000000001-feedf00d", S(5)]
    assert find_unknown(LocalStorage(run)) == []


# ---- corrupt: fall back, or raise NoValidCheckpointError every time -----------------------------


def test_some_corrupt_falls_back_with_a_warning_and_marks_only_the_damaged(run: Path, base: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    flip(run / S(4) / "model.safetensors")
    s = make(seed=5)
    with caplog.at_level(logging.WARNING, logger="ckptguard"):
        assert restore(run, s) == 2
    assert same(s["model"].state_dict(), base["saved"][2])
    text = caplog.text
    assert f"Checkpoint {run / S(4)} is corrupt (model.safetensors); falling back" in text
    assert "Restored step 2" in text and "after skipping 1 checkpoint(s)" in text
    marks = statuses(run)
    assert marks[S(2)] is None and marks[S(4)]["status"] == "corrupt"
    assert "model.safetensors" in marks[S(4)]["detail"]


def test_all_corrupt_raises_every_time_then_verify_clears_after_repair(run: Path, tmp_path: Path) -> None:
    backup = tmp_path / "backup"
    shutil.copytree(run, backup)
    for step in (2, 4):
        flip(run / S(step) / "model.safetensors")
    for attempt in range(2):  # an auto-restart loop: the second call must not start from zero
        with pytest.raises(NoValidCheckpointError) as ei:
            restore(run, make(seed=5))
        err = ei.value
        assert isinstance(err, cg.CorruptCheckpointError)  # old except clauses still work
        msg = str(err)
        assert msg.startswith(f"No usable checkpoint in {run}: 2 checkpoint(s), none restorable:")
        assert [p for p, _ in err.failures] == [str(run / S(4)), str(run / S(2))]
        if attempt == 0:
            assert all("does not match" in why for _, why in err.failures), msg
        else:
            assert all(why.startswith("marked corrupt: ") and "'ckptguard verify" in why for _, why in err.failures), msg
        assert f"Run 'ckptguard verify {run}' for details." in msg
    # verify agrees with ls, and after the files are repaired it clears the marks
    assert not cg.verify(run).ok
    assert [c.status for c in scan(LocalStorage(run))] == ["corrupt", "corrupt"]
    for step in (2, 4):
        shutil.copy(backup / S(step) / "model.safetensors", run / S(step) / "model.safetensors")
    report = cg.verify(run)
    assert report.ok and report.cleared == (S(2), S(4))
    assert [(c.status, c.valid) for c in scan(LocalStorage(run))] == [("unverified", True)] * 2
    assert restore(run, make(seed=5)) == 4


def test_verify_marks_what_ls_did_not_know_and_cli_agrees(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flip(run / S(4) / "optimizer.safetensors")  # same size: ls cannot see it without hashing
    assert [c.valid for c in scan(LocalStorage(run))] == [True, True]
    assert cli_main(["verify", str(run), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["marked"] == [S(4)] and out["cleared"] == []
    assert [(c.step, c.status, c.valid) for c in scan(LocalStorage(run))] == [(2, "unverified", True), (4, "corrupt", False)]
    assert cli_main(["ls", str(run), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [c["status"] for c in listed["checkpoints"]] == ["unverified", "corrupt"]


def test_a_stale_mark_on_a_sound_checkpoint_is_listed_then_cleared_by_verify(run: Path) -> None:
    """The mark an older ckptguard wrote after an error in user code: reported, and clearable."""
    for step in (2, 4):
        (run / S(step) / "STATUS.json").write_text(json.dumps({"status": "corrupt", "detail": "state.json does not describe a state"}))
    with pytest.raises(NoValidCheckpointError) as ei:
        restore(run, make(seed=5))
    assert "marked corrupt: state.json does not describe a state" in str(ei.value)
    report = cg.verify(run)
    assert report.ok and report.cleared == (S(2), S(4))
    assert not (run / S(4) / "STATUS.json").exists()
    assert restore(run, make(seed=5)) == 4


# ---- errors of the user's code and code changes: StateMismatchError, nothing marked ---------------


def _assert_untouched(run: Path) -> None:
    assert statuses(run) == {S(2): None, S(4): None}
    assert [c.valid for c in scan(LocalStorage(run))] == [True, True]
    assert cg.verify(run).ok


def test_user_load_state_dict_error_raises_chained_and_marks_nothing(run: Path) -> None:
    for _ in range(2):
        with pytest.raises(StateMismatchError) as ei:
            restore(run, make(ema=RenamedEMA, seed=5))
        msg = str(ei.value)
        assert msg.startswith(f"{run / S(4)}: TrainState(ema=...) (RenamedEMA).load_state_dict raised KeyError: 'beta' (key 'beta')")
        assert "the checkpoint holds keys ['decay', 'shadow']" in msg and "nothing was marked" in msg
        assert isinstance(ei.value.__cause__, KeyError) and ei.value.__cause__.args == ("beta",)
    _assert_untouched(run)
    # retention and prune of the CLI keep them all: nothing is "not valid"
    assert cli_main(["prune", str(run), "--keep-last", "2"]) == 0
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("step-")) == [S(2), S(4)]


def test_strict_false_after_a_renamed_layer_raises_the_users_ema_error(run: Path) -> None:
    s = make(head="classifier", seed=5)
    with pytest.raises(StateMismatchError) as ei:
        restore(run, s, strict=False)
    msg = str(ei.value)
    assert "TrainState(ema=...) (EMA).load_state_dict raised KeyError: 'classifier.bias'" in msg
    assert "strict=False" not in msg  # the caller already passed it
    assert isinstance(ei.value.__cause__, KeyError)
    _assert_untouched(run)


@pytest.mark.parametrize("kind", ["sequential", "chained", "step"])
def test_scheduler_class_changed_strict_refuses_and_nonstrict_leaves_it(run: Path, base: dict[str, Any], kind: str) -> None:
    s = make(kind, seed=5)
    cls = type(s["sched"]).__name__
    with pytest.raises(StateMismatchError) as ei:
        restore(run, s)
    msg = str(ei.value)
    assert f"the scheduler ({cls}): the checkpoint holds a LambdaLR state; not loaded" in msg
    assert "restore(state, strict=False) to load what fits" in msg and "dtype" not in msg
    assert torch.equal(s["model"].body.weight, make(kind, seed=5)["model"].body.weight)  # nothing loaded
    _assert_untouched(run)
    s = make(kind, seed=5)
    fresh = repr(s["sched"].state_dict())
    with cg.CheckpointManager(run, lock=False) as mgr:
        assert mgr.restore(s["state"], strict=False) == 4
        assert any("holds a LambdaLR state" in r for r in mgr.last_restore_report.refused)
    assert same(s["model"].state_dict(), base["saved"][4])
    assert repr(s["sched"].state_dict()) == fresh  # left as constructed
    _assert_untouched(run)


def test_lambdalr_over_partial_and_user_ema_restore_exactly(run: Path, base: dict[str, Any]) -> None:
    s = make(seed=5)
    assert restore(run, s) == 4
    assert same(s["model"].state_dict(), base["saved"][4])
    assert same(s["ema"].shadow, base["ema"]) and s["ema"].decay == 0.9
    assert s["sched"].last_epoch == 4 and s["opt"].param_groups[0]["lr"] == base["lr"]


def test_strict_key_and_shape_mismatch(run: Path) -> None:
    with pytest.raises(StateMismatchError) as ei:
        restore(run, make(out=3, seed=5))
    msg = str(ei.value)
    assert msg.startswith(f"{run / S(4)} does not fit the objects being restored (strict restore):")
    assert "shape of 'head.weight': checkpoint has (2, 16), model has (3, 16)" in msg
    assert "shape of 'head.bias': checkpoint has (2,), model has (3,)" in msg
    with pytest.raises(StateMismatchError) as ei:
        restore(run, make(head="classifier", seed=5))
    msg = str(ei.value)
    assert "missing from the checkpoint (in the model now): classifier.bias, classifier.weight" in msg
    assert "likely rename: 'head.weight' -> 'classifier.weight'" in msg
    _assert_untouched(run)


# ---- optimizer strictness (issue 12 item 7) -----------------------------------------------------


def test_optimizer_class_mismatch(run: Path, base: dict[str, Any]) -> None:
    s = make(opt="sgd", seed=5)
    with pytest.raises(StateMismatchError) as ei:
        restore(run, s)
    assert "optimizer: the checkpoint holds AdamW state, the optimizer is SGD; not loaded" in str(ei.value)
    s = make(opt="sgd", seed=5)
    with cg.CheckpointManager(run, lock=False) as mgr:
        assert mgr.restore(s["state"], strict=False) == 4
        assert any("holds AdamW state, the optimizer is SGD" in r for r in mgr.last_restore_report.refused)
    assert same(s["model"].state_dict(), base["saved"][4])
    assert s["opt"].state_dict()["state"] == {} and s["opt"].param_groups[0]["momentum"] == 0.9
    s["model"](torch.randn(2, 4)).sum().backward()
    s["opt"].step()  # no KeyError: 'momentum'
    _assert_untouched(run)


def test_one_group_checkpoint_into_two_group_optimizer(run: Path, base: dict[str, Any]) -> None:
    s = make(opt="two-groups", seed=5)
    with pytest.raises(StateMismatchError) as ei:
        restore(run, s)
    msg = str(ei.value)
    lrs = [g["lr"] for g in s["opt"].param_groups]  # the warm-up's first factor (1/5) applied
    assert f"optimizer param groups: the checkpoint has 1 (lr=0.01 for 4 params), the optimizer has 2 (lr={lrs[0]} for 2 params, lr={lrs[1]} for 2 params)" in msg
    assert "optimizer param groups [0, 1] all map to saved group 0 (lr=0.01): loading would overwrite each one's hyper-parameters" in msg
    s = make(opt="two-groups", seed=5)
    with cg.CheckpointManager(run, lock=False) as mgr:
        assert mgr.restore(s["state"], strict=False) == 4
        refused = mgr.last_restore_report.refused
    assert any("the checkpoint has 1" in r for r in refused)
    assert [g["lr"] for g in s["opt"].param_groups] == lrs  # neither overwritten
    assert same(s["model"].state_dict(), base["saved"][4])
    saved_state = s["opt"].state_dict()["state"]
    assert len(saved_state) == 4 and all(int(v["step"]) == 4 for v in saved_state.values())  # the moments fit


def test_progressive_unfreezing_boundary_dropped_state(tmp_path: Path) -> None:
    run = tmp_path / "run"
    s = make(opt="two-groups")
    train(s, run, [3])
    head_state = {k: v.clone() for k, v in s["opt"].state_dict()["state"][2].items()}
    s2 = make(opt="head-only", seed=5)
    with pytest.raises(StateMismatchError) as ei:
        restore(run, s2)
    msg = str(ei.value)
    assert "optimizer: the checkpoint holds state for 2 parameter(s) the optimizer does not hold: ['body.weight', 'body.bias']" in msg
    saved_lr = s["opt"].param_groups[0]["lr"]
    assert f"optimizer: saved param group 0 (lr={saved_lr}, 2 params) has no counterpart in the optimizer" in msg
    assert "dtype" not in msg
    s2 = make(opt="head-only", seed=5)
    with cg.CheckpointManager(run, lock=False) as mgr:
        assert mgr.restore(s2["state"], strict=False) == 3
    got = s2["opt"].state_dict()["state"][0]
    assert all(torch.equal(got[k], head_state[k]) for k in head_state)
    assert s2["opt"].param_groups[0]["lr"] == s["opt"].param_groups[1]["lr"]  # the head's own group
    assert statuses(run) == {S(3): None}


def test_newly_trainable_parameters_are_named_not_called_dtype(tmp_path: Path) -> None:
    run = tmp_path / "run"
    s = make(opt="head-only")
    train(s, run, [2])
    s2 = make(seed=5)  # everything trainable now
    with pytest.raises(StateMismatchError) as ei:
        restore(run, s2)
    msg = str(ei.value)
    assert "optimizer: no saved state for newly trainable parameters ['body.weight', 'body.bias']" in msg
    assert "dtype" not in msg and "restore(state, strict=False) to load what fits" in msg
    with cg.CheckpointManager(run, lock=False) as mgr:
        assert mgr.restore(make(seed=5)["state"], strict=False) == 2
        assert "strict=False" not in mgr.last_restore_report.table()


# ---- explicit step, format version, hostile manifests -------------------------------------------


def test_explicit_step_missing_or_corrupt(run: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(cg.CheckpointNotFoundError) as ei:
        restore(run, make(seed=5), step=3)
    assert str(ei.value) == f"No checkpoint for step 3 in {run} (steps available: 2, 4). Run 'ckptguard ls' to list them."
    flip(run / S(2) / "state.json")
    with caplog.at_level(logging.WARNING, logger="ckptguard"), pytest.raises(NoValidCheckpointError) as ei2:
        restore(run, make(seed=5), step=2)  # no fallback to another step
    assert f"Checkpoint {run / S(2)} is corrupt (state.json); not restoring it (you asked for this step)." in caplog.text
    assert "falling back" not in caplog.text
    assert ei2.value.failures[0][0] == str(run / S(2)) and "state.json does not match its checksum" in ei2.value.failures[0][1]
    assert statuses(run)[S(2)]["status"] == "corrupt"


def _rewrite_manifest(path: Path, **fields: Any) -> None:
    m = json.loads(path.read_text())
    m.update(fields)
    path.write_bytes(encode_manifest(m))


def test_newer_format_with_a_valid_checksum_asks_for_an_upgrade(run: Path) -> None:
    _rewrite_manifest(run / S(4) / "MANIFEST.json", format_version=2)
    with pytest.raises(FormatVersionError) as ei:
        restore(run, make(seed=5))
    assert "written in checkpoint format version 2; this ckptguard reads up to version 1. Upgrade ckptguard" in str(ei.value)
    assert statuses(run)[S(4)] is None


@pytest.mark.parametrize("bit", range(8))
def test_a_flipped_bit_in_format_version_is_corruption_not_upgrade(run: Path, bit: int, caplog: pytest.LogCaptureFixture) -> None:
    path = run / S(4) / "MANIFEST.json"
    raw = bytearray(path.read_bytes())
    at = raw.index(b'"format_version": 1') + len(b'"format_version": ')
    raw[at] ^= 1 << bit
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="ckptguard"):
        assert restore(run, make(seed=5)) == 2
    assert "Upgrade ckptguard" not in caplog.text
    problems = [p.message for p in cg.verify(run / S(4)).problems]
    assert len(problems) == 1 and "Upgrade" not in problems[0]
    assert "malformed manifest" in problems[0] or "does not match its own checksum" in problems[0]
    if chr(raw[at]).isdigit() and int(chr(raw[at])) > 1:
        assert f"It declares format version {chr(raw[at])}" in problems[0]


def test_hostile_manifest_and_hostile_state_fall_back(run: Path, caplog: pytest.LogCaptureFixture) -> None:
    m = json.loads((run / S(4) / "MANIFEST.json").read_text())
    m["files"]["../../etc/passwd"] = m["files"].pop("config.yaml")
    (run / S(4) / "MANIFEST.json").write_bytes(encode_manifest(m))
    with caplog.at_level(logging.WARNING, logger="ckptguard"):
        assert restore(run, make(seed=5)) == 2
    assert "refusing file path '../../etc/passwd'" in caplog.text
    # a state.json whose checksum is consistent but whose contents are not ckptguard's
    bad = b'{"format_version": 1, "step": 2, "optimizers": {"": {"class": "AdamW", "state_dict": 7}}}'
    (run / S(2) / "state.json").write_bytes(bad)
    from ckptguard.format.tensorfile import digest_bytes

    files = json.loads((run / S(2) / "MANIFEST.json").read_text())["files"]
    files["state.json"] = {"kind": "blob", "size": len(bad), "xxh3_128": digest_bytes(bad)}
    _rewrite_manifest(run / S(2) / "MANIFEST.json", files=files)
    with pytest.raises(NoValidCheckpointError) as ei:
        restore(run, make(seed=5))
    assert "refusing file path" in ei.value.failures[0][1]
    assert "state.json does not describe a state ckptguard can load" in ei.value.failures[1][1]


# ---- a step directory whose manifest was deleted by hand (issue 12 item 8) ----------------------


def test_hand_deleted_manifest_is_kept_and_reported_never_pruned(run: Path, caplog: pytest.LogCaptureFixture) -> None:
    (run / S(2) / "MANIFEST.json").unlink()
    store = LocalStorage(run)
    assert find_debris(store) == [] and find_unknown(store) == [S(2)]
    with caplog.at_level(logging.WARNING, logger="ckptguard"):
        assert clean_debris(store) == []
    assert f"{run / S(2)} has no MANIFEST.json and was not left by an interrupted save: kept" in caplog.text
    assert cli_main(["prune", str(run), "--keep-last", "1"]) == 0
    assert (run / S(2) / "model.safetensors").exists()
    for argv in (["ls", str(run), "--json"], ["prune", str(run), "--dry-run", "--json"]):
        out = subprocess.run([sys.executable, "-m", "ckptguard.cli", *argv], capture_output=True, text=True, check=False)
        assert out.returncode == 0 and json.loads(out.stdout)["unknown"] == [S(2)], (argv, out.stderr[-2000:])
    out = subprocess.run([sys.executable, "-m", "ckptguard.cli", "ls", str(run)], capture_output=True, text=True, check=False,
                         env={**os.environ, "COLUMNS": "200"})
    assert f"1 step folder(s) without a manifest that no interrupted save left (deleted by hand?): {S(2)}" in out.stdout
    problems = [p.message for p in cg.verify(run / S(2)).problems]
    assert problems[0].startswith("missing, yet no interrupted save left this folder")
    assert restore(run, make(seed=5)) == 4


def test_saving_the_step_of_a_hand_deleted_manifest_moves_the_folder_aside(run: Path, caplog: pytest.LogCaptureFixture) -> None:
    (run / S(4) / "MANIFEST.json").unlink()
    original = (run / S(4) / "model.safetensors").read_bytes()
    s = make(seed=5)
    with caplog.at_level(logging.WARNING, logger="ckptguard"), cg.CheckpointManager(run) as mgr:
        assert mgr.restore(s["state"]) == 2
        mgr.save(4, s["state"], force=True)
    kept = [p for p in run.iterdir() if p.name.startswith(f"kept-{S(4)}-")]
    assert len(kept) == 1 and (kept[0] / "model.safetensors").read_bytes() == original
    assert f"{run / S(4)} had no MANIFEST.json (deleted by hand?); saving step 4 again, so it was moved to {kept[0]}, untouched." in caplog.text
    assert [c.step for c in scan(LocalStorage(run))] == [2, 4] and cg.verify(run).ok


def test_only_a_hand_deleted_manifest_starts_fresh_with_a_warning(run: Path, caplog: pytest.LogCaptureFixture) -> None:
    for step in (2, 4):
        (run / S(step) / "MANIFEST.json").unlink()
    with caplog.at_level(logging.WARNING, logger="ckptguard"):
        assert restore(run, make(seed=5)) is None
    assert f"No committed checkpoint in {run}, but {S(2)}, {S(4)} have no MANIFEST.json (deleted by hand?): not restored" in caplog.text
    assert sorted(find_unknown(LocalStorage(run))) == [S(2), S(4)]


def test_object_store_save_and_delete_leave_marked_debris() -> None:
    """On memory:// a save writes into step-N/ directly: the marker makes a crash debris."""
    url = "memory://restore-endings-marker"
    s = make()
    with cg.CheckpointManager(url) as mgr:
        mgr.save(1, s["state"], force=True)
        mgr.save(2, s["state"], force=True)
    from ckptguard.storage import open_storage

    store = open_storage(url)
    assert "UNCOMMITTED" not in store.listdir(S(1))  # removed after the commit
    store.remove_file(f"{S(2)}/MANIFEST.json")  # deleted by hand: unknown, kept
    assert find_unknown(store) == [S(2)] and find_debris(store) == []
    with cg.CheckpointManager(url) as mgr, pytest.raises(cg.CheckpointError) as ei:
        mgr.save(2, s["state"], force=True)  # would overwrite the hand-made folder's files
    assert f"{store.describe(S(2))} exists without MANIFEST.json and was not left by an interrupted save" in str(ei.value)
    delete_checkpoint(store, S(1), reap=lambda name: None)  # a delete killed after uncommitting
    assert find_debris(store) == [S(1)]
    clean_debris(store)
    assert S(1) not in store.listdir("") and "model.safetensors" in store.listdir(S(2))
    store.remove_tree("")


# ---- a checkpoint vanishing mid-restore (issue 13 item 6) ----------------------------------------


class PrunesWhileLoading(EMA):
    """Stands in for a writer's retention that deletes the checkpoint being restored, once."""

    def __init__(self, model: nn.Module, run: Path, step: int) -> None:
        super().__init__(model)
        self.run = run
        self.step = step
        self.pruned: list[int] = []

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        super().load_state_dict(sd)
        if not self.pruned:
            delete_checkpoint(LocalStorage(self.run), S(self.step))
            self.pruned.append(self.step)


def test_a_checkpoint_deleted_mid_restore_is_skipped_not_marked(run: Path, base: dict[str, Any]) -> None:
    s = make(seed=5)
    ema = PrunesWhileLoading(s["model"], run, 4)
    s["state"].objects["ema"] = ema
    assert restore(run, s) == 2  # step 4 vanished after its tensors were read: move on
    assert ema.pruned == [4] and same(s["model"].state_dict(), base["saved"][2])
    assert statuses(run) == {S(2): None}
    s = make(seed=5)
    s["state"].objects["ema"] = PrunesWhileLoading(s["model"], run, 2)
    with pytest.raises(cg.CheckpointNotFoundError) as ei:
        restore(run, s, step=2)  # asked for exactly this step: no other one will do
    assert str(ei.value).startswith(f"{run / S(2)} was deleted while it was being restored")
    assert restore(run, make(seed=5)) is None  # nothing committed is left


WRITER = textwrap.dedent(
    """
    import sys, torch, ckptguard as cg
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = cg.TrainState(model=model, optimizer=opt, config={"lr": 1e-3})
    with cg.CheckpointManager(sys.argv[1], retention=cg.Retention(keep_last=1)) as mgr:
        mgr.save(1, state, force=True)
        print("READY", flush=True)
        for step in range(2, int(sys.argv[2])):
            model(torch.randn(4, 64)).sum().backward(); opt.step(); opt.zero_grad()
            mgr.save(step, state, force=True)
    print("DONE", flush=True)
    """
)


def test_reader_beside_a_pruning_writer_never_fails(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(cg.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    saves = 400 if FULL else 60  # ~2,000 restores, ~30 of them racing a prune, in 150 saves
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(run), str(saves)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 2))
        state = cg.TrainState(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config={"lr": 1e-3})
        steps = []
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            with cg.CheckpointManager(run, lock=False) as mgr:
                steps.append(mgr.restore(state))  # never CheckpointNotFoundError / corrupt
        assert proc.wait(timeout=300) == 0
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert len(steps) >= 3 and all(isinstance(x, int) for x in steps), steps
    assert steps == sorted(steps)  # each restore finds the newest at that moment, never older
    store = LocalStorage(run)
    assert [(c.step, c.status) for c in scan(store)] == [(saves - 1, "unverified")]


# ---- the lock held by another writer -------------------------------------------------------------


HOLDER = textwrap.dedent(
    """
    import sys, time, torch, ckptguard as cg
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    mgr = cg.CheckpointManager(sys.argv[1])
    mgr.save(3, cg.TrainState(model=model), force=True)
    print("READY", flush=True)
    time.sleep(120)
    """
)


def test_restore_only_reader_works_while_another_process_holds_the_lock(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(cg.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        torch.manual_seed(9)
        model = torch.nn.Linear(4, 2)
        state = cg.TrainState(model=model)
        with cg.CheckpointManager(run, lock=False) as mgr:
            assert mgr.restore(state) == 3
        try:  # a writer is refused (at construction today; at the first save once the lock is lazy)
            writer = cg.CheckpointManager(run)
        except cg.RunLockedError as e:
            err = e
        else:
            with pytest.raises(cg.RunLockedError) as ei:
                writer.save(4, state, force=True)
            err = ei.value
        assert str(proc.pid) in str(err)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert statuses(run) == {S(3): None}


def test_a_failed_mark_is_listed_and_an_explicit_step_restores_it(run: Path, base: dict[str, Any]) -> None:
    from ckptguard.run.catalog import mark_status

    store = LocalStorage(run)
    mark_status(store, S(4), "failed", "probe output drifted")
    flip(run / S(2) / "model.safetensors")
    with pytest.raises(NoValidCheckpointError) as ei:
        restore(run, make(seed=5))
    assert ei.value.failures[0] == (str(run / S(4)), "marked failed: probe output drifted (skipped; restore(state, step=4) restores it anyway)")
    assert "does not match" in ei.value.failures[1][1]
    s = make(seed=5)
    assert restore(run, s, step=4) == 4
    assert same(s["model"].state_dict(), base["saved"][4])
    assert read_status(store, S(4))["status"] == "failed"  # verify and restore never clear "failed"


# ---- an oracle: which step restore picks, or which checkpoints it lists as unusable -------------

CONDITIONS = ["sound", "flipped", "marked", "failed", "no-manifest", "debris"]


def oracle(conds: dict[int, str]) -> tuple[str, Any]:
    """What restore must do, in a few obvious lines: the newest sound committed checkpoint; None
    if nothing is committed; else the error listing every committed one, newest first."""
    committed = [s for s in sorted(conds, reverse=True) if conds[s] not in ("no-manifest", "debris")]
    for s in committed:
        if conds[s] == "sound":
            return "step", s
    return ("none", None) if not committed else ("error", committed)


@pytest.fixture(scope="module")
def four(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("four") / "run"
    train(make(), run, [1, 2, 3, 4])
    return run


def test_restore_matches_the_oracle(four: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from ckptguard.run.catalog import mark_status

    @settings(max_examples=60 if FULL else 15, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(st.sampled_from(CONDITIONS), min_size=4, max_size=4))
    def check(picked: list[str]) -> None:
        conds = dict(zip([1, 2, 3, 4], picked))
        run = tmp_path_factory.mktemp("oracle") / "run"
        shutil.copytree(four, run)
        for step, cond in conds.items():
            d = run / S(step)
            if cond == "flipped":
                flip(d / "model.safetensors")
            elif cond in ("marked", "failed"):
                mark_status(LocalStorage(run), S(step), "corrupt" if cond == "marked" else "failed", "earlier finding")
            elif cond in ("no-manifest", "debris"):
                (d / "MANIFEST.json").unlink()
                if cond == "debris":
                    (d / "UNCOMMITTED").write_bytes(b"save\n")
        kind, want = oracle(conds)
        for _ in range(2):  # the same answer on the second call (marks change nothing about it)
            if kind == "error":
                with pytest.raises(NoValidCheckpointError) as ei:
                    restore(run, make(seed=5))
                assert [p for p, _ in ei.value.failures] == [str(run / S(s)) for s in want], conds
            else:
                assert restore(run, make(seed=5)) == want, conds
        # only the flipped ones restore had to read are marked; nothing else changed
        tried = [s for s in sorted(conds, reverse=True) if kind != "step" or s > want]
        for step, cond in conds.items():
            rec = read_status(LocalStorage(run), S(step)) if (run / S(step) / "MANIFEST.json").exists() else None
            expect = {"marked": "corrupt", "failed": "failed"}.get(cond)
            if cond == "flipped" and step in tried:
                expect = "corrupt"
            assert (rec or {}).get("status") == expect, (conds, step, rec)
        assert sorted(p.name for p in run.iterdir() if p.name.startswith("step-")) == [S(s) for s in sorted(conds)]
        shutil.rmtree(run)

    check()


def test_verify_names_a_deleted_file_as_damage(run: Path) -> None:
    (run / S(4) / "model.safetensors").unlink()
    report = cg.verify(run / S(4))
    assert not report.ok
    [problem] = [p.message for p in report.problems]
    assert problem == (
        f"{run / S(4) / 'model.safetensors'} is listed in the manifest but missing (deleted or lost): "
        "the checkpoint is damaged; restore falls back to an older one."
    )
    assert restore(run, make(seed=5)) == 2


def test_after_a_rollback_and_a_new_commit_a_reopened_run_restores_the_live_branch(tmp_path: Path) -> None:
    """The retention oracle's shrunk example, deterministic: keep_best=1 by an unreported metric,
    saves 1 and 3, restore(step=1), save 2, reopen. Step 3 is kept (the newest) but belongs to the
    continuation the run left: a plain restore() resumes the live branch (2), not the newest step;
    restore(step=3) still goes back to it."""
    run = tmp_path / "run"
    retention = cg.Retention(keep_best=1, metric="val", mode="min")
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    state = cg.TrainState(model=model, config={"v": "a"})
    weights: dict[int, torch.Tensor] = {}
    with cg.CheckpointManager(run, retention=retention, async_save=False) as mgr:
        for step in (1, 3):
            with torch.no_grad():
                model.weight.add_(1.0)
            assert mgr.save(step, state, force=True)
            weights[step] = model.weight.detach().clone()
        assert mgr.restore(state, step=1) == 1
        with torch.no_grad():
            model.weight.add_(10.0)
        assert mgr.save(2, state, force=True)
        weights[2] = model.weight.detach().clone()
    assert sorted(int(p.name[5:]) for p in run.glob("step-*")) == [1, 2, 3]
    st = statuses(run)
    assert st[S(3)]["status"] == "superseded" and st[S(2)] is None
    assert "rolled back to step 1" in st[S(3)]["detail"]
    with cg.CheckpointManager(run, retention=retention) as mgr:
        assert mgr.restore(state) == 2
        assert torch.equal(model.weight, weights[2])
        assert mgr.restore(state, step=3) == 3
        assert torch.equal(model.weight, weights[3])


def test_a_superseded_checkpoint_restored_by_its_step_rejoins_the_live_branch_at_the_next_commit(tmp_path: Path) -> None:
    """Saves 1 and 3, restore(step=1), save 2 (3 superseded), restore(step=3), save 4: the run
    went on from 3, so its mark goes (a restore alone changes nothing). When 4 is damaged, a
    plain restore falls back to 3, not to 2 of the branch the run left."""
    run = tmp_path / "run"
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    state = cg.TrainState(model=model)
    with cg.CheckpointManager(run, async_save=False) as mgr:
        for step in (1, 3):
            assert mgr.save(step, state, force=True)
        assert mgr.restore(state, step=1) == 1
        assert mgr.save(2, state, force=True)
        assert mgr.restore(state, step=3) == 3
        assert statuses(run)[S(3)]["status"] == "superseded"  # restoring alone changes nothing
        with torch.no_grad():
            model.weight.add_(1.0)
        assert mgr.save(4, state, force=True)
    assert statuses(run) == {S(1): None, S(2): None, S(3): None, S(4): None}
    with cg.CheckpointManager(run) as mgr:
        assert mgr.restore(state) == 4
    flip(run / S(4) / "model.safetensors")
    with cg.CheckpointManager(run) as mgr:
        assert mgr.restore(state) == 3
