"""Tiers on two nodes: what the peer replica costs, and what a lost node costs with and without it.

    python benchmarks/tiers_nodes.py --quick                  # the small state only
    python benchmarks/tiers_nodes.py --output BENCHMARKS.md   # the 1.1 GB state too; rewrites its section

Two "nodes" of one rank each on this machine (``torch.distributed``, gloo over loopback), each with
its own memory directory (what two machines' ``/dev/shm`` are). In one run, per state:

1. *Saves with the peer replica*: async tiered saves; the time ``save()`` blocked training, the time
   until the checkpoint is committed in both nodes' memory (``wait()``: the two exchanges of
   ckptguard.tiers.replica included), and the peak size of each node's memory directory in copies
   of the checkpoint (the target: <= 2 per node, the replica included).
2. *A lost node*: both ranks are SIGKILLed after a save; node 1's memory is wiped (its keeper killed);
   two new processes start and the time from their start to the first training step of both is
   measured: node 1 receives the checkpoint from node 0's memory (the peer replica). Against: the
   same with tiers and both nodes' memory lost (the durable tier: local disk, page cache dropped),
   which is what a run without a peer replica falls back to.
3. Expected cost of one node failure at a 1% saving budget: interval / 2 + recovery (first order),
   the interval as in benchmarks/tiers.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import ckptguard as cg  # noqa: E402
from harness import FULL, QUICK, StateSpec, build_state, evict, machine, replace_section  # noqa: E402
from tiers import SMALL, PeakDir, timed_saves  # noqa: E402

NEVER = 1e9


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker(role: str, run: str, memory: str, spec: StateSpec, saves: int) -> None:
    """One rank. ``save``: async tiered saves, print timings, SIGKILL yourself (the memory stays).
    ``recover``: restore, one training step, print timings."""
    import torch.distributed as dist

    t_start = time.time()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model, opt = build_state(spec, seed=1 if role == "recover" else 0)
    state = cg.TrainState(model=model, optimizer=opt)
    durable = NEVER if role != "durable" else 1e-3
    mgr = cg.CheckpointManager(run, async_save=True, tiers=cg.Tiers(
        memory_dir=memory, durable_every_seconds=durable, grace_seconds=600))
    if role in ("save", "durable"):
        peak = PeakDir(memory)
        peak.start()
        blocked, total = timed_saves(mgr, state, saves)
        if role == "durable":
            mgr.close()  # the newest checkpoint in the durable tier; the memory freed
        peak.stop.set()
        peak.join()
        one = max(c.size_bytes for c in mgr.checkpoints())
        print(json.dumps({"rank": rank, "blocked": statistics.median(blocked), "until_replicated": statistics.median(total),
                          "peak_copies": peak.peak / one}), flush=True)
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.time()
    step = mgr.restore(state)
    t1 = time.time()
    for p in model.parameters():
        p.grad = torch.ones_like(p) * 1e-3
    opt.step()
    t2 = time.time()
    print(json.dumps({"rank": rank, "step": step, "restore": t1 - t0, "first_step_at": t2, "start": t_start}), flush=True)
    mgr.close()


def _launch(role: str, run: str, memories: list[str], spec: StateSpec, saves: int) -> list[dict[str, Any]]:
    port = _free_port()
    procs = []
    for rank, memory in enumerate(memories):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, __file__, "--worker", role, run, memory, str(spec.layers), str(spec.width), str(saves)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=1800)
        lines = [x for x in stdout.splitlines() if x.startswith("{")]
        if not lines:
            raise RuntimeError(f"{role} worker failed ({p.returncode}):\n{stderr[-3000:]}")
        out.append(json.loads(lines[-1]))
    return out


def _kill_keepers(memory: str) -> None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"ckptguard.tiers.keeper" in cmd and any(memory.encode() in a for a in cmd):
            os.kill(int(pid), signal.SIGKILL)


def measure(spec: StateSpec, saves: int, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {"state_bytes": spec.nbytes}
    for case in ("peer", "durable"):
        run = str(tmp / f"run-{case}-{uuid.uuid4().hex[:6]}")
        memories = [str(tmp / "shm" / f"{case}-{uuid.uuid4().hex[:6]}-node{i}") for i in (0, 1)]
        for m in memories:
            os.makedirs(m)
        saved = _launch("save" if case == "peer" else "durable", run, memories, spec, saves)
        if case == "peer":
            out["saves"] = saved
        lost = memories[1:] if case == "peer" else memories
        for m in lost:  # the node is gone: its keeper and its memory
            _kill_keepers(m)
            shutil.rmtree(m)
            os.makedirs(m)
        evict(run)
        t_launch = time.time()
        back = _launch("recover", run, memories, spec, saves)
        out[case] = {"to_first_step": max(b["first_step_at"] for b in back) - t_launch,
                     "restore": max(b["restore"] for b in back), "step": [b["step"] for b in back]}
        for m in memories:
            _kill_keepers(m)
    return out


def render(res: dict[str, Any], budget: float = 0.01) -> str:
    m = res["machine"]
    lines = [f"_`{res['command']}`; {res['when']}; {m['nproc']} vCPU, {m['ram_gb']} GB, torch {m['torch']}; two nodes of "
             "one rank each on this machine (gloo over loopback)_", ""]
    for name, r in res["states"].items():
        s = r["saves"]
        blocked = max(x["blocked"] for x in s)
        until = max(x["until_replicated"] for x in s)
        peak = max(x["peak_copies"] for x in s)
        interval = max(blocked / budget, until)
        lines += [f"### {name} ({r['state_bytes'] / 1e9:.3g} GB of state)", "",
                  "| hot save with the peer replica (async) | blocked (median) | until committed on both nodes | peak memory per node (checkpoints) |",
                  "|---|---|---|---|",
                  f"| two nodes | {blocked:.4f} s | {until:.3f} s | {peak:.2f} |", "",
                  "| node 1 lost (memory gone), restoring from | start to first step (both ranks) | of which restore | step |",
                  "|---|---|---|---|"]
        for case, label in (("peer", "node 0's memory (the peer replica)"), ("durable", "the durable tier (local disk, cold): no replica")):
            x = r[case]
            lines.append(f"| {label} | {x['to_first_step']:.3f} s | {x['restore']:.3f} s | {x['step'][0]} |")
        peer, dur = r["peer"]["to_first_step"], r["durable"]["to_first_step"]
        lines += ["", f"Expected cost of one node failure, hot saves every {interval:.2f} s (1% budget): with the peer replica "
                  f"{interval / 2 + peer:.1f} s; falling back to the durable tier (its copy every T s) T/2 + {dur:.1f} s. "
                  f"Target memory per node <= 2 checkpoints: {peak:.2f} ({'met' if peak <= 2.005 else 'missed'}).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the small state only")
    ap.add_argument("--output", default=None, help="markdown file whose tiers-nodes section is rewritten")
    ap.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        role, run, memory, layers, width, saves = args.worker
        worker(role, run, memory, StateSpec(int(layers), int(width)), int(saves))
        return 0
    specs = {"small training loop": QUICK if args.quick else SMALL}
    if not args.quick:
        specs["1.1 GB state"] = FULL
    res: dict[str, Any] = {"states": {}, "machine": machine(), "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "command": "python benchmarks/tiers_nodes.py" + (" --quick" if args.quick else "")}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d, \
            tempfile.TemporaryDirectory(dir="/dev/shm", prefix="ckptguard-bench-") as shm:
        tmp = Path(d)
        (tmp / "shm").symlink_to(shm)
        for name, spec in specs.items():
            res["states"][name] = measure(spec, 3 if spec is FULL else 5, tmp)
            print(json.dumps({name: res["states"][name]}, indent=1), flush=True)
    text = render(res)
    print(text)
    if args.output:
        replace_section(Path(args.output), "## Tiers on two nodes: the peer replica\n\n" + text, "tiers-nodes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
