"""Retrying transient storage errors with exponential backoff and full jitter.

>>> policy = RetryPolicy(attempts=5, base_delay=0.2, max_delay=10.0)
>>> data = policy.call(fs.cat_file, "bucket/run/metrics.csv")

Only transient failures are retried (timeouts, dropped connections, throttling, 5xx-style I/O
errors). A missing object, a permission problem or a bad argument fails at once: retrying cannot
fix them and would only delay the error message.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["NO_RETRY", "RetryPolicy", "is_transient"]

log = logging.getLogger(__name__)
T = TypeVar("T")
_JITTER = random.Random()  # never the global generator: a retry must not shift the user's random stream

_PERMANENT = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
    ValueError,
    TypeError,
    KeyError,
    NotImplementedError,
)
_TRANSIENT_ERRNOS = frozenset(
    {errno.EIO, errno.EBUSY, errno.EAGAIN, errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED,
     errno.ETIMEDOUT, errno.EPIPE, errno.ENETUNREACH, errno.EHOSTUNREACH}
)
# Exception class names (botocore, aiohttp, gcsfs...) that mean "try again", matched in the MRO
# so that optional client libraries need not be imported here.
_TRANSIENT_NAMES = (
    "Timeout", "ConnectionError", "ConnectionClosed", "EndpointConnection", "IncompleteRead",
    "Throttl", "SlowDown", "ServiceUnavailable", "InternalError", "ClientPayloadError",
    "ServerDisconnected", "ResponseParserError", "RetryError", "HTTPClientError", "ResponseStreaming",
)


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same call later may succeed."""
    from ckptguard.errors import CheckpointError

    if isinstance(exc, CheckpointError) or isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    names = [cls.__name__ for cls in type(exc).__mro__]
    if any(key in name for name in names for key in _TRANSIENT_NAMES):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _TRANSIENT_ERRNOS
    return False


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry a storage primitive.

    ``attempts`` counts the first try (1 = no retry). The delay before retry ``k`` (1-based) is
    drawn uniformly from ``[0, min(max_delay, base_delay * 2**(k-1))]`` ("full jitter"), so many
    writers that failed together do not retry together.
    """

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 10.0

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be an int >= 1, got {self.attempts!r}")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError(
                f"RetryPolicy delays must be >= 0, got base_delay={self.base_delay}, max_delay={self.max_delay}"
            )
        if self.max_delay < self.base_delay:
            raise ValueError(
                f"RetryPolicy.max_delay ({self.max_delay}) must be >= base_delay ({self.base_delay})"
            )

    def delay(self, retry: int, rng: random.Random | None = None) -> float:
        """Seconds to sleep before retry number ``retry`` (1-based)."""
        cap = min(self.max_delay, self.base_delay * (2 ** (retry - 1)))
        return (rng or _JITTER).uniform(0.0, cap)

    def call(
        self,
        fn: Callable[..., T],
        *args: object,
        what: str = "",
        sleep: Callable[[float], None] = time.sleep,
        **kwargs: object,
    ) -> T:
        """Call ``fn(*args, **kwargs)``, retrying transient errors; the last error propagates."""
        for attempt in range(1, self.attempts + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if attempt >= self.attempts or not is_transient(e):
                    raise
                pause = self.delay(attempt)
                log.warning(
                    "Transient storage error%s (attempt %d of %d): %s; retrying in %.2fs",
                    f" while {what}" if what else "", attempt, self.attempts, e, pause,
                )
                sleep(pause)
        raise AssertionError("unreachable")  # pragma: no cover


NO_RETRY = RetryPolicy(attempts=1, base_delay=0.0, max_delay=0.0)
