"""What one request carries along its path, and the typed pieces layers hand each other.

The gateway creates a ``RequestContext``; the access layer sets ``identity`` and ``ticket``; the
relay sets ``replica`` and the outcome; audit and observe read it when the request ends. The
context is also the *request view* balancers see (``model``, ``session_key``,
``prompt_prefix``): the last two are computed only when a balancer asks for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

SESSION_HEADER = b"x-session-id"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling: the API key the access layer matched (never the key itself)."""

    key_id: str
    key_name: str
    plan: str
    models: frozenset[str]  # empty: every model
    prefix: str

    def allows(self, model: str) -> bool:
        return not self.models or model in self.models


class Ticket(Protocol):
    """What a usage plan reserved for one admitted request (the access layer's own type)."""

    reserved_in: int
    reserved_out: int
    done: bool


class Target(Protocol):
    """The replica that answered, as the layers after routing see it."""

    @property
    def name(self) -> str: ...
    @property
    def url(self) -> str: ...
    @property
    def tier(self) -> str: ...


class RequestContext:
    """What one request learned on its way through the gateway (read later by audit/metrics)."""

    __slots__ = (
        "_prefix",
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
        "responded",
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
        self.replica: Target | None = None
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
        self.identity: Identity | None = None
        self.ticket: Ticket | None = None
        # Response headers added by earlier layers (OpenAI rate-limit headers, for example).
        self.extra_headers: list[tuple[bytes, bytes]] = []
        self.finished = False  # the record of this request has been handed to the audit layer
        self.responded = False  # the response has started: no other replica may answer now
        self._prefix: str | None = None

    # -- the request view balancers read ------------------------------------------------------

    @property
    def session_key(self) -> str | None:
        """The client's session id (``x-session-id``), for session affinity."""
        raw = self.headers.get(SESSION_HEADER)
        return raw.decode("latin-1") if raw else None

    def prompt_prefix(self, limit: int = 4096) -> str:
        """The start of the prompt as text (chat messages as ``role: content`` lines), at most
        ``limit`` characters; computed on first use, for prefix-aware balancers."""
        if self._prefix is None:
            self._prefix = prompt_text(self.body)
        return self._prefix[:limit]


def prompt_text(body: dict[str, Any] | None) -> str:
    """The prompt of a chat or completion body as one string (content parts' text joined)."""
    if not body:
        return ""
    parts: list[str] = []
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                parts.append(f"{m.get('role', '')}: {_content(m.get('content'))}")
    else:
        parts.append(_content(body.get("prompt")))
    return "\n".join(parts)


def _content(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_content(v) if not isinstance(v, int) else f"<{v}>" for v in value)
    if isinstance(value, dict):
        text = value.get("text")
        return text if isinstance(text, str) else ""
    return ""
