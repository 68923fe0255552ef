"""Usage-plan limiters: property tests against a reference model (memory and Redis backends),
two gateways sharing one Redis, and token quotas under concurrent streams."""

from __future__ import annotations

import asyncio
import calendar
import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest
from helpers import free_port
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from services import RedisServer

from fortress.access.limits import CONCURRENCY, OK, QUOTA, RATE, MemoryLimiter, Ticket
from fortress.access.plans import Plan, format_reset, period_bounds, reset_header
from fortress.access.redis_limits import LimiterUnavailable, RedisLimiter
from fortress.config import UsagePlan

# -- a reference model, written from the definitions rather than from the implementation ---

METRIC_INDEX = {"requests": 0, "input_tokens": 1, "output_tokens": 2}


def window_start(period: str, now: float) -> int:
    days = int(now // 86400)
    if period == "day":
        return days * 86400
    if period == "week":  # 1970-01-01 was a Thursday; weeks start on Monday
        return (days - (days + 3) % 7) * 86400
    t = datetime.fromtimestamp(now, UTC)
    return calendar.timegm((t.year, t.month, 1, 0, 0, 0))


@dataclass
class RefKey:
    tokens: float
    ts: float
    inflight: int = 0
    used: dict[tuple[str, str, int], int] = field(default_factory=dict)


class Reference:
    """One key's bucket, calendar counters and in-flight count, the plain way."""

    def __init__(self, plan: UsagePlan) -> None:
        self.plan = plan
        self.keys: dict[str, RefKey] = {}

    def quotas(self) -> list[tuple[str, str, int]]:
        p = self.plan
        out = []
        for metric, q in (
            ("requests", p.requests),
            ("input_tokens", p.input_tokens),
            ("output_tokens", p.output_tokens),
        ):
            for period, limit in q.items():
                out.append((metric, period, limit))
        return out

    def admit(self, key: str, now: float, rin: int, rout: int) -> int:
        p = self.plan
        k = self.keys.setdefault(key, RefKey(float(p.burst or 0), now))
        amount = {"requests": 1, "input_tokens": rin, "output_tokens": rout}
        for metric, period, limit in self.quotas():
            used = k.used.get((metric, period, window_start(period, now)), 0)
            if used >= limit or used + amount[metric] > limit:
                return QUOTA
        tokens = None
        if p.rate is not None:
            tokens = min(float(p.burst), k.tokens + max(0.0, now - k.ts) * p.rate)
            if tokens < 1.0:
                return RATE
        if p.max_concurrent is not None and k.inflight >= p.max_concurrent:
            return CONCURRENCY
        if tokens is not None:
            k.tokens = tokens - 1.0
            k.ts = max(k.ts, now)
        k.inflight += 1
        for metric in amount:
            for period in ("day", "week", "month"):
                w = (metric, period, window_start(period, now))
                k.used[w] = k.used.get(w, 0) + amount[metric]
        return OK

    def settle(self, key: str, at: float, reserved: tuple[int, int], real: tuple[int, int]) -> None:
        k = self.keys[key]
        k.inflight -= 1
        for metric, r, u in (("input_tokens", reserved[0], real[0]), ("output_tokens", reserved[1], real[1])):
            for period in ("day", "week", "month"):
                w = (metric, period, window_start(period, at))
                k.used[w] = k.used.get(w, 0) + (u - r)

    def usage(self, key: str, now: float, metric: str, period: str) -> int:
        k = self.keys.get(key)
        return 0 if k is None else k.used.get((metric, period, window_start(period, now)), 0)


# -- strategies ----------------------------------------------------------------------------

plans = st.builds(
    lambda rate, burst, conc, req, inp, out: UsagePlan(
        rate=rate, burst=burst, max_concurrent=conc, requests=req, input_tokens=inp, output_tokens=out
    ),
    rate=st.sampled_from([None, 0.5, 1.0, 2.0, 7.0]),
    burst=st.integers(1, 5),
    conc=st.one_of(st.none(), st.integers(1, 3)),
    req=st.dictionaries(st.sampled_from(["day", "week", "month"]), st.integers(2, 60), max_size=2),
    inp=st.dictionaries(st.sampled_from(["day", "month"]), st.integers(1, 400), max_size=1),
    out=st.dictionaries(st.sampled_from(["day", "week"]), st.integers(1, 600), max_size=2),
)

admit_op = st.tuples(
    st.just("admit"),
    st.integers(0, 1),  # which key
    st.sampled_from([0, 0, 1, 50, 333, 1500]),  # ms since the previous call
    st.integers(0, 80),  # input tokens reserved
    st.integers(0, 150),  # output tokens reserved
)
settle_op = st.tuples(st.just("settle"), st.integers(0, 50), st.integers(0, 120), st.integers(0, 200))
# Jumps across hours and days, to cross UTC day / week / month boundaries.
jump_op = st.tuples(st.just("jump"), st.sampled_from([3600, 6 * 3600, 86400, 7 * 86400]))
# Several requests of one key at the same instant, to empty its bucket.
burst_op = st.tuples(st.just("burst"), st.integers(0, 1), st.integers(2, 8))
ops = st.lists(
    st.one_of(admit_op, admit_op, admit_op, settle_op, settle_op, jump_op, burst_op), min_size=5, max_size=60
)

# Close to the end of a month that ends a week too: rollovers happen early in a scenario.
START = calendar.timegm((2025, 3, 30, 23, 58, 0))


class FakeClock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


async def run_scenario(
    plan_cfg: UsagePlan, script: list[tuple[Any, ...]], limiter: Any, clock: FakeClock
) -> None:
    plan = Plan.compile("p", plan_cfg)
    ref = Reference(plan_cfg)
    open_tickets: list[tuple[str, Ticket]] = []
    keys = ["key_a", "key_b"]
    steps: list[tuple[Any, ...]] = []
    for op in script:
        steps += [("admit", op[1], 0, 0, 10)] * op[2] if op[0] == "burst" else [op]
    for op in steps:
        if op[0] == "jump":
            clock.t += op[1]
            continue
        if op[0] == "admit":
            _, ki, dt_ms, rin, rout = op
            clock.t += dt_ms / 1000
            key = keys[ki]
            decision = await limiter.admit(key, plan, rin, rout)
            expected = ref.admit(key, clock.t, rin, rout)
            assert decision.reason == expected, (op, decision.reason, expected)
            event(f"decision: {('ok', 'quota', 'rate', 'concurrency')[expected]}")
            if decision.ticket is not None:
                open_tickets.append((key, decision.ticket))
                if plan.rate is not None:
                    k = ref.keys[key]
                    assert decision.tokens == pytest.approx(k.tokens, abs=1e-9)
        else:
            if not open_tickets:
                continue
            _, idx, uin, uout = op
            key, ticket = open_tickets.pop(idx % len(open_tickets))
            limiter.settle(ticket, uin, uout)
            if isinstance(limiter, RedisLimiter):
                await limiter.drain()
            ref.settle(key, ticket_start(ticket), (ticket.reserved_in, ticket.reserved_out), (uin, uout))
        for key in keys:
            usage = await limiter.usage(key, plan)
            for metric, periods in usage.items():
                for period, value in periods.items():
                    assert value == ref.usage(key, clock.t, metric, period), (key, metric, period)


def ticket_start(ticket: Ticket) -> float:
    """A moment inside the periods the ticket was admitted in (its latest-starting window)."""
    return float(max(ticket.windows))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans, script=ops)
