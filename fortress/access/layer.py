"""The access layer the gateway calls: who is calling (API key), may they use this model, and
does their usage plan admit one more request.

Per request this costs one HMAC, a dict lookup and either an in-memory limiter call or one
Redis EVALSHA; the database is only read by the key cache's background task.

The gateway starts and serves while the store is down: the key cache migrates and syncs in the
background (retrying), starting from its snapshot of the keys it knew. Until the store has been
read again, a key the cache does not know gets 503 ``key_store_unavailable``, never 401: it may
have been created meanwhile.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from fortress.access import admin
from fortress.access.keys import KeyCache, KeyStore
from fortress.access.limits import Decision, Limiter, MemoryLimiter
from fortress.access.plans import Plan
from fortress.config import FortressConfig, UsagePlan
from fortress.core.context import RequestContext
from fortress.core.errors import GatewayError
from fortress.core.secret import load_secret
from fortress.store.db import database_url, get_engine, migrate

KEY_CACHE_SNAPSHOT = "key-cache.json"
KEY_STORE_RETRY_AFTER = 5

log = logging.getLogger("fortress.access")

_WWW_AUTH = [(b"www-authenticate", b'Bearer realm="fortress"')]
MISSING_KEY = (
    "You didn't provide an API key. Send it in an Authorization header using Bearer auth "
    "(Authorization: Bearer YOUR_KEY) or in an x-api-key header. Ask your administrator for a key "
    "(fortress keys create)."
)


def _mask(key: bytes) -> str:
    text = key.decode("latin-1")
    if len(text) < 16:
        return "****"
    return f"{text[:7]}****{text[-4:]}"


def _invalid_key(key: bytes) -> GatewayError:
    return GatewayError(
        401,
        f"Incorrect API key provided: {_mask(key)}. Check the key, or ask for a new one if it was "
        "revoked or rotated.",
        "invalid_request_error",
        "invalid_api_key",
        headers=_WWW_AUTH,
    )


def _reservation(ctx: RequestContext, plan: Plan) -> tuple[int, int]:
    """Input and output tokens a request reserves under ``plan`` until its usage is known."""
    out = ctx.max_tokens if ctx.max_tokens is not None else plan.default_max_tokens
    reserve_out = out if plan.limits_output else 0
    reserve_in = ctx.bytes_in // 4 if plan.limits_input else 0  # ~4 bytes per token
    return reserve_in, reserve_out


def _store_unavailable() -> GatewayError:
    return GatewayError(
        503,
        "This API key is not among the keys this gateway knows, and the key store cannot be "
        "read right now to check it (a key created recently may be valid). Please try again shortly.",
        "service_unavailable",
        "key_store_unavailable",
        headers=[(b"retry-after", str(KEY_STORE_RETRY_AFTER).encode())],
    )


class AccessControl:
    """API keys and usage plans for one gateway process (implements ``AccessLayer``)."""

    def __init__(self, config: FortressConfig, limiter: Limiter | None = None) -> None:
        self.config = config
        self.plans = {name: Plan.compile(name, p) for name, p in config.plans.items()}
        self.url = database_url(config)
        self.store = KeyStore(get_engine(self.url), load_secret(config))
        self.cache = KeyCache(
            self.store,
            config.auth.cache_refresh,
            snapshot=Path(config.state_dir).expanduser() / KEY_CACHE_SNAPSHOT,
            prepare=lambda: migrate(self.url),  # before the first sync, retried until it works
            source=make_url(self.url).render_as_string(hide_password=True),
        )
        self.limiter: Limiter = limiter or _limiter(config)
        # The memory backend answers without awaiting anything: skip the coroutine.
        self._admit_now = self.limiter.admit_now if isinstance(self.limiter, MemoryLimiter) else None

    async def start(self) -> None:
        """Start the limiter and the key cache. The store being down is not fatal: the cache
        serves its snapshot and keeps retrying (migration first) in the background."""
        if not self.config.auth.secret and make_url(self.url).get_backend_name() != "sqlite":
            log.warning(
                "auth.secret is not set: keys are hashed with %s/secret. Gateways sharing this database "
                "must share that secret (set auth.secret / FORTRESS__AUTH__SECRET on each).",
                self.config.state_dir,
            )
        await self.limiter.start()
        await self.cache.start()

    async def stop(self) -> None:
        await self.cache.stop()
        await self.limiter.stop()

    # -- the request path ------------------------------------------------------------------

    def authenticate(self, ctx: RequestContext) -> None:
        headers = ctx.headers
        key: bytes | None = None
        auth = headers.get(b"authorization")
        if auth is not None and auth[:7].lower() == b"bearer ":
            key = auth[7:].strip()
        if not key:
            key = headers.get(b"x-api-key")
        if not key:
            msg = MISSING_KEY
            if auth is not None:
                msg = "The Authorization header must be 'Bearer YOUR_KEY'. " + msg
            raise GatewayError(401, msg, "invalid_request_error", None, headers=_WWW_AUTH)
        record = self.cache.lookup(key)
        if record is None:
            if not self.cache.reachable:
                raise _store_unavailable()
            raise _invalid_key(key)
        ctx.identity = record

    def authorize(self, ctx: RequestContext, model: str) -> None:
        record = ctx.identity
        assert record is not None  # authenticate() ran first
        if record.models and model not in record.models:
            raise GatewayError(
                403,
                f"This API key may not use the model '{model}'. Allowed: {', '.join(sorted(record.models))}.",
                "invalid_request_error",
                "model_not_allowed",
                "model",
            )
        if record.plan not in self.plans:
            raise GatewayError(
                403,
                f"This API key's usage plan '{record.plan}' is not configured on this gateway.",
                "invalid_request_error",
                "plan_not_found",
            )

    def admit_now(self, ctx: RequestContext) -> bool:
        if self._admit_now is None:
            return False
        record = ctx.identity
        assert record is not None
        plan = self.plans[record.plan]
        reserve_in, reserve_out = _reservation(ctx, plan)
        self._apply(ctx, self._admit_now(record.key_id, plan, reserve_in, reserve_out))
        return True

    async def admit(self, ctx: RequestContext) -> None:
        if self.admit_now(ctx):
            return
        record = ctx.identity
        assert record is not None
        plan = self.plans[record.plan]
        reserve_in, reserve_out = _reservation(ctx, plan)
        try:
            decision = await self.limiter.admit(record.key_id, plan, reserve_in, reserve_out)
        except Exception as exc:  # LimiterUnavailable with limits.fail_open off
            raise GatewayError(
                503,
                f"The rate limiter is unavailable: {exc}",
                "service_unavailable",
                "limiter_unavailable",
                headers=[(b"retry-after", b"1")],
            ) from None
        self._apply(ctx, decision)

    @staticmethod
    def _apply(ctx: RequestContext, decision: Decision) -> None:
        if decision.ticket is None:
            raise GatewayError(
                429, decision.message(), decision.kind(), "rate_limit_exceeded", headers=decision.headers()
            )
        ctx.ticket = decision.ticket
        ctx.extra_headers.extend(decision.headers())

    def release(self, ctx: RequestContext) -> None:
        ticket = ctx.ticket
        if ticket is None or ticket.done:
            return
        usage = ctx.usage
        plan = self.plans.get(ticket.plan.name)
        if plan is not ticket.plan and (plan is None or _shape(plan) != _shape(ticket.plan)):
            # Admitted under a plan a reload has since reshaped: its counters no longer line up
            # with the key's, so settle as reserved (the slot is freed, no token correction).
            self.limiter.settle(ticket, ticket.reserved_in, ticket.reserved_out)
            return
        if usage:
            used_in = _int(usage.get("prompt_tokens"))
            used_out = _int(usage.get("completion_tokens"))
        elif ctx.bytes_out > 0 and (ctx.status == 200 or (ctx.stream and ctx.responded)):
            # An answer went out but its usage is unknown (a stream cut by the client, 499, or by
            # the replica, 502, after its first event): keep the reservation.
            used_in, used_out = ticket.reserved_in, ticket.reserved_out
        else:
            used_in = used_out = 0  # nothing was generated
        self.limiter.settle(ticket, used_in, used_out)

    # -- reload ----------------------------------------------------------------------------

    def reload_plans(self, plans: dict[str, UsagePlan]) -> list[str]:
        """Apply reloaded usage plans; the next request of a key is admitted under its plan's
        new limits. Returns the names of the plans added, changed or removed (sorted).

        What a key has used stays counted: a plan whose counters changed shape (a quota added
        or removed) has each key's counters carried over by metric and period.
        """
        compiled = {name: Plan.compile(name, p) for name, p in plans.items()}
        changed = sorted(
            name
            for name in compiled.keys() | self.plans.keys()
            if name not in compiled or name not in self.plans or compiled[name] != self.plans[name]
        )
        for name in changed:
            old, new = self.plans.get(name), compiled.get(name)
            if old is not None and new is not None and old.counters != new.counters:
                for limiter in _memory_limiters(self.limiter):
                    _reshape(limiter, old, new)
        self.plans = compiled
        return changed

    async def resync_keys(self) -> bool:
        """Read the key store now rather than at the next refresh (a reload). True when the
        cache changed; raises when the store cannot be read (the cache keeps its keys)."""
        return await self.cache.sync()

    # -- state -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """The access layer's state as a plain dict (for metrics and alarms).

        ``key_store_reachable``: the last read of the key store worked; ``key_cache_age_seconds``:
        how old the cached keys are (None before any were read or loaded); ``keys_cached``:
        active keys in the cache; ``key_store_error``: why the last read failed. The limiter's
        own ``stats()`` (``limiter_state``, ...) are merged in.
        """
        cache = self.cache
        return {
            **self.limiter.stats(),
            "key_store_reachable": cache.reachable,
            "key_cache_age_seconds": cache.age,
            "keys_cached": cache.size,
            "key_store_error": cache.last_error,
        }

    # -- admin -----------------------------------------------------------------------------

    async def handle_admin(self, method: str, path: str, body: bytes) -> tuple[int, Any] | None:
        return await admin.handle(self, method, path, body)

    async def usage(self, plan_name: str, key_id: str) -> dict[str, Any] | None:
        """A key's counters from the limiter (None when its plan is not configured)."""
        plan = self.plans.get(plan_name)
        if plan is None:
            return None
        return await self.limiter.usage(key_id, plan)


