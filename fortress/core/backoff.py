"""The pause of a background writer thread after a failed attempt (the audit shipper, the
fleet's state store): spaced retries that only a stop cuts short, and a bounded last effort."""

from __future__ import annotations

import threading
import time


def pause_after_failure(delay: float, stop: threading.Event, deadline: float | None) -> bool:
    """Wait ``delay`` seconds before the next attempt, woken early only by ``stop``. While
    stopping (``deadline``: the monotonic time to give up) the wait is spaced the same but ends
    by the deadline; False once the deadline has passed (no more attempts)."""
    if deadline is None:
        stop.wait(delay)
        return True
    left = deadline - time.monotonic()
    if left <= 0:
        return False
    time.sleep(min(delay, left))  # the last tries before stopping, still spaced
    return True
