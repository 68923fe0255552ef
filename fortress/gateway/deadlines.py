"""Coarse timers for timeouts that almost never fire.

Every request arms timers that are nearly always cancelled: the relay's watchdog (first byte,
idle gap, total) and the connection's keep-alive timeout. An event loop timer costs a handle,
a heap entry and the cancel (about 5 µs each on uvloop, two per request); these deadlines only
need to fire within a few tens of milliseconds. ``Deadlines`` keeps them in buckets of
``resolution`` seconds (a set each, so a cancel is a set removal) and wakes once per bucket
while any is pending: one loop timer for all of them.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any

RESOLUTION = 0.05  # seconds: a deadline fires at most this late


class Deadline:
    """One pending call; ``cancel()`` it when it is no longer wanted."""

    __slots__ = ("_args", "_bucket", "_callback", "_when")

    def __init__(self, when: float, callback: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._when = when
        self._callback = callback
        self._args = args
        self._bucket: set[Deadline] | None = None

    def when(self) -> float:
        """The loop time it is due at."""
        return self._when

    def cancel(self) -> None:
        bucket = self._bucket
        if bucket is not None:
            self._bucket = None
            bucket.discard(self)

    @property
    def cancelled(self) -> bool:
        return self._bucket is None


class Deadlines:
    """Timers of ``resolution`` precision on the running event loop (see the module doc)."""

    def __init__(self, resolution: float = RESOLUTION) -> None:
        self.resolution = resolution
        self._buckets: dict[int, set[Deadline]] = {}
        self._next: int | None = None  # the bucket the loop timer is armed for
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def call_at(self, when: float, callback: Callable[..., Any], *args: Any) -> Deadline:
        """Call ``callback(*args)`` at loop time ``when`` (up to ``resolution`` later)."""
        d = Deadline(when, callback, args)
        key = math.ceil(when / self.resolution)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = set()
            if self._next is None or key < self._next:
                self._arm(key)
        bucket.add(d)
        d._bucket = bucket
        return d

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> Deadline:
        """Call ``callback(*args)`` in ``delay`` seconds (up to ``resolution`` later)."""
        loop = self._loop or asyncio.get_running_loop()
        return self.call_at(loop.time() + delay, callback, *args)

    def close(self) -> None:
        """Drop every pending deadline and the loop timer."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._next = None
        for bucket in self._buckets.values():
            for d in bucket:
                d._bucket = None
        self._buckets.clear()

    def _arm(self, key: int) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        if self._handle is not None:
            self._handle.cancel()
        self._next = key
        self._handle = loop.call_at(key * self.resolution, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._next = None
        loop = self._loop
        assert loop is not None
        now_key = math.floor(loop.time() / self.resolution + 1e-9)
        due = [k for k in self._buckets if k <= now_key]
        due.sort()
        for key in due:
            bucket = self._buckets.pop(key)
            for d in bucket:
                d._bucket = None
            for d in bucket:
                try:
                    d._callback(*d._args)
                except Exception as exc:  # one failing callback must not stop the others
                    loop.call_exception_handler(
                        {"message": "Exception in a deadline callback", "exception": exc}
                    )
        if self._buckets and self._handle is None:
            self._arm(min(self._buckets))
