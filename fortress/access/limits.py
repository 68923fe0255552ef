"""Limiters: token bucket + calendar quotas + concurrency per key, in memory or in Redis.

Both backends keep the same state and make the same decisions (a property test checks them
against a reference model):

* **bucket**: ``burst`` tokens, refilled at ``rate`` per second; a request takes one.
* **counters** (``plans.Counter``): requests, input tokens and output tokens per UTC day / week
  / month. A request is admitted only if every limited counter has room for what it reserves:
  1 request, ``max_tokens`` output tokens, ``bytes_in / 4`` input tokens. ``settle`` replaces
  the reservation with the real usage when the request ends, so concurrent streams cannot
  overshoot a token quota by more than their usage beyond their reservation.
* **concurrency**: requests in flight per key.

A rejected request changes nothing. Check order, which picks the reason (and so Retry-After)
when several limits are hit: quotas (the longest waits), then the bucket, then concurrency.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from fortress.access.plans import (
    INPUT,
    METRICS,
    OUTPUT,
    REQUESTS,
    PeriodClock,
    Plan,
    format_reset,
    reset_header,
)

OK, QUOTA, RATE, CONCURRENCY = 0, 1, 2, 3
REASONS = ("ok", "quota", "rate", "concurrency")

Clock = Callable[[], float]


class Ticket:
    """What one admission reserved, handed back to ``settle``."""

    __slots__ = (
        "amounts",
        "done",
        "ends",
        "key_id",
        "plan",
        "prepared",
        "reserved_in",
        "reserved_out",
        "slot",
        "windows",
    )

    def __init__(
        self,
        key_id: str,
        plan: Plan,
        windows: tuple[int, ...],
        ends: tuple[int, ...],
        amounts: tuple[int, ...],
        slot: str | None,
        reserved: tuple[int, int],
    ) -> None:
        self.key_id = key_id
        self.plan = plan
        self.windows = windows  # start of each counter's period at admission
        self.ends = ends
        self.amounts = amounts  # reserved per counter
        self.slot = slot  # concurrency slot (Redis), None when the plan has no concurrency limit
        self.done = False
        self.prepared: Any = None  # backend data for settle (Redis: the packed key names)
        self.reserved_in, self.reserved_out = reserved  # tokens: (input, output)


class Decision:
    """An admission's outcome, with the state the rate-limit headers are built from."""

    __slots__ = (
        "_failed",
        "bounds",
        "inflight",
        "now",
        "plan",
        "reason",
        "retry_after",
        "ticket",
        "tokens",
        "used",
    )

    def __init__(
        self,
        plan: Plan,
        now: float,
        reason: int,
        failed: int,
        tokens: float | None,
        inflight: int,
        used: list[int],
        bounds: Sequence[tuple[int, int]],
        ticket: Ticket | None,
    ) -> None:
        self.plan = plan
        self.now = now
        self.reason = reason
        self.tokens = tokens  # bucket level after the decision; None: no bucket
        self.inflight = inflight
        self.used = used  # per counter, after the decision
        self.bounds = bounds
        self.ticket = ticket
        if reason == QUOTA:
            self.retry_after = max(0.0, bounds[failed][1] - now)
        elif reason == RATE:
            assert plan.rate is not None and tokens is not None
            self.retry_after = (1.0 - tokens) / plan.rate
        elif reason == CONCURRENCY:
            self.retry_after = 1.0  # unknown: when some request of this key ends
        else:
            self.retry_after = 0.0
        self._failed = failed

    @property
    def admitted(self) -> bool:
        return self.reason == OK

    def message(self) -> str:
        """The 429 message, in the style of OpenAI's."""
        plan = self.plan
        wait = format_reset(self.retry_after)
        if self.reason == QUOTA:
            c = plan.counters[self._failed]
            metric = METRICS[c.metric].replace("_", " ")
            msg = (
                f"Quota reached for {metric} per {c.period} on plan '{plan.name}': "
                f"limit {c.limit}, used {self.used[self._failed]}."
            )
            if c.metric == OUTPUT:
                msg += " Output tokens are reserved up front: a lower max_tokens may fit."
            return f"{msg} Please try again in {wait}."
        if self.reason == RATE:
            return (
                f"Rate limit reached on plan '{plan.name}': {plan.rate:g} requests/s with a burst of "
                f"{plan.burst}. Please try again in {wait}."
            )
        return (
            f"Too many concurrent requests on plan '{plan.name}': at most {plan.max_concurrent} "
            "in flight per key."
        )

    def kind(self) -> str:
        """OpenAI's error ``type`` for a 429: which budget ran out."""
        if self.reason == QUOTA and self.plan.counters[self._failed].metric != REQUESTS:
            return "tokens"
        return "requests"

    def headers(self) -> list[tuple[bytes, bytes]]:
        """OpenAI's ``x-ratelimit-*`` headers for the limit closest to running out."""
        plan = self.plan
        now = self.now
        used = self.used
        bounds = self.bounds
        best: tuple[int, int, float] | None = None  # (limit, remaining, reset seconds)
        if self.tokens is not None and plan.rate is not None and plan.burst is not None:
            best = (plan.burst, int(self.tokens), (plan.burst - self.tokens) / plan.rate)
        tok: tuple[int, int, float] | None = None
        for i, metric, limit in plan.limited:
            left = limit - used[i]
            if left < 0:
                left = 0
            if metric == REQUESTS:
                if best is None or left < best[1]:
                    best = (limit, left, bounds[i][1] - now)
            elif tok is None or left < tok[1]:
                tok = (limit, left, bounds[i][1] - now)
        out: list[tuple[bytes, bytes]] = []
        if best is not None:
            out.append((b"x-ratelimit-limit-requests", b"%d" % best[0]))
            out.append((b"x-ratelimit-remaining-requests", b"%d" % best[1]))
            out.append((b"x-ratelimit-reset-requests", reset_header(best[2])))
        if tok is not None:
            out.append((b"x-ratelimit-limit-tokens", b"%d" % tok[0]))
            out.append((b"x-ratelimit-remaining-tokens", b"%d" % tok[1]))
            out.append((b"x-ratelimit-reset-tokens", reset_header(tok[2])))
        if self.reason != OK:
            out.append((b"retry-after", b"%d" % max(1, math.ceil(self.retry_after))))
        return out


