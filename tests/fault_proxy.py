"""A fault-injecting HTTP/1.1 proxy on 127.0.0.1, between an S3 client and the moto server.

The client (s3fs, through ``client_kwargs={"endpoint_url": proxy.url}``) talks to the proxy; the
proxy relays each request to the upstream server on a fresh connection, reads the whole response,
and hands it back, unless a :class:`Fault` matches the request. Faults are deterministic: each
names the requests it hits (method, a substring of the path, how many matching requests pass
first, how many it hits), and what happens to them:

- ``reset_before``: the client's connection is reset (RST) before the request reaches the server.
- ``reset_after``: the server processes the request, then the client's connection is reset before
  any of the response is sent (the client cannot know whether a PUT landed).
- ``truncate``: the response headers and ``after_bytes`` bytes of its body are sent, then the
  connection is closed (a response cut mid-transfer).
- ``delay``: the response is sent after ``seconds``.

``down(seconds)`` closes the listening socket (connections are refused, keep-alive connections are
reset) until ``seconds`` have passed or ``up()`` is called.

The proxy is bounded: it stops by itself after ``max_requests`` requests or ``max_seconds``
seconds (then every connection is refused), so a test that goes wrong fails instead of hanging.

>>> with FaultProxy(endpoint, [Fault("truncate", method="GET", path="model", after_bytes=100)]) as p:
...     store = FsspecStorage(url, {"client_kwargs": {"endpoint_url": p.url}})
"""

from __future__ import annotations

import dataclasses
import socket
import struct
import threading
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

__all__ = ["Fault", "FaultProxy"]

KINDS = ("reset_before", "reset_after", "truncate", "delay")


@dataclasses.dataclass
class Fault:
    """What to do to which requests. ``skip`` matching requests pass, the next ``times`` are hit."""

    kind: str
    method: str | None = None
    path: str = ""
    skip: int = 0
    times: int = 1
    after_bytes: int = 0
    seconds: float = 0.0
    seen: int = 0  # matching requests so far
    hits: int = 0  # requests this fault acted on

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; one of {KINDS}")

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and self.path in path

    def take(self, method: str, path: str) -> bool:
        """Count a matching request; True when this one is hit."""
        if not self.matches(method, path):
            return False
        self.seen += 1
        if self.skip < self.seen <= self.skip + self.times:
            self.hits += 1
            return True
        return False


class _Closed(Exception):
    """The peer closed the connection."""


def _read_until(sock: socket.socket, buf: bytearray, marker: bytes, start: int = 0) -> int:
    while True:
        i = buf.find(marker, start)
        if i >= 0:
            return i + len(marker)
        data = sock.recv(65536)
        if not data:
            raise _Closed()
        buf += data


def _read_exact(sock: socket.socket, buf: bytearray, n: int) -> None:
    while len(buf) < n:
        data = sock.recv(max(65536, n - len(buf)))
        if not data:
            raise _Closed()
        buf += data


def _read_message(sock: socket.socket, buf: bytearray, *, response_to: str | None = None) -> tuple[bytes, bytes, bytes]:
    """One HTTP/1.1 message from ``sock`` (``buf`` holds bytes already read): (start line,
    raw head, body as sent). For a response, ``response_to`` is the request method."""
    end = _read_until(sock, buf, b"\r\n\r\n")
    head = bytes(buf[:end])
    del buf[:end]
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        if b":" in line:
            k, v = line.split(b":", 1)
            headers[k.strip().lower()] = v.strip()
    if response_to is None and headers.get(b"expect", b"").lower() == b"100-continue":
        # The client waits for a go-ahead before its body; give it here and relay without it.
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        head = b"\r\n".join(x for x in lines if not x.lower().startswith(b"expect:"))
    if response_to is not None:
        status = int(lines[0].split()[1])
        if response_to == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return lines[0], head, b""
    if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        start = 0
        while True:
            i = _read_until(sock, buf, b"\r\n", start)
            size = int(bytes(buf[start : i - 2]).split(b";")[0], 16)
            _read_exact(sock, buf, i + size + 2)
            start = i + size + 2
            if size == 0:
                break
        body = bytes(buf[:start])
        del buf[:start]
        return lines[0], head, body
    if b"content-length" in headers:
        n = int(headers[b"content-length"])
        _read_exact(sock, buf, n)
        body = bytes(buf[:n])
        del buf[:n]
        return lines[0], head, body
    if response_to is not None:  # no length: the body runs to the end of the connection
        while True:
            data = sock.recv(65536)
            if not data:
                break
            buf += data
        body = bytes(buf)
        buf.clear()
        return lines[0], head, body
    return lines[0], head, b""


