"""One benchmark measurement in a fresh process: ``python worker.py '<json job>'`` prints JSON.

Jobs: ``save_timing`` (every method, both write regimes, interleaved), ``save_memory`` (one
method's peak extra RSS), ``prepare`` (write a checkpoint for a
restore method), ``restore`` (one cold restore with peak extra RSS), ``train`` (training throughput
with no / sync / async saves).
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import ckptguard as cg
from ckptguard.persist.staging import Stager
from harness import PeakRSS, StateSpec, build_state, evict, fsync_path

# ---- state in the shapes each library wants ------------------------------------------------------


def flat_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in model.state_dict().items()}
    for pid, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                out[f"optim.{pid}.{k}"] = v
    return out


def load_flat(model: nn.Module, opt: torch.optim.Optimizer, flat: dict[str, torch.Tensor]) -> None:
    model.load_state_dict({k[6:]: v for k, v in flat.items() if k.startswith("model.")})
    osd = opt.state_dict()
    for pid, st in osd["state"].items():
        for k in st:
            st[k] = flat[f"optim.{pid}.{k}"]
    opt.load_state_dict(osd)


def dcp_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def raw_buffer(nbytes: int) -> torch.Tensor:
    return torch.ones(nbytes, dtype=torch.uint8)


def write_raw(buf: torch.Tensor, path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(buf.numpy())
        while len(view):
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def direct_buffer(nbytes: int) -> mmap.mmap:
    """Page-aligned memory (O_DIRECT needs aligned addresses), rounded up to a whole page."""
    buf = mmap.mmap(-1, -(-nbytes // 4096) * 4096)
    buf.write(b"\1" * len(buf))
    return buf


def write_raw_direct(buf: mmap.mmap, path: str, piece: int = 64 << 20) -> None:
    """The disk's own limit: one O_DIRECT stream of large aligned writes, no copies, + fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    try:
        view, pos = memoryview(buf), 0
        while pos < len(view):
            pos += os.pwrite(fd, view[pos : pos + piece], pos)
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- saves: each returns (blocked seconds, durable seconds) ---------------------------------------


