"""The protocols the gateway calls and the layers above it implement.

The gateway depends only on these, so access/, audit/ and observe/ never import the gateway and
the gateway never imports them: ``fortress.runtime`` builds the implementations and hands them
in. Each runs on the request path and must not block: key lookups hit an in-memory cache, limits
are in memory or one Redis round trip, an audit record is one group-committed journal append,
and observers only queue or count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from fortress.core.context import RequestContext

# Called with every finished completion request (metrics, access log); must not block.
Observer = Callable[[RequestContext], None]


class AccessLayer(Protocol):
    """API keys and usage plans."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    def authenticate(self, ctx: RequestContext) -> None:
        """Set ``ctx.identity`` from the request's key, or raise a 401 ``GatewayError``."""

    def authorize(self, ctx: RequestContext, model: str) -> None:
        """Raise a 403 ``GatewayError`` when the key may not use ``model``."""

    async def admit(self, ctx: RequestContext) -> None:
        """Apply the usage plan: set ``ctx.ticket`` (and rate-limit headers in
        ``ctx.extra_headers``), or raise a 429 ``GatewayError`` with ``Retry-After``."""

    def admit_now(self, ctx: RequestContext) -> bool:
        """``admit`` without a coroutine when the limiter needs no I/O (True: done, or raised);
        False: nothing was done, await ``admit``."""

    def release(self, ctx: RequestContext) -> None:
        """The request ended: settle reserved tokens with ``ctx.usage``; free its concurrency
        slot. Must not block (schedule any I/O)."""

    async def handle_admin(self, method: str, path: str, body: bytes) -> tuple[int, Any] | None:
        """Serve ``/admin/keys...`` (and plans); None when the path is not the layer's."""

    def stats(self) -> dict[str, Any]:
        """Counters for metrics and alarms: key cache and store reachability, limiter state."""


class AuditLayer(Protocol):
    """The audit trail."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    def begin(self, ctx: RequestContext) -> None:
        """A request whose record will follow has started (the journal's group commit stops
        waiting once every such request has handed its record over)."""

    def end(self, ctx: RequestContext) -> None:
        """The request is over: if it never handed a record over, stop counting it."""

    def check_headers(self, ctx: RequestContext) -> None:
        """Raise a 400 ``GatewayError`` naming the required audit headers that are missing."""

    def check_body(self, ctx: RequestContext) -> None:
        """After the body is parsed: raise a 400 ``GatewayError`` when the end user is in
        neither the header nor (where allowed) the body's ``user`` field."""

    async def record(self, ctx: RequestContext) -> None:
        """Append the request's record to the journal; returns once it is durable."""

    def stats(self) -> dict[str, Any]:
        """Counters for metrics: journal head, fsyncs, what the store has, shipper state."""


class Capacity(Protocol):
    """The fleet, as the gateway sees it: replicas that come and go with demand."""

    async def wait(self, pool: str, model: str) -> None:
        """Return once ``pool`` has a healthy replica, waking it from zero if need be (at once
        for a pool the fleet does not manage). Raises a 503 ``GatewayError`` with Retry-After
        when the pool is stopped, scheduled off, or not awake within its ``wake_timeout``."""

    async def handle_admin(self, method: str, path: str, body: bytes) -> tuple[int, Any] | None:
        """Serve ``/admin/fleet...``; None when the path is not the fleet's."""
