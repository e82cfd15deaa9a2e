"""RUN/metrics.csv: step, wall time and one column per metric; append-only, crash tolerant.

Rows are buffered and appended at every save (and at least every ``flush_seconds``). A new metric
name rewrites the file once, atomically, with the wider header. A crash can leave a torn last
line; readers skip it and the next append starts on a fresh line.
"""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ckptguard.errors import CheckpointError, CorruptCheckpointError
from ckptguard.storage.base import Storage, read_capped

__all__ = ["METRICS_FILE", "MetricsLog", "plain_metrics", "read_metrics"]

METRICS_FILE = "metrics.csv"
BASE = ["step", "wall_time"]
MAX_METRICS_BYTES = 512 * 1024 * 1024  # millions of rows; read whole by plot and new columns


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return str(v)


def read_metrics(storage: Storage) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of the run's metrics.csv; torn or malformed lines are skipped."""
    if not storage.exists(METRICS_FILE):
        return list(BASE), []
    text = read_capped(storage, METRICS_FILE, MAX_METRICS_BYTES, "a metrics log").decode("utf-8", errors="replace")
    lines = text.splitlines()
    if not lines:
        return list(BASE), []
    header = next(_csv_rows(lines[:1]), None)
    if header is None:
        where = storage.describe(METRICS_FILE)
        raise CorruptCheckpointError(
            f"{where}: the header line is not CSV (a field over {csv.field_size_limit()} characters?). "
            "Move the file away; the next save writes a new one.",
            path=where,
        )
    rows = []
    complete = lines if text.endswith("\n") else lines[:-1]
    for row in _csv_rows(complete[1:]):
        if len(row) != len(header):
            continue
        rec: dict[str, Any] = {}
        for k, v in zip(header, row):
            if v == "":
                continue
            try:
                rec[k] = int(v) if k == "step" else float(v)
            except ValueError:
                rec[k] = v
        if "step" in rec:
            rows.append(rec)
    return header, rows


def _csv_rows(lines: list[str]) -> Iterator[list[str]]:
    """Each line parsed alone: a malformed one (a field over csv's size limit) is skipped."""
    for line in lines:
        try:
            yield from csv.reader([line])
        except csv.Error:
            continue


class MetricsLog:
    def __init__(self, storage: Storage, *, flush_seconds: float = 10.0) -> None:
        self.storage = storage
        self.flush_seconds = flush_seconds
        self._columns: list[str] | None = None
        self._pending: list[dict[str, Any]] = []
        self._last_flush = time.monotonic()

    def record(self, step: int, metrics: Mapping[str, Any]) -> None:
        row = {"step": int(step), "wall_time": round(time.time(), 3)}
        for k, v in metrics.items():
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                try:
                    v = float(v)  # tensors, numpy scalars
                except (TypeError, ValueError):
                    continue
            row[str(k)] = v
        self._pending.append(row)
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        self._last_flush = time.monotonic()
        try:
            self._write(rows)
        except CheckpointError:
            self._pending = rows + self._pending
            raise

    def _write(self, rows: list[dict[str, Any]]) -> None:
        if self._columns is None:
            self._columns = read_metrics(self.storage)[0] if self.storage.exists(METRICS_FILE) else list(BASE)
        new = [k for r in rows for k in r if k not in self._columns]
        if new or not self.storage.exists(METRICS_FILE):
            _, old_rows = read_metrics(self.storage)
            self._columns = self._columns + list(dict.fromkeys(new))
            self.storage.replace_file(METRICS_FILE, self._render(old_rows + rows, header=True))
            return
        raw = self.storage.read_bytes(METRICS_FILE)[-1:] if self._needs_newline_check() else b"\n"
        prefix = b"" if raw in (b"\n", b"") else b"\n"
        self.storage.append(METRICS_FILE, prefix + self._render(rows, header=False))

    def _needs_newline_check(self) -> bool:
        return True

    def _render(self, rows: list[dict[str, Any]], *, header: bool) -> bytes:
        assert self._columns is not None
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        if header:
            w.writerow(self._columns)
        for r in rows:
            w.writerow([_fmt(r[c]) if c in r else "" for c in self._columns])
        return buf.getvalue().encode()


def plain_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metrics as JSON-able values (tensors and numpy scalars to numbers, non-finite to text)."""
    out: dict[str, Any] = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool):
            out[str(k)] = v
        elif isinstance(v, (int, float)):
            out[str(k)] = v if v == v and abs(v) != float("inf") else str(v)
        elif isinstance(v, str):
            out[str(k)] = v
        else:
            try:
                out[str(k)] = float(v)
            except (TypeError, ValueError):
                continue
    return out
