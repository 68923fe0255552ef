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
        "session",
        "status",
        "stream",
        "t0",
        "ticket",
        "ttfb",
        "unrecorded",
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
        self.unrecorded = False  # counted by the audit layer as on its way to the journal
        self.responded = False  # the response has started: no other replica may answer now
        self._prefix: tuple[int, str] | None = None  # (the limit it was cut at, the text)
        # The session key by the pool's `session:` settings, set by the gateway for pools whose
        # balancer is `session` (a header other than the default, or the gateway's cookie);
        # "" when the request has none.
        self.session: str | None = None

    # -- the request view balancers read ------------------------------------------------------

    @property
    def session_key(self) -> str | None:
        """The client's session key, for session affinity: what the gateway resolved by the
        pool's settings, else the ``x-session-id`` header."""
        if self.session is not None:
            return self.session or None  # "": resolved by the pool's settings, and absent
        raw = self.headers.get(SESSION_HEADER)
        return raw.decode("latin-1") if raw else None

    def prompt_prefix(self, limit: int = 4096) -> str:
        """The start of the prompt as text (chat messages as ``role: content`` lines), at most
        ``limit`` characters; computed on first use, for prefix-aware balancers. Messages past
        the first ``limit`` characters are not read."""
        cached = self._prefix
        if cached is None or (cached[0] < limit and len(cached[1]) >= cached[0]):
            cached = self._prefix = (limit, prompt_text(self.body, limit))
        return cached[1][:limit]


def prompt_text(body: dict[str, Any] | None, limit: int | None = None) -> str:
    """The prompt of a chat or completion body as one string (content parts' text joined),
    cut at ``limit`` characters when given (later messages are then not read)."""
    if not body:
        return ""
    parts: list[str] = []
    size = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict):
                part = f"{m.get('role', '')}: {_content(m.get('content'))}"
                parts.append(part)
                size += len(part) + 1
                if limit is not None and size > limit:
                    break
    else:
        parts.append(_content(body.get("prompt")))
    text = "\n".join(parts)
    return text if limit is None else text[:limit]


def _content(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_content(v) if not isinstance(v, int) else f"<{v}>" for v in value)
    if isinstance(value, dict):
        text = value.get("text")
        return text if isinstance(text, str) else ""
    return ""
