"""The per-request timer that enforces the upstream timeouts (first byte, idle gap, total)."""

from __future__ import annotations

from fortress.core.context import RequestContext
from fortress.core.loops import current_task, running_loop
from fortress.gateway.deadlines import Deadline, Deadlines


class Watchdog:
    """One timer per request for the first-byte, idle-gap and total timeouts.

    ``mark()`` is all the per-chunk work (one clock read); the timer re-arms itself lazily
    instead of being rescheduled on every chunk. On expiry it cancels the request's task and
    records why in ``ctx.cancelled_by``. The timer is one of the relay's coarse ``Deadlines``
    (it fires up to their resolution late), not a loop timer per request.
    """

    __slots__ = ("_handle", "ctx", "deadline", "deadlines", "last", "loop", "phase", "task", "window")

    def __init__(self, ctx: RequestContext, total: float, deadlines: Deadlines) -> None:
        self.deadlines = deadlines
        self.loop = running_loop()
        self.task = current_task()
        self.ctx = ctx
        now = self.loop.time()
        self.deadline = now + total
        self.last = now
        self.window = total
        self.phase = "total"
        self._handle: Deadline | None = None

    def expect(self, window: float, phase: str) -> None:
        """From now on, expect progress within ``window`` seconds (else expire as ``phase``)."""
        self.last = self.loop.time()
        self.window = window
        self.phase = phase
        due = min(self.last + window, self.deadline)
        if self._handle is None or self._handle.when() > due:
            if self._handle is not None:
                self._handle.cancel()
            self._handle = self.deadlines.call_at(due, self._fire)

    def mark(self) -> None:
        self.last = self.loop.time()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        now = self.loop.time()
        due = min(self.last + self.window, self.deadline)
        if now + 1e-3 < due:
            self._handle = self.deadlines.call_at(due, self._fire)
            return
        self._handle = None
        if self.ctx.cancelled_by is None and self.task is not None:
            self.ctx.cancelled_by = "total" if now + 1e-3 >= self.deadline else self.phase
            self.task.cancel()
