"""Child training program for the preemption and loss-guard tests (a real process to signal).

Same loop as trainlib.run_training (so a resumed run can be compared bit for bit), plus: a
preemption guard, a pause at a chosen step that waits for the flag (so the signal lands at a known
step), a stuck loop, a poller reading a file, NaN/spike injection and a LossGuard.
Prints ``STEP n`` after each step and ``READY`` once the guard is installed.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from safetensors.torch import save_file

import ckptguard as cg
import trainlib


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("--total", type=int, default=30)
    ap.add_argument("--every-steps", type=int, default=5)
    ap.add_argument("--async-save", action="store_true")
    ap.add_argument("--pause-at", type=int, default=None)
    ap.add_argument("--stuck-at", type=int, default=None)
    ap.add_argument("--signals", default="SIGTERM,SIGUSR1,SIGINT")
    ap.add_argument("--exit-code", type=int, default=None)
    ap.add_argument("--poller-file", default=None)
    ap.add_argument("--inject", choices=("nan", "spike", "nan-always"), default=None)
    ap.add_argument("--inject-at", type=int, default=None)
    ap.add_argument("--loss-guard", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--workers", type=int, default=0)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(relativeCreated)d %(name)s %(message)s")

    s = trainlib.make_setup(workers=a.workers)
    state = s["state"]
    mgr = cg.CheckpointManager(a.run, every_steps=a.every_steps, async_save=a.async_save)
    guard_ll = cg.LossGuard(mgr, window=8, z_threshold=6.0, max_retries=2, recover_steps=4) if a.loss_guard else None
    step = mgr.restore(state) or 0
    pollers = (lambda: os.path.exists(a.poller_file),) if a.poller_file else ()
    sigs = tuple(getattr(signal, n) for n in a.signals.split(","))
    injected = False
    with mgr.preemption_guard(sigs, exit_code=a.exit_code, pollers=pollers, poll_seconds=0.0) as guard:
        print("READY", flush=True)
        loader = s["loader"]
        while step < a.total:
            rolled_back = False
            for xb, yb in loader:
                if a.inject and step + 1 == a.inject_at and (not injected or a.inject == "nan-always"):
                    injected = True
                    if a.inject.startswith("nan"):
                        xb = xb * float("nan")
                    else:  # a spike: confidently wrong on scaled inputs
                        xb, yb = xb * 100, 1 - yb
                loss = trainlib.train_step(s, xb, yb)
                step += 1
                state.extra["seen"] += len(xb)
                print(f"STEP {step}", flush=True)
                if guard_ll is not None and guard_ll.check(step, loss):
                    step = guard_ll.rollback(state)
                    print(f"ROLLBACK {guard_ll.trips[-1].step} -> {step}", flush=True)
                    rolled_back = True
                    break
                if step == a.pause_at:
                    deadline = time.monotonic() + 25
                    while time.monotonic() < deadline and not guard.triggered and not (
                        a.poller_file and os.path.exists(a.poller_file)
                    ):
                        time.sleep(0.01)
                if step == a.stuck_at:
                    while True:
                        time.sleep(0.01)
                mgr.save(step, state, metrics={"loss": loss if math.isfinite(loss) else float("nan")})
                if step >= a.total:
                    break
            if rolled_back:
                continue
            state.extra["epoch"] += 1  # as trainlib.run_training does
    mgr.close()
    if a.out:
        save_file({k: v.contiguous() for k, v in s["model"].state_dict().items()}, a.out)
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
