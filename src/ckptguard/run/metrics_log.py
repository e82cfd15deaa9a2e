"""RUN/metrics.csv: step, wall time and one column per metric; append-only, crash tolerant.

Rows are buffered and appended at every save (and at least every ``flush_seconds``). A new metric
name rewrites the file once, atomically, with the wider header.

The file reads as the run's true history, one row per step, after any number of crashes:

- A crash can leave a torn last line (no newline). Readers skip it, and the next write drops it
  (rewriting the file atomically without it) instead of appending after it, so a row torn
  mid-number never turns into a valid, wrong row.
- A run killed after logging steps past its last checkpoint leaves rows that the resumed run
  logs again. ``restore`` calls :meth:`MetricsLog.restart_after` with the restored step: the rows
  past it are superseded, and the first write after the restore drops them from the file (a
  manager used only to restore never writes). Readers also keep one row per step (the last one
  written), so the file reads the same before that first write.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from ckptguard.errors import CheckpointError, CorruptCheckpointError
from ckptguard.storage.base import Storage, read_capped

__all__ = ["METRICS_FILE", "MetricsLog", "plain_metrics", "read_columns", "read_metrics"]

METRICS_FILE = "metrics.csv"
BASE = ["step", "wall_time"]
log = logging.getLogger(__name__)
MAX_METRICS_BYTES = 512 * 1024 * 1024  # millions of rows; read whole by plot and new columns
MAX_HEADER_BYTES = 16 * 1024 * 1024  # how far read_columns looks for the end of the header line


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    return str(v)


def _complete_lines(text: str) -> list[str]:
    """The lines of ``text`` that a newline ended (a torn last line is not one of them)."""
    lines = text.split("\n")
    return lines[:-1]  # the part after the last newline is "" or a torn line


def _step_of(line: str, header: list[str]) -> int | None:
    """The step of a data line, or None for a malformed line."""
    row = next(_csv_rows([line]), [])
    if len(row) != len(header) or "step" not in header:
        return None
    try:
        return int(row[header.index("step")])
    except ValueError:
        return None


def read_metrics(storage: Storage) -> tuple[list[str], list[dict[str, Any]]]:
    """(columns, rows) of the run's metrics.csv, one row per step (the last one written wins),
    ordered by step; torn or malformed lines are skipped."""
    if not storage.exists(METRICS_FILE):
        return list(BASE), []
    text = read_capped(storage, METRICS_FILE, MAX_METRICS_BYTES, "a metrics log").decode("utf-8", errors="replace")
    lines = _complete_lines(text)
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
    by_step: dict[int, dict[str, Any]] = {}
    for row in _csv_rows(lines[1:]):
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
        if isinstance(rec.get("step"), int):
            by_step.pop(rec["step"], None)
            by_step[rec["step"]] = rec
    return header, [by_step[s] for s in sorted(by_step)]


def read_columns(storage: Storage) -> list[str]:
    """The columns of the run's metrics.csv, from its header line alone: a resumed run's first
    append must not parse every row of a long run's log (it cost ~15x the file in memory)."""
    if not storage.exists(METRICS_FILE):
        return list(BASE)
    head = bytearray()
    try:
        with storage.open_read(METRICS_FILE) as f:  # regular files only (see the backends)
            while len(head) < MAX_HEADER_BYTES and b"\n" not in head:
                part = f.read(1 << 16)
                if not part:
                    break
                head += part
    except (CheckpointError, OSError):
        head = bytearray()  # read_metrics reports it as it reports every unreadable log
    if b"\n" in head:
        header = next(_csv_rows([head.split(b"\n", 1)[0].decode("utf-8", errors="replace")]), None)
        if header is not None:
            return header
    return read_metrics(storage)[0]  # no complete header line in reach: the whole file decides


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
        self._restart_after: int | None = None  # rows past this step are superseded (a restore)
        self._warned_base = False  # a metric named like a base column: said once

    def restart_after(self, step: int | None) -> None:
        """The run continues from ``step`` (``None``: from scratch): rows logged past it belong
        to an attempt that did not survive. Buffered ones are dropped now; the file's are dropped
        at the next write."""
        last = -1 if step is None else int(step)
        self._pending = [r for r in self._pending if r["step"] <= last]
        self._restart_after = last

    def record(self, step: int, metrics: Mapping[str, Any]) -> None:
        row = {"step": int(step), "wall_time": round(time.time(), 3)}
        for k, v in metrics.items():
            if isinstance(v, bool) or not isinstance(v, (int, float, str)):
                try:
                    v = float(v)  # tensors, numpy scalars
                except (TypeError, ValueError):
                    continue
            name = str(k)
            if name in BASE:  # the row's own step/wall_time stay the run's (crash recovery reads them)
                name = f"metric_{name}"
                if not self._warned_base:
                    self._warned_base = True
                    log.warning(
                        "metrics.csv: a metric named %r would overwrite the run's own %r column; "
                        "it is logged as %r.", k, k, name,
                    )
            row[name] = v
        self._pending.append(row)
        if time.monotonic() - self._last_flush >= self.flush_seconds:
            try:
                self.flush()
            except CheckpointError as e:  # the rows stay pending: the next flush (every save) retries
                log.warning("Could not append to %s (%s); retried at the next save.", self.storage.describe(METRICS_FILE), e)

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
            self._columns = read_columns(self.storage)
        new = [k for r in rows for k in r if k not in self._columns]
        exists = self.storage.exists(METRICS_FILE)
        if new or not exists:
            _, old_rows = read_metrics(self.storage)
            if self._restart_after is not None:
                old_rows = [r for r in old_rows if r["step"] <= self._restart_after]
            self._columns = self._columns + list(dict.fromkeys(new))
            self.storage.replace_file(METRICS_FILE, self._render(old_rows + rows, header=True))
            self._restart_after = None
            return
        if not self._ends_with_newline() or (
            self._restart_after is not None and self._has_rows_past(self._restart_after)
        ):
            self._rewrite_history(rows)
            return
        self._restart_after = None  # nothing past the restored step: a plain append
        self.storage.append(METRICS_FILE, self._render(rows, header=False))

    def _has_rows_past(self, step: int) -> bool:
        """Whether the file holds a complete row past ``step``, read as a stream (a resume of a
        long run neither loads nor rewrites the whole log when nothing lies past the restored step)."""
        header: list[str] | None = None
        carry = b""
        with self.storage.open_read(METRICS_FILE) as f:
            while True:
                block = f.read(1 << 20)
                lines = (carry + block).split(b"\n")
                carry = lines.pop()  # an unfinished line; at the end a torn one, handled elsewhere
                for raw in lines:
                    line = raw.decode("utf-8", errors="replace")
                    if header is None:
                        header = next(_csv_rows([line]), [])
                        continue
                    s = _step_of(line, header)
                    if s is not None and s > step:
                        return True
                if not block:
                    return False

    def _ends_with_newline(self) -> bool:
        size = self.storage.size(METRICS_FILE)
        if size == 0:
            return True
        with self.storage.open_read(METRICS_FILE) as f:
            f.seek(size - 1)
            return f.read(1) == b"\n"

    def _rewrite_history(self, rows: list[dict[str, Any]]) -> None:
        """Atomically rewrite the file without its torn last line and without the rows past the
        restored step (kept byte for byte otherwise), then with ``rows`` appended."""
        text = read_capped(self.storage, METRICS_FILE, MAX_METRICS_BYTES, "a metrics log")
        lines = _complete_lines(text.decode("utf-8", errors="replace"))
        header = next(_csv_rows(lines[:1]), [])
        keep = lines[:1] + [
            ln for ln in lines[1:]
            if self._restart_after is None or ((s := _step_of(ln, header)) is not None and s <= self._restart_after)
        ]
        body = "".join(ln + "\n" for ln in keep).encode() + self._render(rows, header=not keep)
        self.storage.replace_file(METRICS_FILE, body)
        self._restart_after = None

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