def test_memory_limiter_matches_reference(plan: UsagePlan, script: list[tuple[Any, ...]]) -> None:
    clock = FakeClock(START)
    asyncio.run(run_scenario(plan, script, MemoryLimiter(clock=clock), clock))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plan=plans, script=ops)
def test_redis_limiter_matches_reference(
    redis_url: str, plan: UsagePlan, script: list[tuple[Any, ...]]
) -> None:
    clock = FakeClock(START)

    async def go() -> None:
        limiter = RedisLimiter(redis_url, f"t{uuid.uuid4().hex[:8]}:", slot_ttl=1e9, clock=clock)
        try:
            await run_scenario(plan, script, limiter, clock)
        finally:
            await limiter.stop()

    asyncio.run(go())


# -- plain unit checks -----------------------------------------------------------------------


def test_period_bounds_are_utc_calendar_periods() -> None:
    t = calendar.timegm((2024, 2, 29, 13, 0, 0))  # a Thursday in a leap February
    assert period_bounds("day", t) == (
        calendar.timegm((2024, 2, 29, 0, 0, 0)),
        calendar.timegm((2024, 3, 1, 0, 0, 0)),
    )
    assert period_bounds("week", t) == (
        calendar.timegm((2024, 2, 26, 0, 0, 0)),
        calendar.timegm((2024, 3, 4, 0, 0, 0)),
    )
    assert period_bounds("month", t) == (
        calendar.timegm((2024, 2, 1, 0, 0, 0)),
        calendar.timegm((2024, 3, 1, 0, 0, 0)),
    )
    dec = calendar.timegm((2024, 12, 31, 23, 59, 59))
    assert period_bounds("month", dec)[1] == calendar.timegm((2025, 1, 1, 0, 0, 0))


