"""Small ASGI helpers for the observability endpoints: answers, query strings, admin access.

Access follows the gateway's admin rule: with ``server.admin_token`` set, a request needs
``Authorization: Bearer <token>`` (or, for the dashboard in a browser, the cookie that
``/dashboard?token=...`` sets); without a token, only clients on this machine are served.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

import orjson

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

COOKIE = "fortress_admin"
_LOOPBACK = ("127.0.0.1", "::1")


def cookie_value(token: str) -> str:
    """What the dashboard cookie holds: a MAC of the admin token, never the token itself."""
    return hmac.new(token.encode(), b"fortress-dashboard-cookie", hashlib.sha256).hexdigest()


def header(scope: Scope, name: bytes) -> bytes | None:
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


def admin_allowed(scope: Scope, token: str | None) -> bool:
    """The gateway's admin rule, plus the dashboard cookie."""
    if token:
        auth = header(scope, b"authorization")
        if auth is not None:
            return hmac.compare_digest(auth, b"Bearer " + token.encode())
        got = cookies(scope).get(COOKIE)
        return got is not None and hmac.compare_digest(got, cookie_value(token))
    client = scope.get("client")
    return bool(client) and client[0] in _LOOPBACK


async def respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type.encode()),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def respond_json(send: Send, status: int, obj: Any) -> None:
    await respond(send, status, orjson.dumps(obj), "application/json", [(b"cache-control", b"no-store")])


async def forbidden(send: Send) -> None:
    body = {
        "error": {
            "message": "Admin access needs the admin token (Authorization: Bearer ...).",
            "type": "authentication_error",
            "param": None,
            "code": None,
        }
    }
    await respond_json(send, 401, body)


async def not_found(send: Send, path: str) -> None:
    body = {
        "error": {
            "message": f"Unknown path {path}.",
            "type": "invalid_request_error",
            "param": None,
            "code": "not_found",
        }
    }
    await respond_json(send, 404, body)
