"""The one admin-access rule for /admin/*, /metrics, /alarms and the dashboard.

With ``server.admin_token`` set, a request needs ``Authorization: Bearer <token>`` (or, where
``allow_cookie`` is given, the cookie ``/dashboard?token=...`` sets: a MAC of the token, never the
token itself); without a token, only clients on this machine are served.
"""

from __future__ import annotations

import hashlib
import hmac

from fortress.core.asgi import Scope, cookies, header

COOKIE = "fortress_admin"
LOOPBACK = ("127.0.0.1", "::1")


def cookie_value(token: str) -> str:
    """What the dashboard cookie holds: a MAC of the admin token."""
    return hmac.new(token.encode(), b"fortress-dashboard-cookie", hashlib.sha256).hexdigest()


def admin_allowed(scope: Scope, token: str | None, allow_cookie: bool = False) -> bool:
    """True when the request may use admin endpoints."""
    if token:
        auth = header(scope, b"authorization")
        if auth is not None:
            return hmac.compare_digest(auth, b"Bearer " + token.encode())
        if not allow_cookie:
            return False
        got = cookies(scope).get(COOKIE)
        return got is not None and hmac.compare_digest(got, cookie_value(token))
    client = scope.get("client")
    return bool(client) and client[0] in LOOPBACK
