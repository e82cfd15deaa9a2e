"""Checksum candidates on 1 GiB: which one can run while writing without slowing the save.

    PYTHONPATH=src python benchmarks/checksums.py [--mib 1024] [--repeats 5]

Hashes the same in-memory buffer in 16 MiB chunks (how tensorfile.py streams) and in one call,
and prints a table of GB/s (GB = 1e9 bytes, median of the repeats). No files are touched.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time
import zlib
from collections.abc import Callable

import numpy as np
import xxhash

try:
    import crc32c as _crc32c
except ImportError:  # optional candidate
    _crc32c = None

CHUNK = 16 * 1024 * 1024


def candidates() -> dict[str, Callable[[list[memoryview]], object]]:
    def xxh3_128(parts: list[memoryview]) -> object:
        h = xxhash.xxh3_128()
        for p in parts:
            h.update(p)
        return h.hexdigest()

    def sha256(parts: list[memoryview]) -> object:
        h = hashlib.sha256()
        for p in parts:
            h.update(p)
        return h.hexdigest()

    def zlib_crc32(parts: list[memoryview]) -> object:
        c = 0
        for p in parts:
            c = zlib.crc32(p, c)
        return c

    out = {"xxh3-128 (xxhash)": xxh3_128}
    if _crc32c is not None:
        def crc32c(parts: list[memoryview]) -> object:
            c = 0
            for p in parts:
                c = _crc32c.crc32c(p, c)
            return c

        out["crc32c (crc32c, hw)"] = crc32c
    out["zlib.crc32"] = zlib_crc32
    out["sha256 (hashlib)"] = sha256
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    n = args.mib * 1024 * 1024
    buf = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)
    view = memoryview(buf).cast("B")
    chunked = [view[i : i + CHUNK] for i in range(0, n, CHUNK)]
    whole = [view]
    print(f"{args.mib} MiB buffer, {args.repeats} repeats, median GB/s (1 GB = 1e9 bytes)")
    print(f"{'checksum':<22}{'16 MiB chunks':>15}{'one call':>12}{'s per GiB':>12}")
    for name, fn in candidates().items():
        rates = {}
        for label, parts in (("chunks", chunked), ("whole", whole)):
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn(parts)
                times.append(time.perf_counter() - t0)
            rates[label] = n / statistics.median(times) / 1e9
        print(f"{name:<22}{rates['chunks']:>15.2f}{rates['whole']:>12.2f}{(1 << 30) / 1e9 / rates['chunks']:>12.3f}")


if __name__ == "__main__":
    main()
