"""ASGI types and the few responders every HTTP surface of Fortress uses."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import orjson

from fortress.core.errors import GatewayError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Handler = Callable[[Scope, Receive, Send], Awaitable[None]]

_JSON = b"application/json"


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower case) in ``scope``."""
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def cookies(scope: Scope) -> dict[str, str]:
    raw = header(scope, b"cookie")
    out: dict[str, str] = {}
    if raw:
        for part in raw.decode("latin-1").split(";"):
            name, _, value = part.strip().partition("=")
            if name:
                out[name] = value
    return out


def query(scope: Scope) -> dict[str, str]:
    qs = scope.get("query_string", b"").decode("latin-1")
    return {k: v[-1] for k, v in parse_qs(qs).items()}


async def respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes | str = _JSON,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """A whole response with a content length."""
    ctype = content_type.encode() if isinstance(content_type, str) else content_type
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", ctype),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def respond_json(
    send: Send, status: int, obj: Any, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await respond(send, status, orjson.dumps(obj), _JSON, headers)


async def respond_error(
    send: Send, err: GatewayError, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """An OpenAI-format error answer (no request context involved: admin and operational routes)."""
    await respond(send, err.status, err.body(), _JSON, [*(headers or []), *err.headers])