def _shape(plan: Plan) -> tuple[tuple[int, str], ...]:
    # Which counters a plan keeps, not their limits: a changed limit keeps the key's counters.
    return tuple((c.metric, c.period) for c in plan.counters)


def _int(v: Any) -> int:
    return v if isinstance(v, int) and v >= 0 else 0


def _memory_limiters(limiter: Limiter) -> list[MemoryLimiter]:
    """The in-process limiters whose key states follow a plan's counters: the memory backend,
    or the Redis backend's local fallback."""
    if isinstance(limiter, MemoryLimiter):
        return [limiter]
    local = getattr(limiter, "local", None)
    return [local] if isinstance(local, MemoryLimiter) else []


def _reshape(limiter: MemoryLimiter, old: Plan, new: Plan) -> None:
    """Carry each key's counters of plan ``old`` over to ``new``'s counters, matched by
    (metric, period); a counter ``new`` adds starts at zero in the current period."""
    now = limiter.clock()
    starts = limiter.periods.for_plan(new, now).starts
    where = {(c.metric, c.period): i for i, c in enumerate(old.counters)}
    for st in limiter.states.values():
        if st.plan != old.name or len(st.used) != len(old.counters):
            continue
        windows, used = [], []
        for j, c in enumerate(new.counters):
            i = where.get((c.metric, c.period))
            windows.append(st.windows[i] if i is not None else starts[j])
            used.append(st.used[i] if i is not None else 0)
        st.windows, st.used, st.aligned = windows, used, None


def _limiter(config: FortressConfig) -> Limiter:
    if config.limits.backend == "redis":
        from fortress.access.redis_limits import RedisLimiter

        return RedisLimiter(
            config.limits.redis_url,
            config.limits.key_prefix,
            slot_ttl=config.timeouts.total + 60,
            fail_open=config.limits.fail_open,
            timeout=config.limits.timeout,
            breaker_failures=config.limits.breaker_failures,
            breaker_reset=config.limits.breaker_reset,
        )
    return MemoryLimiter()


def build_access(config: FortressConfig) -> AccessControl:
    """The access layer for ``config`` (the gateway calls this when ``auth.enabled``)."""
    return AccessControl(config)
