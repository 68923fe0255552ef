"""Usage plans compiled for the request path, UTC calendar periods and OpenAI rate-limit headers.

A ``Plan`` is a ``UsagePlan`` from the config turned into flat tuples the limiters walk without
allocating. Every plan tracks request and token counters for the current UTC day and month (so
``fortress keys show`` can report usage), plus the week when a quota asks for it; a counter
with a limit is a quota, one without is only tracked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fortress.config import UsagePlan

REQUESTS, INPUT, OUTPUT = 0, 1, 2
METRICS = ("requests", "input_tokens", "output_tokens")
PERIODS = ("day", "week", "month")
_TRACKED = ("day", "month")  # always counted, for usage reports


@dataclass(frozen=True, slots=True)
class Counter:
    """One counter a limiter keeps per key: a metric over a calendar period, maybe limited."""

    metric: int
    period: str
    limit: int | None  # None: tracked only

    @property
    def name(self) -> str:
        return f"{METRICS[self.metric]}:{self.period}"


@dataclass(frozen=True, slots=True)
class Plan:
    """A usage plan ready for the request path."""

    name: str
    rate: float | None
    burst: int | None
    max_concurrent: int | None
    counters: tuple[Counter, ...]
    default_max_tokens: int
    limits_input: bool  # some input-token quota exists: reserve an estimate at admission
    limits_output: bool
    limits_tokens: bool
    # Derived for the request path: each counter's metric, and (index, metric, limit) of the
    # counters that have a limit.
    metrics: tuple[int, ...] = ()
    limited: tuple[tuple[int, int, int], ...] = ()

    @classmethod
    def compile(cls, name: str, plan: UsagePlan) -> Plan:
        quotas = {REQUESTS: plan.requests, INPUT: plan.input_tokens, OUTPUT: plan.output_tokens}
        counters = []
        for metric in (REQUESTS, INPUT, OUTPUT):
            for period in PERIODS:
                limit = quotas[metric].get(period)  # type: ignore[call-overload]
                if limit is not None or period in _TRACKED:
                    counters.append(Counter(metric, period, limit))
        rate = plan.rate
        burst = plan.burst
        if rate is not None and burst is None:
            burst = max(1, math.ceil(rate))  # a rate alone still needs a bucket to hold a request
        if rate is None:
            burst = None  # without a refill a bucket would empty for good
        return cls(
            name=name,
            rate=rate,
            burst=burst,
            max_concurrent=plan.max_concurrent,
            counters=tuple(counters),
            default_max_tokens=plan.default_max_tokens,
            limits_input=bool(plan.input_tokens),
            limits_output=bool(plan.output_tokens),
            limits_tokens=bool(plan.input_tokens or plan.output_tokens),
            metrics=tuple(c.metric for c in counters),
            limited=tuple((i, c.metric, c.limit) for i, c in enumerate(counters) if c.limit is not None),
        )

    def describe(self) -> dict[str, object]:
        """The plan as the admin API and CLI show it."""
        quotas: dict[str, dict[str, int]] = {}
        for c in self.counters:
            if c.limit is not None:
                quotas.setdefault(METRICS[c.metric], {})[c.period] = c.limit
        return {
            "name": self.name,
            "rate": self.rate,
            "burst": self.burst,
            "max_concurrent": self.max_concurrent,
            "quotas": quotas,
            "default_max_tokens": self.default_max_tokens,
        }


def period_bounds(period: str, now: float) -> tuple[int, int]:
    """(start, end) in epoch seconds of the UTC calendar ``period`` containing ``now``.

    Weeks start on Monday (ISO 8601).
    """
    t = datetime.fromtimestamp(now, UTC)
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        start, end = day, day + timedelta(days=1)
    elif period == "week":
        start = day - timedelta(days=day.weekday())
        end = start + timedelta(days=7)
    elif period == "month":
        start = day.replace(day=1)
        end = (
            start.replace(year=start.year + 1, month=1)
            if start.month == 12
            else start.replace(month=start.month + 1)
        )
    else:
        raise ValueError(f"unknown period {period!r}")
    return int(start.timestamp()), int(end.timestamp())


class PlanPeriods:
    """The periods of every counter of a plan at some moment, valid while ``start <= now < end``.

    The tuples are shared until a period rolls over, so ``is`` tells whether a key's counters
    were last aligned with the current periods.
    """

    __slots__ = ("bounds", "end", "ends", "start", "starts")

    def __init__(self, bounds: tuple[tuple[int, int], ...]) -> None:
        self.bounds = bounds
        self.starts = tuple(b[0] for b in bounds)
        self.ends = tuple(b[1] for b in bounds)
        self.start = max(self.starts, default=0)
        self.end = min(self.ends, default=2**62)


class PeriodClock:
    """``period_bounds`` cached until the period ends: the request path pays one comparison."""

    __slots__ = ("_bounds", "_plans")

    def __init__(self) -> None:
        self._bounds: dict[str, tuple[int, int]] = {}
        self._plans: dict[str, tuple[tuple[Counter, ...], PlanPeriods]] = {}

    def bounds(self, period: str, now: float) -> tuple[int, int]:
        b = self._bounds.get(period)
        if b is None or not (b[0] <= now < b[1]):
            b = self._bounds[period] = period_bounds(period, now)
        return b

    def for_plan(self, plan: Plan, now: float) -> PlanPeriods:
        """The bounds of each of ``plan``'s counters at ``now`` (cached while they hold)."""
        hit = self._plans.get(plan.name)
        if hit is not None and hit[0] is plan.counters:
            periods = hit[1]
            if periods.start <= now < periods.end:
                return periods
        periods = PlanPeriods(tuple(self.bounds(c.period, now) for c in plan.counters))
        self._plans[plan.name] = (plan.counters, periods)
        return periods


def format_reset(seconds: float) -> str:
    """A duration the way OpenAI's ``x-ratelimit-reset-*`` headers write it: 20ms, 1.5s, 6m0s, 1h2m3s."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 1000) / 1000:g}s"
    total = math.ceil(seconds)
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m}m{s}s" if h else f"{m}m{s}s"


_RESETS: dict[int, bytes] = {}


def reset_header(seconds: float) -> bytes:
    """``format_reset`` as header bytes, cached by what the text shows (milliseconds below a
    minute, seconds above): consecutive requests mostly share a value, and the f-strings cost
    more than the rest of a request's rate-limit headers."""
    if seconds <= 0:
        return b"0s"
    # Disjoint key ranges per branch of format_reset: 1000 ms is "1000ms" below 1 s, "1s" at 1 s.
    if seconds < 1:
        key = math.ceil(seconds * 1000)
    elif seconds < 60:
        key = 10_000 + math.ceil(seconds * 1000)
    else:
        key = 100_000 + math.ceil(seconds)
    text = _RESETS.get(key)
    if text is None:
        if len(_RESETS) >= 4096:
            _RESETS.clear()  # bounded; a rebuild costs one format per distinct value
        text = _RESETS[key] = format_reset(seconds).encode()
    return text
