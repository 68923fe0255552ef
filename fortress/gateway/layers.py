"""The layers a completion request crosses after the gateway itself: access, then audit.

Each is optional (``auth.enabled`` / ``audit.enabled`` in config) and built here, so the gateway
depends only on these protocols. Both run on the request path and so must not block: key
lookups hit an in-memory cache, limits are in memory or one Redis round trip, and the audit
record costs one group-committed journal append.
"""

from __future__ import annotations

from typing import Any, Protocol

from fortress.config import FortressConfig
from fortress.gateway.context import RequestContext


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

    def release(self, ctx: RequestContext) -> None:
        """The request ended: settle reserved tokens with ``ctx.usage``; free its concurrency
        slot. Must not block (schedule any I/O)."""

    async def handle_admin(self, method: str, path: str, body: bytes) -> tuple[int, Any] | None:
        """Serve ``/admin/keys...`` (and plans); None when the path is not the layer's."""


class AuditLayer(Protocol):
    """The audit trail."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    def check_headers(self, ctx: RequestContext) -> None:
        """Raise a 400 ``GatewayError`` naming the required audit headers that are missing."""

    async def record(self, ctx: RequestContext) -> None:
        """Append the request's record to the journal; returns once it is durable."""


def build_layers(config: FortressConfig) -> tuple[AccessLayer | None, AuditLayer | None]:
    """The access and audit layers the config asks for."""
    access: AccessLayer | None = None
    audit: AuditLayer | None = None
    if config.auth.enabled:
        from fortress.access.layer import build_access

        access = build_access(config)
    if config.audit.enabled:
        from fortress.audit.layer import build_audit

        audit = build_audit(config)
    return access, audit