def test_reset_durations_look_like_openai() -> None:
    assert format_reset(0) == "0s"
    assert format_reset(0.02) == "20ms"
    assert format_reset(1.5) == "1.5s"
    assert format_reset(360) == "6m0s"
    assert format_reset(3723) == "1h2m3s"


@given(
    st.floats(min_value=-10, max_value=40 * 86400, allow_nan=False)
    | st.sampled_from([0.9995, 1.0, 59.9999, 60.0])
)
@settings(max_examples=2000)
def test_cached_reset_header_is_format_reset(seconds: float) -> None:
    # The cache is keyed by what the text shows; a value seen before must give the same text.
    assert reset_header(seconds) == format_reset(seconds).encode()
    assert reset_header(seconds) == format_reset(seconds).encode()


def test_headers_name_the_limit_closest_to_running_out() -> None:
    clock = FakeClock(START)
    limiter = MemoryLimiter(clock=clock)
    plan = Plan.compile("p", UsagePlan(rate=1, burst=10, requests={"day": 3}, output_tokens={"day": 1000}))
    d = limiter.admit_now("k", plan, 0, 100)
    h = dict(d.headers())
    assert h[b"x-ratelimit-limit-requests"] == b"3"  # the day quota (2 left) binds before the bucket (9)
    assert h[b"x-ratelimit-remaining-requests"] == b"2"
    assert h[b"x-ratelimit-limit-tokens"] == b"1000"
    assert h[b"x-ratelimit-remaining-tokens"] == b"900"
    assert b"retry-after" not in h
    limiter.admit_now("k", plan, 0, 100)
    limiter.admit_now("k", plan, 0, 100)
    d = limiter.admit_now("k", plan, 0, 100)
    assert d.ticket is None and d.reason == QUOTA
    h = dict(d.headers())
    assert h[b"x-ratelimit-remaining-requests"] == b"0"
    assert int(h[b"retry-after"]) == pytest.approx(120, abs=1)  # START is 2 minutes before midnight
    assert d.kind() == "requests"


def test_output_reservation_that_does_not_fit_is_refused_with_tokens_type() -> None:
    limiter = MemoryLimiter(clock=FakeClock(START))
    plan = Plan.compile("p", UsagePlan(rate=None, output_tokens={"day": 1000}))
    assert limiter.admit_now("k", plan, 0, 900).ticket is not None
    d = limiter.admit_now("k", plan, 0, 200)
    assert d.ticket is None and d.kind() == "tokens"
    assert "max_tokens" in d.message()
    assert limiter.admit_now("k", plan, 0, 100).ticket is not None


# -- two gateways, one Redis ------------------------------------------------------------------


def _hammer(redis_url: str, prefix: str, plan: Plan, seconds: float, workers: int, out: list[float]) -> None:
    """One 'gateway': its own event loop and Redis client, ``workers`` concurrent clients."""

    async def go() -> None:
        limiter = RedisLimiter(redis_url, prefix)
        await limiter.start()
        deadline = time.monotonic() + seconds

        async def worker() -> None:
            while time.monotonic() < deadline:
                d = await limiter.admit("shared", plan, 0, 0)
                if d.ticket is not None:
                    out.append(time.time())
                    limiter.settle(d.ticket, 0, 0)

        await asyncio.gather(*(worker() for _ in range(workers)))
        await limiter.stop()

    asyncio.run(go())


