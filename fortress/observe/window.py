"""Recent traffic in one-second buckets: what the alarms and the dashboard read.

Prometheus counters are cumulative; alarms ("average latency over the last minute") and the
dashboard ("p95 of the last 10 s") need sliding windows. A ring of per-second buckets gives
both at a fixed cost per request (a few integer increments and one ``bisect`` into log-spaced
latency bins) and fixed memory, whatever the request rate. Percentiles come from the bins, so
they are exact to within one bin (12 %).

Time is whatever clock the caller passes in (``time.perf_counter`` in the gateway, a fake one
in tests); nothing here reads a clock on its own except ``summary``'s default.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Log-spaced latency bins from 1 ms to ~20 min, factor 1.25: 64 bounds.
BOUNDS: tuple[float, ...] = tuple(0.001 * 1.25**i for i in range(64))
_NBINS = len(BOUNDS) + 1


class _Bucket:
    __slots__ = (
        "e4xx",
        "e5xx",
        "lat",
        "lat_sum",
        "n",
        "n429",
        "second",
        "tok_in",
        "tok_out",
        "ttft",
        "ttft_n",
        "ttft_sum",
    )

    def __init__(self, second: int) -> None:
        self.second = second
        self.n = 0
        self.e4xx = 0
        self.e5xx = 0
        self.n429 = 0
        self.lat_sum = 0.0
        self.lat = [0] * _NBINS
        self.ttft_n = 0
        self.ttft_sum = 0.0
        self.ttft = [0] * _NBINS
        self.tok_in = 0
        self.tok_out = 0


@dataclass
class Summary:
    """Traffic over one window. Latencies in seconds; None where there was no sample."""

    seconds: float
    requests: int = 0
    errors_4xx: int = 0
    errors_5xx: int = 0
    rate_limited: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    avg_latency: float | None = None
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    ttft_p50: float | None = None
    ttft_p95: float | None = None

    @property
    def request_rate(self) -> float:
        return self.requests / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_out / self.seconds


def _quantile(hist: list[int], total: int, q: float) -> float | None:
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, c in enumerate(hist):
        seen += c
        if c and seen >= rank:
            # The bin's geometric middle: unbiased for a log-spaced bin.
            if i == 0:
                return BOUNDS[0]
            if i >= len(BOUNDS):
                return BOUNDS[-1]
            return math.sqrt(BOUNDS[i - 1] * BOUNDS[i])
    return BOUNDS[-1]


class RecentTraffic:
    """Per-second buckets of the last ``horizon`` seconds of finished requests."""

    def __init__(self, horizon: int = 900, clock: Callable[[], float] = time.perf_counter) -> None:
        self.horizon = horizon
        self.clock = clock
        self._ring: list[_Bucket | None] = [None] * horizon
        # Since start: requests, 4xx, 5xx, 429 (the dashboard's totals).
        self.total = [0, 0, 0, 0]

    def add(
        self,
        now: float,
        status: int,
        latency: float,
        ttft: float | None = None,
        tokens_in: int = 0,
        tokens_out: int = 0,
    ) -> None:
        """Count one finished request at time ``now`` (same clock as ``self.clock``)."""
        sec = int(now)
        i = sec % self.horizon
        b = self._ring[i]
        if b is None or b.second != sec:
            b = self._ring[i] = _Bucket(sec)
        b.n += 1
        total = self.total
        total[0] += 1
        if status >= 400:
            if status >= 500:
                b.e5xx += 1
                total[2] += 1
            else:
                b.e4xx += 1
                total[1] += 1
                if status == 429:
                    b.n429 += 1
                    total[3] += 1
        b.lat_sum += latency
        b.lat[bisect_left(BOUNDS, latency)] += 1
        if ttft is not None:
            b.ttft_n += 1
            b.ttft_sum += ttft
            b.ttft[bisect_left(BOUNDS, ttft)] += 1
        b.tok_in += tokens_in
        b.tok_out += tokens_out

    def totals(self) -> dict[str, int]:
        n, e4, e5, r429 = self.total
        return {"requests": n, "errors_4xx": e4, "errors_5xx": e5, "rate_limited": r429}

    def _buckets(self, first: int, last: int) -> list[_Bucket]:
        out = []
        ring = self._ring
        h = self.horizon
        for sec in range(max(first, last - h + 1), last + 1):
            b = ring[sec % h]
            if b is not None and b.second == sec:
                out.append(b)
        return out

    def summary(self, seconds: float, now: float | None = None, quantiles: bool = True) -> Summary:
        """Traffic of the last ``seconds`` (whole seconds, the current one included).

        ``quantiles=False`` skips merging the latency bins (p50/p95/p99 stay None): counts and
        the average are all most alarms need."""
        now = self.clock() if now is None else now
        last = int(now)
        span = max(1, round(seconds))
        return _merge(self._buckets(last - span + 1, last), float(span), quantiles)


def _merge(buckets: list[_Bucket], seconds: float, quantiles: bool = True) -> Summary:
    s = Summary(seconds)
    if not buckets:
        return s
    lat = [0] * _NBINS
    ttft = [0] * _NBINS
    lat_sum = 0.0
    ttft_n = 0
    for b in buckets:
        s.requests += b.n
        s.errors_4xx += b.e4xx
        s.errors_5xx += b.e5xx
        s.rate_limited += b.n429
        s.tokens_in += b.tok_in
        s.tokens_out += b.tok_out
        lat_sum += b.lat_sum
        ttft_n += b.ttft_n
        if not quantiles:
            continue
        for i, c in enumerate(b.lat):
            if c:
                lat[i] += c
        if b.ttft_n:
            for i, c in enumerate(b.ttft):
                if c:
                    ttft[i] += c
    if s.requests:
        s.avg_latency = lat_sum / s.requests
    if not quantiles:
        return s
    if s.requests:
        s.p50 = _quantile(lat, s.requests, 0.50)
        s.p95 = _quantile(lat, s.requests, 0.95)
        s.p99 = _quantile(lat, s.requests, 0.99)
    if ttft_n:
        s.ttft_p50 = _quantile(ttft, ttft_n, 0.50)
        s.ttft_p95 = _quantile(ttft, ttft_n, 0.95)
    return s


class GaugeSeries:
    """Timestamped samples of one gauge (GPU utilisation), trimmed to ``horizon`` seconds."""

    def __init__(self, horizon: float = 900.0) -> None:
        self.horizon = horizon
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, now: float, value: float) -> None:
        self._samples.append((now, value))
        while self._samples and self._samples[0][0] < now - self.horizon:
            self._samples.popleft()

    def mean(self, seconds: float, now: float) -> float | None:
        """Mean of the samples taken in the last ``seconds``; None without any."""
        vals = [v for t, v in self._samples if t > now - seconds]
        return sum(vals) / len(vals) if vals else None

    def last(self) -> float | None:
        return self._samples[-1][1] if self._samples else None


class History:
    """The dashboard's last hour: one point every ``step`` seconds in a bounded ring.

    Filled off the request path by the observability sampler. Traffic comes from
    ``RecentTraffic`` (each point covers the whole seconds since the previous one, so no request
    is counted twice or lost between points); replica health is noted every second by ``note``
    and a point keeps the worst of its step, so a replica that crashed and came back between
    two points still shows as a dip.
    """

    def __init__(self, step: float = 5.0, horizon: float = 3600.0) -> None:
        self.step = step
        self._points: deque[dict[str, Any]] = deque(maxlen=max(1, int(horizon / step)))
        self._health: dict[str, dict[str, int]] = {}
        self._last_second: int | None = None  # the last whole second a point covered

    def note(self, health: dict[str, dict[str, int]]) -> None:
        """Merge one health reading into the current step: fewest healthy, most unhealthy,
        most replicas (a group is a tier or a pool: ``{"healthy", "unhealthy", "total"}``)."""
        for group, counts in health.items():
            worst = self._health.get(group)
            if worst is None:
                self._health[group] = dict(counts)
                continue
            worst["healthy"] = min(worst["healthy"], counts["healthy"])
            worst["unhealthy"] = max(worst["unhealthy"], counts["unhealthy"])
            worst["total"] = max(worst["total"], counts["total"])

    def close(self, wall: float, now: float, recent: RecentTraffic, **extra: Any) -> dict[str, Any] | None:
        """End the current step at wall-clock ``wall`` (``now`` on ``recent``'s clock): append
        one point with the finished seconds' traffic, the step's worst health and ``extra``.
        Returns the point (None when no whole second has passed since the previous one)."""
        last = int(now) - 1  # the current second is not over yet
        if self._last_second is None:
            first = last - max(1, round(self.step)) + 1
        else:
            first = self._last_second + 1
        if last < first:
            return None
        self._last_second = last
        s = recent.summary(last - first + 1, now=last + 0.5)
        point: dict[str, Any] = {
            "t": wall,
            "seconds": s.seconds,
            "requests": s.requests,
            "errors_4xx": s.errors_4xx,
            "errors_5xx": s.errors_5xx,
            "rate_limited": s.rate_limited,
            "tokens_in": s.tokens_in,
            "tokens_out": s.tokens_out,
            "avg_latency": s.avg_latency,
            "p50": s.p50,
            "p95": s.p95,
            "p99": s.p99,
            "ttft_p95": s.ttft_p95,
            "health": self._health,
            **extra,
        }
        self._health = {}
        self._points.append(point)
        return point

    def points(self, since: float | None = None) -> list[dict[str, Any]]:
        """The points, oldest first; with ``since``, only those taken after it."""
        if since is None:
            return list(self._points)
        out = []
        for p in reversed(self._points):
            if p["t"] <= since:
                break
            out.append(p)
        out.reverse()
        return out
