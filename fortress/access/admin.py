"""The admin API for keys and plans: ``/admin/keys[/{id}[/rotate]]`` and ``/admin/plans``.

Reached only after the gateway has checked admin access. Database calls run in a thread; the
local key cache is re-synced after every write so the change is visible here at once (other
gateways see it within ``auth.cache_refresh`` seconds).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any, Protocol

import orjson

from fortress.access.keys import KeyCache, KeyStore
from fortress.access.plans import Plan
from fortress.config import FortressConfig
from fortress.core.errors import error_object


class KeyAdmin(Protocol):
    """What the admin API needs of the access layer (``access.layer.AccessControl``)."""

    config: FortressConfig
    plans: Mapping[str, Plan]
    store: KeyStore
    cache: KeyCache

    async def usage(self, plan_name: str, key_id: str) -> dict[str, Any] | None: ...


def _error(status: int, message: str, code: str | None = None, param: str | None = None) -> tuple[int, Any]:
    return status, error_object(message, "invalid_request_error", code, param)


def _not_found(key_id: str) -> tuple[int, Any]:
    return _error(404, f"No API key with id {key_id!r}.", "key_not_found")


def _json(body: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


async def handle(access: KeyAdmin, method: str, path: str, body: bytes) -> tuple[int, Any] | None:
    """Answer an admin request, or None when the path is not about keys or plans."""
    if path == "/admin/plans":
        if method != "GET":
            return _error(405, "Use GET for /admin/plans.")
        return 200, {"object": "list", "data": [p.describe() for p in access.plans.values()]}
    if path != "/admin/keys" and not path.startswith("/admin/keys/"):
        return None
    store = access.store
    if path == "/admin/keys":
        if method == "GET":
            return 200, {"object": "list", "data": await asyncio.to_thread(store.list)}
        if method == "POST":
            return await _create(access, body)
        return _error(405, "Use GET or POST for /admin/keys.")
    rest = path[len("/admin/keys/") :].strip("/")
    key_id, _, action = rest.partition("/")
    if action == "rotate":
        if method != "POST":
            return _error(405, "Use POST to rotate a key.")
        req = _json(body)
        if req is None:
            return _error(400, "The body must be a JSON object.")
        grace = req.get("grace", access.config.auth.rotation_grace)
        if not isinstance(grace, int | float) or grace < 0:
            return _error(400, "'grace' must be a number of seconds >= 0.", param="grace")
        try:
            done = await asyncio.to_thread(store.rotate, key_id, float(grace))
        except ValueError as exc:
            return _error(409, str(exc), "key_revoked")
        if done is None:
            return _not_found(key_id)
        await access.cache.sync()
        return 200, {**done[1], "key": done[0]}
    if action:
        return _error(404, f"Unknown path {method} {path}.", "not_found")
    if method == "GET":
        record = await asyncio.to_thread(store.get, key_id)
        if record is None:
            return _not_found(key_id)
        try:
            usage = await access.usage(record["plan"], key_id)
        except Exception as exc:  # the limiter's store (Redis) is out: the key without usage
            return 200, {**record, "usage": None, "usage_error": str(exc)}
        return 200, {**record, "usage": usage}
    if method == "DELETE":
        record = await asyncio.to_thread(store.revoke, key_id)
        if record is None:
            return _not_found(key_id)
        await access.cache.sync()
        return 200, record
    return _error(405, "Use GET or DELETE for /admin/keys/{id}.")


async def _create(access: KeyAdmin, body: bytes) -> tuple[int, Any]:
    req = _json(body)
    if req is None:
        return _error(400, "The body must be a JSON object: {name, plan, models}.")
    name = req.get("name")
    plan = req.get("plan", "default")
    models = req.get("models") or []
    if not isinstance(name, str) or not name.strip():
        return _error(400, "'name' is required.", param="name")
    if plan not in access.plans:
        known = ", ".join(sorted(access.plans))
        return _error(400, f"No plan named {plan!r}; plans: {known}.", "plan_not_found", "plan")
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        return _error(400, "'models' must be a list of model names.", param="models")
    key, record = await asyncio.to_thread(access.store.create, name.strip(), plan, models)
    await access.cache.sync()
    return 201, {**record, "key": key}