def _two_gateways(redis_url: str, plan: Plan, seconds: float) -> tuple[list[float], float, float]:
    prefix = f"h{uuid.uuid4().hex[:8]}:"
    admitted: list[list[float]] = [[], []]
    threads = [
        threading.Thread(target=_hammer, args=(redis_url, prefix, plan, seconds, 8, admitted[i]))
        for i in range(2)
    ]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(admitted[0] + admitted[1]), t0, time.time()


def test_two_gateways_sharing_redis_never_exceed_the_quota(redis_url: str) -> None:
    plan = Plan.compile("q", UsagePlan(rate=None, requests={"day": 150}))
    stamps, _, _ = _two_gateways(redis_url, plan, 2.0)
    assert len(stamps) == 150  # exactly the quota: none lost, none extra


def test_two_gateways_sharing_redis_never_exceed_the_bucket(redis_url: str) -> None:
    rate, burst = 40.0, 10
    plan = Plan.compile("b", UsagePlan(rate=rate, burst=burst, requests={}))
    stamps, t0, t1 = _two_gateways(redis_url, plan, 1.5)
    assert stamps, "nothing admitted"
    # Over any prefix of the run, admissions never beat burst + rate * elapsed (+1 for clock skew).
    for i, ts in enumerate(stamps):
        assert i + 1 <= burst + rate * (ts - t0) + 1
    assert len(stamps) <= burst + rate * (t1 - t0) + 1
    assert len(stamps) >= burst + rate * 1.5 * 0.5  # and the limiter does admit at the plan's pace


# -- token quotas under concurrent streams ------------------------------------------------------


