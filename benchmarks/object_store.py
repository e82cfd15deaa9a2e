"""Save / restore of one state to local disk, memory:// and S3 (moto server on 127.0.0.1).

    PYTHONPATH=src python benchmarks/object_store.py --mb 256 --repeat 3

Prints median seconds and MB/s per backend. Needs the dev extra (moto[server], s3fs). moto keeps
objects in its own memory and speaks HTTP over loopback: the S3 figures measure ckptguard's
protocol + s3fs + HTTP overhead, not a real network.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import uuid

import torch

import ckptguard as cg


def state_of(mb: int) -> tuple[cg.TrainState, torch.nn.Module]:
    n = mb * 2**20 // 4 // 4096
    model = torch.nn.Sequential(*[torch.nn.Linear(4096, 64, bias=False) for _ in range(max(1, n // 64))])
    return cg.TrainState(model=model), model


def bench(url: str, mb: int, repeat: int) -> tuple[float, float]:
    saves, loads = [], []
    state, _ = state_of(mb)
    for i in range(repeat):
        run = f"{url}/r{i}"
        with cg.CheckpointManager(run) as mgr:
            t = time.perf_counter()
            mgr.save(1, state, force=True)
            saves.append(time.perf_counter() - t)
        with cg.CheckpointManager(run) as mgr:
            t = time.perf_counter()
            mgr.restore(state)
            loads.append(time.perf_counter() - t)
    return statistics.median(saves), statistics.median(loads)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=256)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"})
    import s3fs

    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    size = state_of(a.mb)[1]
    nbytes = sum(p.numel() * 4 for p in size.parameters())
    with tempfile.TemporaryDirectory() as d:
        for name, url in (("local", d), ("memory://", f"memory://bench-{uuid.uuid4().hex[:6]}"), ("s3 (moto)", f"s3://{bucket}")):
            s, r = bench(url, a.mb, a.repeat)
            print(f"{name:10s} {nbytes / 1e6:7.1f} MB  save {s:6.2f}s ({nbytes / 1e6 / s:7.1f} MB/s)  "
                  f"restore {r:6.2f}s ({nbytes / 1e6 / r:7.1f} MB/s)")
    server.stop()


if __name__ == "__main__":
    main()
