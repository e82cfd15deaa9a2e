"""Runs jobs over hostile run directories in one process and reports each as a JSON line.

Used by test_hostile_files.py under a subprocess timeout (the hang detector): a job that hangs
leaves the report without its line. Jobs (argv[1] is a JSON list):

- ``{"cli": [...argv...]}``: ``ckptguard.cli.main(argv)``; reports the exit code, the time, the
  stderr text and whether anything but a SystemExit/int escaped (a crash, with its traceback).
- ``{"restore": RUN, "save": bool}``: what a user's script does: restore the newest valid
  checkpoint into a fresh model, optionally train one step and save; reports the step, a digest
  of the restored weights, whether the save committed, and the warnings logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import torch

import ckptguard as cg
from ckptguard.cli import main
from trainlib import make_setup, train_step


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def run_cli(argv: list[str]) -> dict[str, Any]:
    err = io.StringIO()
    crash = ""
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(err):
        try:
            code: Any = main(argv)
        except SystemExit as e:
            code = e.code
        except BaseException:
            code = "crash"
            crash = traceback.format_exc()
    return {"code": code, "stderr": err.getvalue()[-4000:], "stdout": out.getvalue()[-4000:], "crash": crash}


def run_restore(run: str, save: bool) -> dict[str, Any]:
    collect = Collect()
    logging.getLogger("ckptguard").addHandler(collect)
    result: dict[str, Any] = {}
    try:
        s = make_setup(hidden=4, seed=3)
        with cg.CheckpointManager(run) as mgr:
            step = mgr.restore(s["state"])
            result["step"] = step
            result["digest"] = weights_digest(s["model"])
            if save:
                train_step(s, *next(iter(s["loader"])))
                result["saved"] = mgr.save((step or 0) + 1, s["state"], force=True, metrics={"loss": 0.5})
    except cg.CheckpointError as e:
        result["error"] = f"{type(e).__name__}: {e}"
    except BaseException:
        result["crash"] = traceback.format_exc()
    finally:
        logging.getLogger("ckptguard").removeHandler(collect)
    result["warnings"] = collect.messages
    return result


def main_() -> None:
    report = sys.__stdout__
    assert report is not None
    for job in json.loads(sys.argv[1]):
        t0 = time.monotonic()
        res = run_cli(job["cli"]) if "cli" in job else run_restore(job["restore"], job.get("save", False))
        res["seconds"] = round(time.monotonic() - t0, 3)
        res["job"] = job
        report.write(json.dumps(res) + "\n")
        report.flush()


if __name__ == "__main__":
    main_()