async def _streams(limiter: Any, plan: Plan, n: int, max_tokens: int, rng: random.Random) -> tuple[int, int]:
    """n concurrent 'streams' reserving max_tokens and settling a random real usage."""
    total = 0
    admitted = 0

    async def stream() -> None:
        nonlocal total, admitted
        await asyncio.sleep(rng.random() * 0.05)
        d = await limiter.admit("streamer", plan, 0, max_tokens)
        if d.ticket is None:
            return
        admitted += 1
        await asyncio.sleep(rng.random() * 0.1)
        used = rng.randint(max_tokens // 2, max_tokens)
        total += used
        limiter.settle(d.ticket, 0, used)

    await asyncio.gather(*(stream() for _ in range(n)))
    return admitted, total


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_concurrent_streams_never_overshoot_a_token_quota(backend: str, redis_url: str) -> None:
    quota, max_tokens = 1000, 100
    plan = Plan.compile("t", UsagePlan(rate=None, requests={}, output_tokens={"day": quota}))
    limiter: Any = (
        MemoryLimiter() if backend == "memory" else RedisLimiter(redis_url, f"s{uuid.uuid4().hex[:8]}:")
    )
    await limiter.start()
    rng = random.Random(7)
    spent = 0
    for _ in range(5):  # waves of 40 concurrent streams until the quota is used up
        _, total = await _streams(limiter, plan, 40, max_tokens, rng)
        spent += total
        if isinstance(limiter, RedisLimiter):
            await limiter.drain()
        assert spent <= quota + max_tokens
    usage = await limiter.usage("streamer", plan)
    assert usage["output_tokens"]["day"] == spent  # settled to the real usage, reservations released
    assert spent >= quota - max_tokens  # and the quota was actually usable to the end
    await limiter.stop()


async def test_concurrency_slots_are_freed_and_limit_in_flight(redis_url: str) -> None:
    plan = Plan.compile("c", UsagePlan(rate=None, requests={}, max_concurrent=2))
    for limiter in (MemoryLimiter(), RedisLimiter(redis_url, f"c{uuid.uuid4().hex[:8]}:")):
        a = await limiter.admit("k", plan, 0, 0)
        b = await limiter.admit("k", plan, 0, 0)
        c = await limiter.admit("k", plan, 0, 0)
        assert a.ticket and b.ticket and c.ticket is None and c.reason == CONCURRENCY
        limiter.settle(a.ticket, 0, 0)
        limiter.settle(a.ticket, 0, 0)  # settling twice frees one slot only
        if isinstance(limiter, RedisLimiter):
            await limiter.drain()
        assert (await limiter.admit("k", plan, 0, 0)).ticket is not None
        assert (await limiter.admit("k", plan, 0, 0)).ticket is None
        await limiter.stop()


async def test_redis_slots_of_a_crashed_gateway_expire(redis_url: str) -> None:
    clock = FakeClock(START)
    plan = Plan.compile("c", UsagePlan(rate=None, requests={}, max_concurrent=1))
    limiter = RedisLimiter(redis_url, f"x{uuid.uuid4().hex[:8]}:", slot_ttl=30, clock=clock)
    assert (await limiter.admit("k", plan, 0, 0)).ticket is not None  # never settled: "crashed"
    assert (await limiter.admit("k", plan, 0, 0)).ticket is None
    clock.t += 31
    assert (await limiter.admit("k", plan, 0, 0)).ticket is not None
    await limiter.stop()


async def test_redis_down_fails_open_or_closed() -> None:
    plan = Plan.compile("p", UsagePlan())
    url = f"redis://127.0.0.1:{free_port()}/0"
    open_ = RedisLimiter(url, fail_open=True)
    d = await open_.admit("k", plan, 0, 0)
    assert d.ticket is not None  # admitted by this gateway's own limiter, and counted
    open_.settle(d.ticket, 1, 1)  # owed to Redis with the admission, nothing sent now
    assert not open_.pending
    assert open_.stats()["fail_open_admissions_total"] == 1
    assert open_.stats()["pending_replay"] == 1
    closed = RedisLimiter(url, fail_open=False)
    with pytest.raises(LimiterUnavailable):
        await closed.admit("k", plan, 0, 0)
    await open_.stop()
    await closed.stop()


async def test_redis_restart_and_script_flush_are_survived(tmp_path: Any) -> None:
    server = RedisServer(tmp_path)
    plan = Plan.compile("p", UsagePlan(rate=None, requests={"day": 100}))
    limiter = RedisLimiter(server.url, "r:", timeout=1.0)
    try:
        await limiter.start()
        assert (await limiter.admit("k", plan, 0, 0)).used[0] == 1
        await limiter.conn.call(b"*2\r\n$6\r\nSCRIPT\r\n$5\r\nFLUSH\r\n")
        assert (await limiter.admit("k", plan, 0, 0)).used[0] == 2  # NOSCRIPT: loaded again
        server.stop()
        d = await limiter.admit("k", plan, 0, 0)
        assert d.ticket is not None and d.used[0] == 3  # fail open: locally, from Redis's last count
        server = RedisServer(tmp_path, port=server.port)  # back, empty
        d = await limiter.admit("k", plan, 0, 0)
        assert d.ticket is not None and d.used[0] == 1
        await limiter.drain()
        for _ in range(100):  # the admission made while it was down is added in the background
            if limiter.stats()["pending_replay"] == 0:
                break
            await asyncio.sleep(0.02)
        assert (await limiter.usage("k", plan))["requests"]["day"] == 2
    finally:
        await limiter.stop()
        server.stop()


def test_admission_without_a_coroutine_only_where_no_io_is_needed(tmp_path: Any, redis_url: str) -> None:
    """The memory backend admits in ``admit_now`` (a ticket, rate-limit headers, a 429 past the
    burst); the Redis backend declines it (the gateway awaits ``admit`` instead)."""
    from fortress.access.keys import Identity
    from fortress.access.layer import AccessControl
    from fortress.config import parse_config
    from fortress.core.context import RequestContext
    from fortress.core.errors import GatewayError

    text = (
        f"state_dir: {tmp_path}\npools: [{{model: m, replicas: [{{url: 'http://127.0.0.1:9'}}]}}]\n"
        "plans: {p: {rate: 1, burst: 2}}\nlimits: {backend: %s, redis_url: '%s'}\n"
    )

    def ctx() -> RequestContext:
        c = RequestContext("req-1", "/v1/chat/completions", time.perf_counter(), None)
        c.identity = Identity("key_1", "k", "p", frozenset(), "fk_1")
        return c

    memory = AccessControl(parse_config(text % ("memory", redis_url), env={}))
    first = ctx()
    assert memory.admit_now(first) and first.ticket is not None
    assert (b"x-ratelimit-limit-requests", b"2") in first.extra_headers
    assert memory.admit_now(ctx())
    with pytest.raises(GatewayError) as refused:
        memory.admit_now(ctx())
    assert refused.value.status == 429
    redis = AccessControl(parse_config(text % ("redis", redis_url), env={}))
    declined = ctx()
    assert not redis.admit_now(declined) and declined.ticket is None and not declined.extra_headers
