"""Progress bars appear only for work that outlasts the delay, and vanish when it ends."""

from __future__ import annotations

import threading

from ckptguard.cli.progress import delayed_progress


def test_quick_work_shows_no_bar() -> None:
    with delayed_progress("quick", 100, delay=60.0) as advance:
        advance(100)
    assert not advance.shown


def test_slow_work_shows_a_bar_after_the_delay() -> None:
    with delayed_progress("slow", 10, delay=0.01) as advance:
        appeared = threading.Event()
        for _ in range(3000):  # until the timer thread has started the bar (no timing asserted)
            if advance.shown:
                appeared.set()
                break
            appeared.wait(0.01)
        advance(10, description="slow done")
    assert appeared.is_set()