def _reset(sock: socket.socket) -> None:
    """Close with RST (not FIN): the peer sees ECONNRESET."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class FaultProxy:
    """See the module docstring. ``log`` records ``(method, path, action)`` per request."""

    def __init__(
        self,
        upstream: str,
        faults: Iterable[Fault] = (),
        *,
        max_requests: int = 5000,
        max_seconds: float = 300.0,
    ) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", int(parts.port or 80))
        self.faults = list(faults)
        self.max_requests = max_requests
        self.deadline = time.monotonic() + max_seconds
        self.log: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._port = 0
        self._down_until = 0.0
        self._stopped = threading.Event()
        self._conns: set[socket.socket] = set()
        self._thread: threading.Thread | None = None

    # ---- control --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}"

    def start(self) -> FaultProxy:
        self._listen()
        self._thread = threading.Thread(target=self._accept_loop, name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            for c in list(self._conns):
                _reset(c)
            self._conns.clear()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add(self, *faults: Fault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def down(self, seconds: float) -> None:
        """Refuse connections (and reset open ones) for ``seconds``."""
        with self._lock:
            self._down_until = time.monotonic() + seconds
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            for c in list(self._conns):
                _reset(c)
            self._conns.clear()

    def up(self) -> None:
        with self._lock:
            self._down_until = 0.0

    def actions(self, action: str) -> list[tuple[str, str]]:
        with self._lock:
            return [(m, p) for m, p, a in self.log if a == action]

    # ---- machinery ------------------------------------------------------------------------

    def _listen(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self._port))
        s.listen(64)
        s.settimeout(0.05)
        self._port = s.getsockname()[1]
        self._listener = s

    def _expired(self) -> bool:
        return time.monotonic() > self.deadline or len(self.log) >= self.max_requests

    def _accept_loop(self) -> None:
        while not self._stopped.is_set():
            if self._expired():
                self.stop_async()
                return
            with self._lock:
                listener = self._listener
                if listener is None and time.monotonic() >= self._down_until:
                    self._listen()
                    listener = self._listener
            if listener is None:
                time.sleep(0.02)
                continue
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(None)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def stop_async(self) -> None:
        threading.Thread(target=self.stop, daemon=True).start()

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            hit = None
            for f in self.faults:
                if f.take(method, path) and hit is None:
                    hit = f
            return hit

    def _record(self, method: str, path: str, action: str) -> None:
        with self._lock:
            self.log.append((method, path, action))

    def _serve(self, conn: socket.socket) -> None:
        buf = bytearray()
        try:
            while not self._stopped.is_set():
                try:
                    line, head, body = _read_message(conn, buf)
                except _Closed:
                    return
                method, path = line.decode("latin-1").split()[:2]
                if time.monotonic() < self._down_until or self._expired():
                    self._record(method, path, "down" if time.monotonic() < self._down_until else "refused")
                    _reset(conn)
                    return
                fault = self._fault_for(method, path)
                kind = fault.kind if fault is not None else "pass"
                self._record(method, path, kind)
                if kind == "reset_before":
                    _reset(conn)
                    return
                response_head, response_body = self._relay(method, head + body)
                if kind == "reset_after":
                    _reset(conn)
                    return
                if kind == "truncate":
                    assert fault is not None
                    conn.sendall(response_head + response_body[: fault.after_bytes])
                    conn.shutdown(socket.SHUT_WR)
                    conn.close()
                    return
                if kind == "delay":
                    assert fault is not None
                    time.sleep(fault.seconds)
                conn.sendall(response_head + response_body)
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            try:
                conn.close()
            except OSError:
                pass

    def _relay(self, method: str, request: bytes) -> tuple[bytes, bytes]:
        with socket.create_connection(self.upstream, timeout=60) as up:
            up.sendall(request)
            buf = bytearray()
            _, head, body = _read_message(up, buf, response_to=method)
            return head, body
