"""Per-request state carried along the path, and the timer that enforces upstream timeouts."""

from __future__ import annotations

import asyncio
from typing import Any

from fortress.routing.replica import Replica


class RequestContext:
    """What one request learned on its way through the gateway (read later by audit/metrics)."""

    __slots__ = (
        "attempts",
        "body",
        "bytes_in",
        "bytes_out",
        "cancelled_by",
        "chunks",
        "client",
        "error",
        "extra_headers",
        "finished",
        "headers",
        "identity",
        "max_tokens",
        "model",
        "overhead",
        "path",
        "replica",
        "request_id",
        "status",
        "stream",
        "t0",
        "ticket",
        "ttfb",
        "usage",
        "want_usage",
    )

    def __init__(self, request_id: str, path: str, t0: float, client: str | None) -> None:
        self.request_id = request_id
        self.path = path
        self.t0 = t0
        self.client = client
        self.headers: dict[bytes, bytes] = {}
        self.body: dict[str, Any] | None = None
        self.model: str | None = None
        self.stream = False
        self.want_usage = False
        self.max_tokens: int | None = None
        self.replica: Replica | None = None
        self.attempts = 0
        self.status = 0
        self.error: str | None = None
        self.usage: dict[str, Any] | None = None
        self.chunks = 0
        self.ttfb: float | None = None
        self.overhead = 0.0
        self.cancelled_by: str | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        # Set by the access layer: who is calling, and what their usage plan admitted.
        self.identity: Any = None
        self.ticket: Any = None
        # Response headers added by earlier layers (OpenAI rate-limit headers, for example).
        self.extra_headers: list[tuple[bytes, bytes]] = []
        self.finished = False  # the record of this request has been handed to the audit layer


class Watchdog:
    """One timer per request for the first-byte, idle-gap and total timeouts.

    ``mark()`` is all the per-chunk work (one clock read); the timer re-arms itself lazily
    instead of being rescheduled on every chunk. On expiry it cancels the request's task and
    records why in ``ctx.cancelled_by``.
    """

    __slots__ = ("_handle", "ctx", "deadline", "last", "loop", "phase", "task", "window")

    def __init__(self, ctx: RequestContext, total: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()
        self.ctx = ctx
        now = self.loop.time()
        self.deadline = now + total
        self.last = now
        self.window = total
        self.phase = "total"
        self._handle: asyncio.TimerHandle | None = None

    def expect(self, window: float, phase: str) -> None:
        """From now on, expect progress within ``window`` seconds (else expire as ``phase``)."""
        self.last = self.loop.time()
        self.window = window
        self.phase = phase
        due = min(self.last + window, self.deadline)
        if self._handle is None or self._handle.when() > due:
            if self._handle is not None:
                self._handle.cancel()
            self._handle = self.loop.call_at(due, self._fire)

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
            self._handle = self.loop.call_at(due, self._fire)
            return
        self._handle = None
        if self.ctx.cancelled_by is None and self.task is not None:
            self.ctx.cancelled_by = "total" if now + 1e-3 >= self.deadline else self.phase
            self.task.cancel()