class Saver:
    def __init__(self, method: str, model: nn.Module, opt: torch.optim.Optimizer, root: Path) -> None:
        self.method, self.model, self.opt, self.root = method, model, opt, root
        self.mgr: cg.CheckpointManager | None = None
        self.raw: torch.Tensor | None = None
        self.direct: mmap.mmap | None = None
        self.stager: Stager | None = None
        if method.startswith("ckptguard"):
            self.mgr = cg.CheckpointManager(root / "run", async_save=method == "ckptguard_async")
            _ = self.mgr.environment  # collected once (a git call), not a save cost
            if method == "ckptguard_async":
                # As in a training loop: a save() call that is not due allocates the host buffers
                # in the background (the bare-copy method below gets its buffers allocated too).
                self.mgr.save(1, cg.TrainState(model=model, optimizer=opt))
                _ = self.mgr.host_buffers  # waits until they are prepared
            if method == "ckptguard_buffered":
                from ckptguard.persist.parallel_io import ParallelTensorWriter

                self.mgr.tensor_writer = ParallelTensorWriter(direct=False)
        if method == "raw_direct":
            self.direct = direct_buffer(sum(t.numel() * t.element_size() for t in flat_tensors(model, opt).values()))
        if method == "raw_write":
            self.raw = raw_buffer(sum(t.numel() * t.element_size() for t in flat_tensors(model, opt).values()))
        if method == "copy_reused":
            self.stager = Stager()
            self.stager.stage({"s": flat_tensors(model, opt)})  # allocate the buffers once

    def output(self, rep: int) -> Path:
        if self.mgr is not None:
            return self.root / "run" / f"step-{rep + 1:09d}"
        return self.root / f"{self.method}-{rep}"

    def save(self, rep: int) -> tuple[float, float]:
        m, o, dest = self.model, self.opt, str(self.output(rep))
        t0 = time.perf_counter()
        if self.mgr is not None:
            self.mgr.save(rep + 1, cg.TrainState(model=m, optimizer=o), force=True)
            blocked = time.perf_counter() - t0
            self.mgr.wait()
            return blocked, time.perf_counter() - t0
        if self.method == "torch_save":
            torch.save({"model": m.state_dict(), "optim": o.state_dict()}, dest)
            fsync_path(dest)
        elif self.method == "safetensors":
            from safetensors.torch import save_file

            save_file(flat_tensors(m, o), dest)
            fsync_path(dest)
        elif self.method.startswith("dcp"):
            import torch.distributed.checkpoint as dcp

            writer = dcp.FileSystemWriter(dest, thread_count=2 if self.method != "dcp_1thread" else 1, sync_files=True)
            if self.method == "dcp_async":
                fut = dcp.async_save(dcp_state(m, o), storage_writer=writer)
                blocked = time.perf_counter() - t0
                fut.result()
                return blocked, time.perf_counter() - t0
            dcp.save(dcp_state(m, o), storage_writer=writer)
        elif self.method == "raw_write":
            assert self.raw is not None
            write_raw(self.raw, dest)
        elif self.method == "raw_direct":
            assert self.direct is not None
            write_raw_direct(self.direct, dest)
        elif self.method == "copy_reused":
            assert self.stager is not None
            self.stager.stage({"s": flat_tensors(m, o)})
        else:
            raise SystemExit(f"unknown method {self.method}")
        t = time.perf_counter() - t0
        return t, t

    def remove(self, rep: int) -> None:
        p = self.output(rep)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def job_save_timing(job: dict[str, Any]) -> dict[str, Any]:
    """All methods in one process, repetitions interleaved (rep-major) so that machine noise and
    page-cache state hit every method alike. ``first``: a repetition's outputs stay until every
    method has written (new page cache each time); ``resave``: each method deletes its previous
    output before writing (its pages are reused)."""
    spec = StateSpec(**job["spec"])
    model, opt = build_state(spec)
    root = Path(job["dir"])
    methods = job["methods"]
    savers = {}
    for m in methods:
        (root / m).mkdir(parents=True, exist_ok=True)
        savers[m] = Saver(m, model, opt, root / m)
    out: dict[str, Any] = {m: {"first": [], "resave": []} for m in methods}
    reps = job["reps"]
    for rep in range(reps):  # first-write regime; rotate the order: no method always goes first
        order = methods[rep % len(methods):] + methods[: rep % len(methods)]
        for m in order:
            blocked, durable = savers[m].save(rep)
            out[m]["first"].append({"blocked": blocked, "durable": durable})
        for m in order:
            savers[m].remove(rep)
    for rep in range(reps + 1):  # re-save regime (the first round only warms up)
        for m in methods:
            if rep:
                savers[m].remove(rep - 1)
            blocked, durable = savers[m].save(rep)
            if rep:
                out[m]["resave"].append({"blocked": blocked, "durable": durable})
    for m in methods:
        savers[m].remove(reps)
        if savers[m].mgr is not None:
            savers[m].mgr.close()
    return out


def job_save_memory(job: dict[str, Any]) -> dict[str, Any]:
    """Peak extra RSS of one save (after a warm-up save, as in a training run), in a fresh process."""
    spec = StateSpec(**job["spec"])
    model, opt = build_state(spec)
    saver = Saver(job["method"], model, opt, Path(job["dir"]))
    saver.save(0)
    saver.remove(0)
    with PeakRSS() as mem:
        saver.save(1)
    saver.remove(1)
    if saver.mgr is not None:
        saver.mgr.close()
    return {"extra_rss": mem.extra}


# ---- restores ---------------------------------------------------------------------------------------


def marker(model: nn.Module) -> float:
    return float(next(model.parameters()).double().sum())


def job_prepare(job: dict[str, Any]) -> dict[str, Any]:
    spec = StateSpec(**job["spec"])
    model, opt = build_state(spec, seed=0)
    saver = Saver(SAVE_FOR[job["method"]], model, opt, Path(job["dir"]))
    saver.save(0)
    if saver.mgr is not None:
        saver.mgr.close()
    return {"path": str(saver.output(0)), "marker": marker(model)}


SAVE_FOR = {
    "ckptguard": "ckptguard_sync",
    "torch_load": "torch_save",
    "safetensors": "safetensors",
    "dcp": "dcp_2threads",
    "raw_read": "raw_write",
}


