"""``ckptguard prune`` and the manager's debris clean-up under real kills and a failing rename
(issue 13 item 8): a prune killed at any operation converges with ONE more prune (a checkpoint
left whole in ``.trash-*`` is put back before the plan, not after it), and a put-back whose
rename fails leaves the checkpoint whole instead of deleting it as debris."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

import ckptguard as cg
from ckptguard.cli import main
from ckptguard.cli import prune as prune_cli
from ckptguard.storage.local import LocalStorage
from ckptguard.testing import FaultyStorage, KillAt, count_ops
from conftest import FULL

STEPS = list(range(1, 7))


def on_disk(run: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in run.glob("step-*") if (p / "MANIFEST.json").exists())


def debris(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith((".tmp-", ".trash-")))


def weights_of(run: Path, step: int) -> torch.Tensor:
    state = cg.TrainState(model=torch.nn.Linear(2, 2))
    with cg.CheckpointManager(run, lock=False) as mgr:
        assert mgr.restore(state, step=step) == step
    return state.model.weight.detach().clone()  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run with checkpoints 1..6 (weight = step), everything kept."""
    run = tmp_path_factory.mktemp("pristine") / "run"
    model = torch.nn.Linear(2, 2)
    state = cg.TrainState(model=model)
    with cg.CheckpointManager(run) as mgr:
        for step in STEPS:
            with torch.no_grad():
                model.weight.fill_(float(step))
            mgr.save(step, state, metrics={"loss": 1.0 / step}, force=True)
    return run


def prune_in_child(run: Path, k: int, args: list[str]) -> int:
    """``ckptguard prune`` in a real forked process killed by SIGKILL before its k-th operation."""
    pid = os.fork()
    if pid == 0:
        try:
            prune_cli.open_storage = lambda url, *a: KillAt(LocalStorage(url), k)  # type: ignore[assignment]
            main(["prune", str(run), *args, "--json"])
        finally:
            os._exit(3)
    deadline = time.monotonic() + 300
    while not (done := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError("prune hung")
        time.sleep(0.02)
    status = done[1]
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def test_a_killed_prune_converges_with_one_more_prune(
    pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["--keep-last", "2"]
    counted = FaultyStorage(LocalStorage(tmp_path / "count"))
    shutil.copytree(pristine, tmp_path / "count")
    monkeypatch.setattr(prune_cli, "open_storage", lambda url, *a: counted)
    n = count_ops(counted, lambda: main(["prune", str(tmp_path / "count"), *args, "--json"]))
    monkeypatch.undo()
    capsys.readouterr()
    assert on_disk(tmp_path / "count") == [5, 6] and n >= 4 * 3  # each delete: rename, sync, 2 removals
    ks = range(1, n + 1) if FULL or n <= 40 else sorted({*range(1, 16), *range(16, n + 1, 3), n})
    for k in ks:
        run = tmp_path / f"k{k}"
        shutil.copytree(pristine, run)
        assert prune_in_child(run, k, args) == -signal.SIGKILL
        assert main(["prune", str(run), *args, "--json"]) == 0, k
        out = json.loads(capsys.readouterr().out)
        assert on_disk(run) == [5, 6], (k, out["decisions"])
        assert debris(run) == [], k
        assert main(["prune", str(run), *args, "--dry-run", "--json"]) == 0
        assert all(d["keep"] for d in json.loads(capsys.readouterr().out)["decisions"]), k
    run = tmp_path / f"k{ks[-1]}"
    assert torch.equal(weights_of(run, 5), torch.full((2, 2), 5.0))


def whole_trash(pristine: Path, tmp_path: Path, step: int) -> tuple[Path, Path]:
    """A run where checkpoint ``step`` sits whole in ``.trash-*`` (a delete killed after its rename)."""
    run = tmp_path / "run"
    shutil.copytree(pristine, run)
    trash = run / f".trash-step-{step:09d}-0badc0de"
    (run / f"step-{step:09d}").rename(trash)
    return run, trash


def test_prune_leaves_a_checkpoint_whole_when_its_put_back_rename_fails(
    pristine: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    run, trash = whole_trash(pristine, tmp_path, 3)
    files = sorted(p.name for p in trash.iterdir())
    failing = FaultyStorage(LocalStorage(run), fail_at=1, ops={"rename"}, sticky=True)  # every rename fails
    monkeypatch.setattr(prune_cli, "open_storage", lambda url, *a: failing)
    with caplog.at_level(logging.WARNING):
        assert main(["prune", str(run), "--keep-last", "1", "--json"]) == 1  # its deletes fail too
    out = json.loads(capsys.readouterr().out)
    assert failing.failed is not None and failing.failed.op == "rename"
    assert sorted(p.name for p in trash.iterdir()) == files  # whole: nothing removed as debris
    assert "left whole" in caplog.text and trash.name in caplog.text
    assert trash.name not in out["debris"]
    monkeypatch.undo()
    # the next prune puts it back first and decides about it with the others
    assert main(["prune", str(run), "--dry-run", "--json"]) == 0
    capsys.readouterr()
    assert main(["prune", str(run), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 3 in [d["step"] for d in out["decisions"]] and debris(run) == []


def test_a_manager_keeps_a_whole_trash_when_the_put_back_fails_then_puts_it_back(
    pristine: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run, trash = whole_trash(pristine, tmp_path, 3)
    storage = FaultyStorage(LocalStorage(run), fail_at=1, ops={"rename"})  # the first rename fails
    state = cg.TrainState(model=torch.nn.Linear(2, 2))
    with caplog.at_level(logging.WARNING), cg.CheckpointManager(storage) as mgr:
        assert mgr.restore(state) == 6
        mgr.save(7, state, force=True)  # debris clean-up first: its put-back rename fails
        assert storage.failed is not None and storage.failed.path.endswith("step-000000003")
        assert trash.is_dir() and (trash / "MANIFEST.json").exists()
        assert on_disk(run) == [1, 2, 4, 5, 6, 7]
        mgr.save(8, state, force=True)  # the next save retries: the checkpoint is back
        assert not trash.exists() and on_disk(run) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert "left whole" in caplog.text
    assert torch.equal(weights_of(run, 3), torch.full((2, 2), 3.0))
