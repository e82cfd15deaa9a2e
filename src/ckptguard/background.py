"""At most one save in flight on a background thread, its error kept for the next call.

The manager hands a committed-save job to :class:`BackgroundSaves`; ``result()`` waits for it and
raises its failure as :class:`~ckptguard.errors.AsyncSaveError` (the cause chained);
``raise_if_failed()`` does the same without waiting when the job has already ended.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable
from typing import Any

from ckptguard.errors import AsyncSaveError
from ckptguard.parallel_io import lower_thread_priority

__all__ = ["BackgroundSaves"]


class BackgroundSaves:
    def __init__(self, url: str) -> None:
        self.url = url
        self.executor: cf.ThreadPoolExecutor | None = None
        self.pending: cf.Future[Any] | None = None
        self._error: BaseException | None = None

    @property
    def busy(self) -> bool:
        return self.pending is not None and not self.pending.done()

    def submit(self, job: Callable[..., Any], *args: Any) -> None:
        if self.executor is None:
            self.executor = cf.ThreadPoolExecutor(1, thread_name_prefix="ckptguard-save", initializer=lower_thread_priority)
        self.pending = self.executor.submit(job, *args)

    def result(self) -> None:
        """Wait for the job in flight (if any); raise its failure."""
        fut, self.pending = self.pending, None
        if fut is not None:
            try:
                fut.result()
            except BaseException as e:  # noqa: BLE001 - re-raised as AsyncSaveError
                self._error = e
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        """Raise a failure already known (or of a job that has ended), without waiting."""
        if self.pending is not None and self.pending.done():
            self.result()
            return
        err, self._error = self._error, None
        if err is not None:
            raise AsyncSaveError(
                f"A background save to {self.url} failed: {err}. The checkpoints already "
                "committed are intact; fix the cause and save again."
            ) from err

    def shutdown(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)
