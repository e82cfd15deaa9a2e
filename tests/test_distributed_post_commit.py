"""After the commit in a 2-rank run (gloo, CPU, real torchrun): tests/dist_scripts/post_commit.py.

Rank 0 alone runs post-commit hooks and retention; a failure there reaches every rank as a
PostCommitError that says the checkpoint is committed. The manager's close() destroys its two
checkpoint process groups, also after the default group is gone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.xdist_group("dist-store")]  # torchrun tests that tolerate another torchrun beside them
SCRIPT = Path(__file__).parent / "dist_scripts" / "post_commit.py"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    run, out = tmp_path_factory.mktemp("post-commit-run"), tmp_path_factory.mktemp("post-commit-out")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT), str(run), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.run(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=240)
    assert p.returncode == 0, p.stdout[-4000:]
    return run, [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def _committed(run: Path, step: int) -> str:
    return (
        f"Step {step} was committed to {run / f'step-{step:09d}'} (the checkpoint is intact and restorable), but the "
        "post-commit hook failing_hook.<locals>.upload failed after the commit: RuntimeError: the tracking server is "
        "down. Fix the hook (registered with add_post_commit_hook); later saves run it again."
    )


def test_a_hook_failure_on_rank_0_raises_on_every_rank_from_the_sync_save(ranks: tuple[Path, list[dict[str, Any]]]) -> None:
    run, docs = ranks
    msg = _committed(run / "sync", 1)
    assert docs[0]["sync"]["first"] == {"raised": "PostCommitError", "message": msg, "step": 1}
    assert docs[1]["sync"]["first"] == {"raised": "PostCommitError", "message": f"Rank 0 reports: {msg}", "step": 1}
    for d in docs:
        assert d["sync"]["second"] == {"raised": None} and d["sync"]["steps"] == [1, 2]


def test_an_async_hook_failure_raises_on_every_rank_at_the_next_save_which_saves_its_step(
    ranks: tuple[Path, list[dict[str, Any]]],
) -> None:
    run, docs = ranks
    for rank, d in enumerate(docs):
        prefix = "" if rank == 0 else "Rank 0 reports: "
        a = d["async"]
        assert a["returned"] is True  # the hook failed in the background
        assert a["at_next_save"] == {"raised": "PostCommitError", "message": prefix + _committed(run / "async", 1), "step": 1}
        assert a["after"] == {"raised": None} and a["steps"] == [1, 2]  # step 2 saved by the save that raised
        assert a["at_wait"] == {"raised": "PostCommitError", "message": prefix + _committed(run / "async", 3), "step": 3}


def test_close_destroys_the_checkpoint_groups_and_survives_a_destroyed_default_group(
    ranks: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, docs = ranks
    for d in docs:
        fds = d["groups"]["fds"]  # open file descriptors after each of 4 managers was closed
        assert fds == [fds[0]] * 4, fds  # each manager's two gloo groups held ~10 sockets until destroyed
        assert d["groups"]["closed_after_destroy"] == {"raised": None}