class Limiter(Protocol):
    """The interface both backends implement."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...

    async def admit(self, key_id: str, plan: Plan, reserve_in: int, reserve_out: int) -> Decision:
        """Check and take: one request, ``reserve_in``/``reserve_out`` tokens, a concurrency slot."""

    def settle(self, ticket: Ticket, used_in: int, used_out: int) -> None:
        """Replace the ticket's reservation by the real usage and free its slot. Never blocks."""

    async def usage(self, key_id: str, plan: Plan) -> dict[str, dict[str, int]]:
        """Current counters of a key: ``{"requests": {"day": 12, "month": 340}, ...}``."""

    def stats(self) -> dict[str, Any]:
        """The limiter's health: ``limiter_state`` (``ok`` | ``open`` | ``half_open``),
        ``fail_open_admissions_total``, ``redis_errors_total``, ``breaker_opens_total``,
        ``pending_replay``."""


def amounts_for(plan: Plan, reserve_in: int, reserve_out: int) -> tuple[int, ...]:
    """What an admission adds to each of the plan's counters."""
    return tuple(map((1, reserve_in, reserve_out).__getitem__, plan.metrics))


def usage_report(plan: Plan, values: list[int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {m: {} for m in METRICS}
    for c, v in zip(plan.counters, values, strict=True):
        out[METRICS[c.metric]][c.period] = v
    return out


class KeyState:
    """What the memory limiter keeps per key: bucket level and time, requests in flight, each
    counter's window and usage (the shared limiter refills one from its table per call)."""

    __slots__ = ("aligned", "inflight", "plan", "tokens", "ts", "used", "windows")

    def __init__(self, plan: Plan, now: float, windows: list[int]) -> None:
        self.plan = plan.name
        self.tokens = float(plan.burst) if plan.burst is not None else 0.0
        self.ts = now
        self.inflight = 0
        self.windows = windows
        self.used = [0] * len(windows)
        self.aligned: Any = None  # the PlanPeriods the windows were last checked against


class MemoryLimiter:
    """Limits held in this process: exact for one gateway, no I/O at all."""

    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock
        self.periods = PeriodClock()
        self.states: dict[str, KeyState] = {}

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        """Nothing to fail here: always ``ok`` and zeros (the keys are the Redis limiter's)."""
        return {
            "limiter_state": "ok",
            "fail_open_admissions_total": 0,
            "redis_errors_total": 0,
            "breaker_opens_total": 0,
            "pending_replay": 0,
        }

    def seed(self, key_id: str, plan: Plan, windows: tuple[int, ...], used: list[int]) -> None:
        """Start a key's counters from usage known elsewhere: the Redis limiter's fallback goes on
        from what Redis last reported instead of from zero. ``windows``: each counter's period
        start that ``used`` belongs to (older periods are reset at the next admission)."""
        st = self.states[key_id] = KeyState(plan, self.clock(), list(windows))
        st.used = list(used)

    async def admit(self, key_id: str, plan: Plan, reserve_in: int, reserve_out: int) -> Decision:
        return self.admit_now(key_id, plan, reserve_in, reserve_out)

    def admit_now(self, key_id: str, plan: Plan, reserve_in: int, reserve_out: int) -> Decision:
        """``admit`` without the coroutine: the memory backend never waits."""
        now = self.clock()
        periods = self.periods.for_plan(plan, now)
        bounds = periods.bounds
        st = self.states.get(key_id)
        if st is None or st.plan != plan.name:
            st = self.states[key_id] = KeyState(plan, now, list(periods.starts))
        used = st.used
        windows = st.windows
        if st.aligned is not periods:  # periods may have rolled over since this key's last request
            for i, b in enumerate(bounds):
                if b[0] > windows[i]:  # a new calendar period: its counter starts at zero
                    windows[i] = b[0]
                    used[i] = 0
            st.aligned = periods
        amounts = amounts_for(plan, reserve_in, reserve_out)
        reason, failed = OK, 0
        for i, _metric, limit in plan.limited:
            if used[i] >= limit or used[i] + amounts[i] > limit:
                reason, failed = QUOTA, i
                break
        tokens: float | None = None
        if plan.rate is not None and plan.burst is not None:
            tokens = min(float(plan.burst), st.tokens + max(0.0, now - st.ts) * plan.rate)
            if reason == OK and tokens < 1.0:
                reason = RATE
        if reason == OK and plan.max_concurrent is not None and st.inflight >= plan.max_concurrent:
            reason = CONCURRENCY
        if reason != OK:
            return Decision(plan, now, reason, failed, tokens, st.inflight, list(used), bounds, None)
        if tokens is not None:
            st.tokens = tokens - 1.0
            st.ts = max(st.ts, now)
        st.inflight += 1
        for i, a in enumerate(amounts):
            used[i] += a
        ticket = Ticket(key_id, plan, tuple(windows), periods.ends, amounts, None, (reserve_in, reserve_out))
        after = st.tokens if tokens is not None else None
        return Decision(plan, now, OK, 0, after, st.inflight, list(used), bounds, ticket)

    def settle(self, ticket: Ticket, used_in: int, used_out: int) -> None:
        if ticket.done:
            return
        ticket.done = True
        st = self.states.get(ticket.key_id)
        if st is None or st.plan != ticket.plan.name:
            return
        st.inflight -= 1
        # Per counter: real usage minus what was reserved (request counters never change).
        d_in = used_in - ticket.reserved_in
        d_out = used_out - ticket.reserved_out
        if not (d_in or d_out):
            return
        windows, used, then = st.windows, st.used, ticket.windows
        for i, metric in enumerate(ticket.plan.metrics):
            d = d_in if metric == INPUT else d_out if metric == OUTPUT else 0
            if d and windows[i] == then[i]:  # a period that rolled over stays closed
                used[i] += d

    async def usage(self, key_id: str, plan: Plan) -> dict[str, dict[str, int]]:
        now = self.clock()
        st = self.states.get(key_id)
        values = []
        for i, c in enumerate(plan.counters):
            start = self.periods.bounds(c.period, now)[0]
            ok = st is not None and st.plan == plan.name and st.windows[i] == start
            values.append(st.used[i] if ok and st is not None else 0)
        return usage_report(plan, values)


_ids = itertools.count()
_GATEWAY = os.urandom(6).hex()


def _new_nonce() -> None:
    # A forked worker draws its own: slots named alike in two processes would count and free
    # each other's.
    global _GATEWAY
    _GATEWAY = os.urandom(6).hex()


os.register_at_fork(after_in_child=_new_nonce)


def new_slot() -> str:
    """A concurrency-slot id unique across gateways (process nonce + counter)."""
    return f"{_GATEWAY}:{next(_ids)}"


__all__ = [
    "CONCURRENCY",
    "INPUT",
    "OK",
    "OUTPUT",
    "QUOTA",
    "RATE",
    "REASONS",
    "Decision",
    "Limiter",
    "MemoryLimiter",
    "Ticket",
    "amounts_for",
    "new_slot",
    "usage_report",
]