def job_restore(job: dict[str, Any]) -> dict[str, Any]:
    spec = StateSpec(**job["spec"])
    model, opt = build_state(spec, seed=1)  # same shapes, other values; the optimizer has state
    path, method = job["path"], job["method"]
    raw = raw_buffer(spec.nbytes + 8 * 2 * spec.layers) if method == "raw_read" else None
    if job.get("cold", True):
        evict(path)
    restore: Callable[[], None]
    if method == "ckptguard":
        run = str(Path(path).parent)

        def restore() -> None:
            with cg.CheckpointManager(run, lock=False) as mgr:
                mgr.restore(cg.TrainState(model=model, optimizer=opt))
    elif method == "torch_load":

        def restore() -> None:
            sd = torch.load(path, weights_only=True)
            model.load_state_dict(sd["model"])
            opt.load_state_dict(sd["optim"])
    elif method == "safetensors":

        def restore() -> None:
            from safetensors.torch import load_file

            load_flat(model, opt, load_file(path))
    elif method == "dcp":

        def restore() -> None:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import set_state_dict

            sd = dcp_state(model, opt)
            dcp.load(sd, storage_reader=dcp.FileSystemReader(path))
            set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    else:
        assert raw is not None

        def restore() -> None:
            with open(path, "rb", buffering=0) as f:
                view = memoryview(raw.numpy())
                while len(view):
                    n = f.readinto(view)
                    if not n:
                        break
                    view = view[n:]
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        restore()
        seconds = time.perf_counter() - t0
    ok = method == "raw_read" or abs(marker(model) - job["marker"]) < 1e-6
    return {"seconds": seconds, "extra_rss": mem.extra, "ok": ok}


# ---- training throughput ------------------------------------------------------------------------------


def job_train(job: dict[str, Any]) -> dict[str, Any]:
    """One process, modes interleaved (none, async, sync) for ``cycles`` cycles of ``seconds``
    each, so that load from other jobs on the machine hits every mode alike; steps per second."""
    spec = StateSpec(**job["spec"])
    model, opt = build_state(spec)
    torch.manual_seed(0)
    torch.set_flush_denormal(True)  # else shrinking activations turn denormal and steps slow 5x
    x = torch.randn(job["batch"], spec.width)
    y = torch.randn(job["batch"], spec.width)
    state = cg.TrainState(model=model, optimizer=opt)

    def step() -> None:
        loss = (model(x) - y).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    times = []
    for _ in range(20):  # warm-up, and the step time that sets the save interval
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    step_s = sorted(times[10:])[len(times[10:]) // 2]  # the first steps are slower (allocation)
    every = max(1, round(job["interval"] / step_s))
    out: dict[str, Any] = {"step_seconds": step_s, "every": every, "modes": {"none": [], "async": [], "sync": []}}
    for cycle in range(job["cycles"]):
        for mode in out["modes"]:
            run = Path(job["dir"]) / f"train-{mode}-{cycle}"
            mgr = None
            if mode != "none":
                mgr = cg.CheckpointManager(run, async_save=mode == "async", every_steps=every, retention=cg.Retention(keep_last=1))
                _ = mgr.environment
            steps, saves, blocked = 0, 0, 0.0
            step_times: list[float] = []
            overlapped: list[bool] = []  # a background save was running during the step
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < job["seconds"]:
                busy = mgr is not None and mgr.pending
                s0 = time.perf_counter()
                step()
                step_times.append(time.perf_counter() - s0)
                overlapped.append(busy or (mgr is not None and mgr.pending))
                steps += 1
                if mgr is not None:
                    b0 = time.perf_counter()
                    if mgr.save(steps, state):
                        saves += 1
                        blocked += time.perf_counter() - b0
            elapsed = time.perf_counter() - t0
            if mgr is not None:
                mgr.close()
            shutil.rmtree(run, ignore_errors=True)
            # Time the saves cost this segment, measured inside it (immune to drift between
            # segments): the stalls, plus how much longer the steps that ran beside a background
            # save took than the segment's other steps.
            quiet = [t for t, o in zip(step_times, overlapped) if not o]
            typical = statistics.median(quiet) if quiet else 0.0
            slowed = sum(t - typical for t, o in zip(step_times, overlapped) if o)
            out["modes"][mode].append({
                "rate": steps / elapsed, "saves": saves, "blocked": blocked, "elapsed": elapsed,
                "overlapped_steps": sum(overlapped), "slowed": slowed, "cost": (blocked + slowed) / elapsed,
            })
    return out


JOBS = {"save_timing": job_save_timing, "save_memory": job_save_memory, "prepare": job_prepare, "restore": job_restore, "train": job_train}

if __name__ == "__main__":
    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    spec = json.loads(sys.argv[1])
    print("RESULT " + json.dumps(JOBS[spec["op"]](spec)), flush=True)
