"""The fleet's autoscaler against a day of traffic: SLO attainment and replica-seconds.

A deterministic discrete-event simulation (seeded, simulated time, no processes, no sleeping)
of one pool through a full simulated day, replayed under three policies over the same trace:

* **static peak**: a fixed count all day, the smallest that meets the attainment target over the
  day (found by bisection over the same trace), billed from midnight to midnight;
* **QPS threshold** (SkyServe's ``RequestRateAutoscaler``, rebuilt here with its published
  defaults): ``ceil(QPS over the last 60 s / target_qps_per_replica)``, a decision every 20 s
  (5 s while its target is 0), a change only after 300 s (up) or 1200 s (down) of consecutive
  decisions asking for it, at once from a target of 0;
* **Fortress**: the real ``fortress.fleet.autoscaler.Autoscaler`` with a ``FleetConfig``, fed
  ``Signals`` every ``interval`` and at once for each request that waits for a wake, its counts
  applied as the controller applies them (launch into a free slot; drain, then stop; victims not
  ready first, then fewest in flight, then the highest slot).

**Configs.** Fortress: ``FORTRESS`` below (min 0, max 16, ``in_flight`` 2.25 per replica,
``scale_out_delay`` 10 s, ``scale_in_delay`` 300 s, ``metric_window`` 30 s, ``idle_to_zero``
300 s, the other keys their defaults).
The QPS baseline gets the same bounds and the same load per replica by Little's law
(``target_qps_per_replica`` = 2.5 / mean slot time; SkyServe has no default for it). Two more
rows run the baseline with the target found by bisection that matches Fortress's attainment,
and the one that stays within Fortress's replica-seconds: the same budget, the best it does.

**Traffic.** Poisson arrivals at a rate that follows a raised cosine from 0.2 req/s (03:00) to
3 req/s (15:00), except quiet hours 01:00-06:00 at 0.0005 req/s (a stray request every half
hour or so: a pool that sleeps must wake for it), plus three bursts: 10:40 for 2 min at 4x,
13:20 for 3 min at 3x, 20:30 for 1 min at 5x.

**A replica** (a small model on one GPU): ``PARALLEL`` (4) sequences at a time; time to first
token 0.3 s + prompt tokens / 5000 tok/s; then 25 ms per output token. Prompts are lognormal
(median 500 tokens, capped at 4000), outputs lognormal (median 100 tokens, capped at 1024): a
request holds a slot about 3.9 s on average. A launched replica is ready after ``--cold-start``
seconds (30 s by default: a small model's weights from local disk and the engine's warm-up),
billed from launch to its end (cold start and draining included; a replica stopped while it
starts ends at once). A draining replica takes no new request and ends when its last one ends.

**The gateway** sends each request to the ready replica with the fewest in flight that has a
free slot, else keeps it in one FIFO queue until a slot frees. A request that arrives while the
pool has no ready replica waits for a wake (the controller's ``waiting``), for at most
``wake_timeout`` (120 s, then it fails). A request's time to first token is its wait (for a
wake, at the gateway) plus the replica's time to first token; it meets the SLO when that is at
most ``--slo`` seconds (2 s by default: interactive chat).

    python bench/autoscale.py                 # the table; exit 1 when a target is missed
    python bench/autoscale.py --cold-start 60 --slo 3 --json
    python bench/autoscale.py --write-docs    # replace the "Autoscaling" section of docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from fortress.config import FleetConfig
from fortress.fleet.autoscaler import Autoscaler, Signals

# -- the model of a replica and of a request -------------------------------------------------

PARALLEL = 4  # sequences a replica runs at once
TTFT_BASE = 0.3  # s: scheduling and the first forward pass
PREFILL_RATE = 5000.0  # prompt tokens per second
TPOT = 0.025  # s per output token
PROMPT = (500.0, 0.8, 4000)  # lognormal median, sigma, cap (tokens)
OUTPUT = (100.0, 0.8, 1024)
WAKE_TIMEOUT = 120.0  # s a request waits for a wake (FleetConfig's default)
OVERTIME = 6 * 3600.0  # s after the trace's end at which the unfinished are counted as failed

# -- the day ---------------------------------------------------------------------------------

DAY = 86400.0
LOW, PEAK = 0.2, 3.0  # req/s at 03:00 and at 15:00
LOW_HOUR = 3.0
QUIET = (1.0, 6.0)  # hours with (almost) no traffic
QUIET_RATE = 0.0005  # req/s during them
BURSTS = (
    (10 * 3600 + 40 * 60, 120.0, 4.0),
    (13 * 3600 + 20 * 60, 180.0, 3.0),
    (20 * 3600 + 30 * 60, 60.0, 5.0),
)
DATE = datetime(2025, 3, 11, tzinfo=UTC)  # a Tuesday; the wall clock the autoscaler sees

# -- the policies' settings ------------------------------------------------------------------

MAX_REPLICAS = 16
FORTRESS = {
    "min_replicas": 0,
    "max_replicas": MAX_REPLICAS,
    "target": {"in_flight": 2.25},
    "scale_out_delay": 10,
    "scale_in_delay": 300,
    "metric_window": 30,
    "idle_to_zero": 300,
    "interval": 2,
}
FORTRESS_WHY = (
    "an operator's choice for this pool, from a sweep of targets 2-2.5, out windows 4-20 s and "
    "metric windows 30-60 s: 2.25 of a replica's 4 slots leaves room for Poisson noise within the "
    "SLO; a 10 s out window (five evaluations) ignores a few noisy readings and still meets a "
    "burst one cold start after it begins; scale-in reads 30 s means; tolerance, the in window, "
    "warm-up and interval are the defaults; 5 minutes idle before sleeping"
)
# SkyServe's constants (sky/serve/constants.py): AUTOSCALER_QPS_WINDOW_SIZE_SECONDS,
# AUTOSCALER_DEFAULT_DECISION_INTERVAL_SECONDS, AUTOSCALER_NO_REPLICA_DECISION_INTERVAL_SECONDS,
# AUTOSCALER_DEFAULT_UPSCALE_DELAY_SECONDS, AUTOSCALER_DEFAULT_DOWNSCALE_DELAY_SECONDS.
QPS_WINDOW, QPS_INTERVAL, QPS_IDLE_INTERVAL = 60.0, 20.0, 5.0
UPSCALE_DELAY, DOWNSCALE_DELAY = 300.0, 1200.0
ATTAINMENT_TARGET = 0.99
COST_TARGET = 0.60


# -- the trace -------------------------------------------------------------------------------


@dataclass
class Trace:
    """Requests sorted by arrival: when, the replica's time to first token, the slot time."""

    arrival: list[float]
    ttft: list[float]
    service: list[float]
    duration: float
    description: str = ""
    rate: Callable[[float], float] | None = None  # req/s at t, for the static formula

    def __len__(self) -> int:
        return len(self.arrival)


def day_rate(t: float) -> float:
    """Requests per second at ``t`` seconds after midnight."""
    hour = t / 3600.0
    if QUIET[0] <= hour < QUIET[1]:
        return QUIET_RATE
    rate = LOW + (PEAK - LOW) * (1 - math.cos(2 * math.pi * (hour - LOW_HOUR) / 24)) / 2
    for start, length, factor in BURSTS:
        if start <= t < start + length:
            rate *= factor
    return rate


def _lognormal(rng: random.Random, spec: tuple[float, float, int]) -> int:
    median, sigma, cap = spec
    return max(1, min(cap, round(rng.lognormvariate(math.log(median), sigma))))


def build_trace(
    seed: int, rate: Callable[[float], float], duration: float, description: str = "", step: float = 1.0
) -> Trace:
    """Poisson arrivals at ``rate(t)`` (constant over each ``step``) for ``duration`` seconds, by
    time rescaling: unit-rate exponential gaps walked through the cumulative rate."""
    rng = random.Random(seed)
    arrival: list[float] = []
    ttft: list[float] = []
    service: list[float] = []
    bins = math.ceil(duration / step)
    t0, need = 0.0, rng.expovariate(1.0)
    for b in range(bins):
        lam = rate(t0)
        width = min(step, duration - t0)
        mass = lam * width
        pos = 0.0  # mass used in this bin
        while lam > 0 and need <= mass - pos:
            pos += need
            arrival.append(t0 + pos / lam)
            need = rng.expovariate(1.0)
        need -= mass - pos
        t0 = (b + 1) * step
    for _ in arrival:
        prompt, out = _lognormal(rng, PROMPT), _lognormal(rng, OUTPUT)
        first = TTFT_BASE + prompt / PREFILL_RATE
        ttft.append(first)
        service.append(first + out * TPOT)
    return Trace(arrival, ttft, service, duration, description, rate)


def day_trace(seed: int, hours: float = 24.0) -> Trace:
    """The day (or its first ``hours``)."""
    quiet = f"{QUIET[0]:02.0f}:00-{QUIET[1]:02.0f}:00"
    bursts = ", ".join(
        f"{int(s // 3600):02d}:{int(s % 3600 // 60):02d} for {n / 60:g} min at {f:g}x" for s, n, f in BURSTS
    )
    text = (
        f"{'24 simulated hours' if hours == 24 else f'the first {hours:g} simulated hours of a day'}, "
        f"Poisson arrivals: a raised cosine from {LOW:g} req/s ({LOW_HOUR:02.0f}:00) "
        f"to {PEAK:g} req/s (15:00); quiet hours {quiet} at {QUIET_RATE:g} req/s; bursts {bursts}"
    )
    return build_trace(seed, day_rate, hours * 3600.0, text)


# -- the simulation --------------------------------------------------------------------------

READY, DONE, TICK, TIMEOUT = 0, 1, 2, 3
WAITING, QUEUED, RUNNING, FINISHED, FAILED = 0, 1, 2, 3, 4


class Replica:
    __slots__ = ("active", "draining", "ended", "launched", "ready", "slot")

    def __init__(self, slot: int, launched: float) -> None:
        self.slot = slot
        self.launched = launched
        self.ready = False
        self.draining = False
        self.active = 0
        self.ended: float | None = None


class Sim:
    """One pool, one trace, one policy."""

    def __init__(self, trace: Trace, policy: Policy, slots: int, cold_start: float) -> None:
        self.trace = trace
        self.policy = policy
        self.slots = slots
        self.cold_start = cold_start
        self.now = 0.0
        self.heap: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.live: list[Replica] = []  # launched and not ended (draining included)
        self.queue: deque[int] = deque()  # at the gateway, every slot busy
        self.waiting: deque[int] = deque()  # for a wake: no ready replica when they came
        n = len(trace)
        self.state = bytearray(n)
        self.dispatched = [math.inf] * n
        self.waited = bytearray(n)
        self.deadline = [math.inf] * n  # when a request waiting for a wake gives up
        self.ready_count = 0
        self.served = 0
        self.outstanding = 0
        self.billed = 0.0
        self.launches = 0
        self.timeline: list[tuple[float, int, int]] = [(0.0, 0, 0)]  # (time, current, ready)
        # The integral of requests in flight over time: the controller reads the mean in flight
        # over each interval (it samples every 0.25 s), not one instant.
        self.area = 0.0
        self._area_t = 0.0
        self._in_flight = 0

    # -- events ------------------------------------------------------------------------------

    def push(self, at: float, kind: int, obj: Any) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (at, self.seq, kind, obj))

    def run(self) -> Sim:
        arrival = self.trace.arrival
        n, i = len(arrival), 0
        heap = self.heap
        end = self.trace.duration
        self.policy.start(self)
        while i < n or self.outstanding or (heap and heap[0][0] <= end):
            if self.now > end + OVERTIME:
                break  # what is still unfinished counts as failed
            if i < n and (not heap or arrival[i] < heap[0][0]):
                self._advance(arrival[i])
                self.arrive(i)
                self._in_flight = self.in_flight()
                i += 1
                continue
            if not heap:
                break
            at, _, kind, obj = heapq.heappop(heap)
            self._advance(at)
            self._process(kind, obj)
            self._in_flight = self.in_flight()
        for r in list(self.live):  # still running at the end of the day: billed to its end
            self.billed += end - min(r.launched, end)
        return self

    def _advance(self, at: float) -> None:
        self.area += self._in_flight * (at - self._area_t)
        self._area_t = self.now = at

    def _process(self, kind: int, obj: Any) -> None:
        if True:
            if kind == DONE:
                self.done(*obj)
            elif kind == TICK:
                self.policy.tick_event(self, obj)
            elif kind == READY:
                self.became_ready(obj)
            else:
                self.timeout(obj)

    def arrive(self, i: int) -> None:
        self.outstanding += 1
        self.policy.on_arrival(self, i)
        if self.ready_count == 0:
            self.wait(i)
            self.policy.on_wait(self)
        else:
            self.state[i] = QUEUED
            self.queue.append(i)
            self.dispatch()

    def wait(self, i: int) -> None:
        """No ready replica: ``i`` waits for a wake, at most WAKE_TIMEOUT."""
        self.state[i] = WAITING
        self.waited[i] = 1
        self.waiting.append(i)
        self.deadline[i] = self.now + WAKE_TIMEOUT
        self.push(self.deadline[i], TIMEOUT, i)

    def dispatch(self) -> None:
        """Least outstanding: the ready replica with the fewest in flight and a free slot."""
        queue = self.queue
        while queue:
            best: Replica | None = None
            for r in self.live:
                if (
                    r.ready
                    and not r.draining
                    and r.active < PARALLEL
                    and (best is None or r.active < best.active)
                ):
                    best = r
            if best is None:
                return
            i = queue.popleft()
            best.active += 1
            self.state[i] = RUNNING
            self.dispatched[i] = self.now
            self.push(self.now + self.trace.service[i], DONE, (best, i))

    def done(self, r: Replica, i: int) -> None:
        r.active -= 1
        self.state[i] = FINISHED
        self.served += 1
        self.outstanding -= 1
        if r.draining and r.active == 0:
            self.end(r)
        else:
            self.dispatch()

    def became_ready(self, r: Replica) -> None:
        if r.ended is not None or r.draining:
            return
        r.ready = True
        self.ready_count += 1
        if self.waiting:  # the wake: everyone waiting goes first, in arrival order
            for i in self.waiting:
                self.state[i] = QUEUED
            self.queue.extendleft(reversed(self.waiting))
            self.waiting.clear()
        self.mark()
        self.dispatch()

    def timeout(self, i: int) -> None:
        if self.state[i] == WAITING and self.now >= self.deadline[i]:
            self.state[i] = FAILED
            self.waiting.remove(i)
            self.outstanding -= 1

    # -- what the provider does --------------------------------------------------------------

    def active(self) -> list[Replica]:
        """Starting or running: what the controller counts as ``current``."""
        return [r for r in self.live if not r.draining]

    def in_flight(self) -> int:
        """Requests at the gateway for the pool's replicas: running (draining replicas included)
        and queued for a slot; not those waiting for a wake."""
        return sum(r.active for r in self.live) + len(self.queue)

    def launch(self, count: int, ready_at_once: bool = False) -> int:
        used = {r.slot for r in self.live}
        free = [s for s in range(1, self.slots + 1) if s not in used][:count]
        for slot in free:
            r = Replica(slot, self.now)
            self.live.append(r)
            self.launches += 1
            if ready_at_once:
                r.ready = True
                self.ready_count += 1
            else:
                self.push(self.now + self.cold_start, READY, r)
        if free:
            self.live.sort(key=lambda r: r.slot)
            self.mark()
        return len(free)

    def terminate(self, r: Replica) -> None:
        """Drain, then stop: a starting or idle replica ends at once. Requests queued at the
        gateway when the last ready replica goes wait for a wake (a policy may scale to zero
        with requests queued: the QPS baseline counts arrivals, not requests in flight)."""
        if r.ready:
            self.ready_count -= 1
            if self.ready_count == 0 and self.queue:
                queued = list(self.queue)
                self.queue.clear()
                for i in queued:
                    self.wait(i)  # seen by the policy's next evaluation (no re-entry here)
        if not r.ready or r.active == 0:
            self.end(r)
        else:
            r.draining = True
            self.mark()

    def end(self, r: Replica) -> None:
        r.ended = self.now
        end = self.trace.duration
        self.billed += min(self.now, end) - min(r.launched, end)
        self.live.remove(r)
        self.mark()

    def mark(self) -> None:
        self.timeline.append((self.now, len(self.active()), self.ready_count))


# -- policies --------------------------------------------------------------------------------


class Policy:
    name = ""

    def start(self, sim: Sim) -> None: ...

    def on_arrival(self, sim: Sim, i: int) -> None: ...

    def on_wait(self, sim: Sim) -> None: ...

    def tick_event(self, sim: Sim, gen: int) -> None: ...

    def describe(self) -> str:
        return self.name


class Static(Policy):
    """``count`` replicas, ready from midnight to midnight."""

    def __init__(self, count: int, why: str = "") -> None:
        self.count = count
        self.why = why
        self.name = "static peak"

    def start(self, sim: Sim) -> None:
        sim.launch(self.count, ready_at_once=True)

    def describe(self) -> str:
        return f"{self.count} replicas all day, ready at 00:00{self.why}"


class QpsThreshold(Policy):
    """SkyServe's RequestRateAutoscaler with its default delays, windows and intervals."""

    name = "QPS threshold"

    def __init__(self, target_qps: float, min_replicas: int, max_replicas: int) -> None:
        self.target_qps = target_qps
        self.min = min_replicas
        self.max = max_replicas
        self.up_threshold = int(UPSCALE_DELAY / QPS_INTERVAL)
        self.down_threshold = int(DOWNSCALE_DELAY / QPS_INTERVAL)
        self.target = min_replicas
        self.up = self.down = 0
        self.stamps: deque[float] = deque()

    def start(self, sim: Sim) -> None:
        self.tick(sim)

    def on_arrival(self, sim: Sim, i: int) -> None:
        self.stamps.append(sim.now)

    def tick_event(self, sim: Sim, gen: int) -> None:
        self.tick(sim)

    def tick(self, sim: Sim) -> None:
        now = sim.now
        while self.stamps and self.stamps[0] < now - QPS_WINDOW:
            self.stamps.popleft()
        qps = len(self.stamps) / QPS_WINDOW
        want = min(max(math.ceil(qps / self.target_qps - 1e-9), self.min), self.max)
        if self.target == 0:  # faster scale up when there is no replica
            self.target = want
        elif want > self.target:
            self.up += 1
            self.down = 0
            if self.up >= self.up_threshold:
                self.up, self.target = 0, want
        elif want < self.target:
            self.down += 1
            self.up = 0
            if self.down >= self.down_threshold:
                self.down, self.target = 0, want
        else:
            self.up = self.down = 0
        active = sim.active()
        if self.target > len(active):
            sim.launch(self.target - len(active))
        elif self.target < len(active):
            # Not ready first, then the newest (SkyServe: by status, then the largest replica id).
            ordered = sorted(active, key=lambda r: (r.ready, -r.launched, -r.slot))
            for r in ordered[: len(active) - self.target]:
                sim.terminate(r)
        sim.push(now + (QPS_IDLE_INTERVAL if self.target == 0 else QPS_INTERVAL), TICK, 0)

    def describe(self) -> str:
        return (
            f"target_qps_per_replica {self.target_qps:.3g}, min_replicas {self.min}, "
            f"max_replicas {self.max}; upscale_delay {UPSCALE_DELAY:g} s, downscale_delay "
            f"{DOWNSCALE_DELAY:g} s, QPS over the last {QPS_WINDOW:g} s, a decision every "
            f"{QPS_INTERVAL:g} s ({QPS_IDLE_INTERVAL:g} s at 0)"
        )


class Fortress(Policy):
    """The fleet's own Autoscaler, driven as PoolController drives it."""

    name = "Fortress"

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.gen = 0
        self.served = 0
        self.last_request: float | None = None
        self.decisions: dict[str, int] = {}
        self.scaler: Autoscaler | None = None
        self.desired = 0
        self.last_tick = 0.0
        self.last_area = 0.0

    def start(self, sim: Sim) -> None:
        initial = Autoscaler(self.config, 0.0, 0).bounds(DATE).min
        self.scaler = Autoscaler(self.config, 0.0, initial)
        self.desired = initial
        self.tick(sim)

    def on_wait(self, sim: Sim) -> None:
        self.tick(sim)  # the wake: evaluated at once

    def tick_event(self, sim: Sim, gen: int) -> None:
        if gen == self.gen:  # a poke in between restarted the interval
            self.tick(sim)

    def tick(self, sim: Sim) -> None:
        assert self.scaler is not None
        now = sim.now
        in_flight = sim.in_flight()
        if in_flight or sim.served != self.served or sim.waiting:
            self.last_request = now
        self.served = sim.served
        active = sim.active()
        # The mean in flight since the last evaluation, as the controller reads it.
        area = sim.area + in_flight * (now - sim._area_t)
        span = now - self.last_tick
        mean = (area - self.last_area) / span if span > 0 else float(in_flight)
        self.last_tick, self.last_area = now, area
        s = Signals(
            now=now,
            wall=DATE + timedelta(seconds=now),
            current=len(active),
            ready=sim.ready_count,
            metrics={"in_flight": mean},
            waiting=len(sim.waiting),
            last_request=self.last_request,
        )
        d = self.scaler.decide(s)
        if d.desired != self.desired:
            self.decisions[d.kind] = self.decisions.get(d.kind, 0) + 1
            self.desired = d.desired
        if self.desired > len(active):
            sim.launch(self.desired - len(active))
        elif self.desired < len(active):
            for r in self.victims(active, len(active) - self.desired, d.bounds.min):
                sim.terminate(r)
        self.gen += 1
        sim.push(now + self.config.interval, TICK, self.gen)

    @staticmethod
    def victims(active: list[Replica], count: int, minimum: int) -> list[Replica]:
        """The controller's rule: not ready first, then fewest in flight, then the highest slot;
        never the last ready replica of a pool whose minimum is at least one."""
        ordered = sorted(active, key=lambda r: (r.ready, r.active, -r.slot))
        chosen = ordered[:count]
        if minimum >= 1 and not any(r.ready for r in ordered[count:]):
            chosen = [r for r in chosen if not r.ready]
        return chosen

    def describe(self) -> str:
        c = self.config
        targets = ", ".join(f"{t.metric} {t.value:g}" for t in c.target)
        return (
            f"min_replicas {c.min_replicas}, max_replicas {c.max_replicas}, target {{{targets}}} per "
            f"replica, scale_out_delay {c.scale_out_delay:g} s, scale_in_delay {c.scale_in_delay:g} s, "
            f"metric_window {c.metric_window:g} s, warmup {c.warmup:g} s, "
            f"idle_to_zero {c.idle_to_zero:g} s, interval {c.interval:g} s, "
            f"wake_timeout {c.wake_timeout:g} s ({FORTRESS_WHY})"
        )


# -- results ---------------------------------------------------------------------------------


@dataclass
class Result:
    policy: str
    config: str
    requests: int
    completed: int
    failed: int
    attainment: float
    p50: float
    p95: float
    p99: float
    replica_seconds: float
    woken: int  # requests that waited for a wake (or for a replica after the last one went)
    launches: int
    peak_replicas: int
    relative: float = 1.0  # replica-seconds / static's
    decisions: dict[str, int] = field(default_factory=dict)
    target_qps: float | None = None  # the QPS baseline's target_qps_per_replica
    timeline: list[tuple[float, int, int]] = field(default_factory=list, repr=False)


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    k = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


def simulate(
    trace: Trace, policy: Policy, slo: float, cold_start: float, slots: int = MAX_REPLICAS
) -> Result:
    """Replay ``trace`` under ``policy``; every request ends finished or failed (wake timeout)."""
    sim = Sim(trace, policy, slots, cold_start).run()
    ttfts = sorted(
        (sim.dispatched[i] - trace.arrival[i] + trace.ttft[i]) if sim.state[i] == FINISHED else math.inf
        for i in range(len(trace))
    )
    n = len(trace)
    met = sum(1 for x in ttfts if x <= slo)
    return Result(
        policy=policy.name,
        config=policy.describe(),
        requests=n,
        completed=sum(1 for s in sim.state if s == FINISHED),
        failed=sum(1 for s in sim.state if s != FINISHED),
        attainment=met / n if n else 1.0,
        p50=_percentile(ttfts, 0.50),
        p95=_percentile(ttfts, 0.95),
        p99=_percentile(ttfts, 0.99),
        replica_seconds=sim.billed,
        woken=sum(sim.waited),
        launches=sim.launches,
        peak_replicas=max(c for _, c, _ in sim.timeline),
        decisions=dict(getattr(policy, "decisions", {})),
        target_qps=getattr(policy, "target_qps", None),
        timeline=sim.timeline,
    )


def static_for(trace: Trace, slo: float, cold_start: float, hi: int = MAX_REPLICAS) -> tuple[int, bool]:
    """The smallest fixed count whose whole trace meets the attainment target (bisection), and
    whether one does (else ``hi``)."""

    def ok(n: int) -> bool:
        return simulate(trace, Static(n), slo, cold_start, slots=n).attainment >= ATTAINMENT_TARGET

    if not ok(hi):
        return hi, False
    lo = 0  # fails (nothing served)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi, True


def mean_service(trace: Trace) -> float:
    return sum(trace.service) / len(trace) if len(trace) else 0.0


def qps_search(
    trace: Trace,
    slo: float,
    cold_start: float,
    cfg: FleetConfig,
    holds: Callable[[Result], bool],
    cheap: bool,
) -> Result | None:
    """The QPS baseline with the target_qps_per_replica that ``holds`` at its edge, by bisection
    on a log scale over 0.02..5 req/s per replica: the largest such target (``cheap``: fewest
    replicas that still hold), else the smallest (most replicas within a budget)."""

    def run(q: float) -> Result:
        return simulate(trace, QpsThreshold(q, cfg.min_replicas, cfg.max_replicas), slo, cold_start)

    lo, hi = 0.02, 5.0  # many replicas .. few
    edge = run(lo if cheap else hi)
    if not holds(edge):
        return None
    best = edge
    for _ in range(12):
        mid = math.sqrt(lo * hi)
        r = run(mid)
        if holds(r):
            best = r
            lo, hi = (mid, hi) if cheap else (lo, mid)
        else:
            lo, hi = (lo, mid) if cheap else (mid, hi)
    return best


def run_all(
    trace: Trace,
    slo: float,
    cold_start: float,
    fortress: dict[str, Any] | None = None,
    matched: bool = True,
) -> dict[str, Any]:
    """The three policies over ``trace``: results, the targets and whether each is met; with
    ``matched``, also the QPS baseline at Fortress's attainment and at its replica-seconds."""
    cfg = FleetConfig.model_validate(fortress or FORTRESS)
    count, found = static_for(trace, slo, cold_start, hi=cfg.max_replicas)
    rate = trace.rate or (lambda t: 0.0)
    peak_rate = max((rate(float(t)) for t in range(0, int(trace.duration), 10)), default=0.0)
    slot = mean_service(trace)
    formula = peak_rate * slot / PARALLEL
    why = (
        f": the smallest fixed count meeting {ATTAINMENT_TARGET:.0%} attainment over the trace "
        f"(bisection over the same trace); for comparison, peak arrival rate x mean slot time / "
        f"parallel = {peak_rate:.2f} x {slot:.2f} s / {PARALLEL} = {formula:.2f} replicas at 100 % busy"
        if found
        else f": no count up to max_replicas {cfg.max_replicas} meets {ATTAINMENT_TARGET:.0%}, so {count}"
    )
    static = simulate(trace, Static(count, why), slo, cold_start, slots=count)
    in_flight = next((t.value for t in cfg.target if t.metric == "in_flight"), 2.0)
    target_qps = in_flight / slot if slot else 1.0
    qps = simulate(trace, QpsThreshold(target_qps, cfg.min_replicas, cfg.max_replicas), slo, cold_start)
    ours = simulate(trace, Fortress(cfg), slo, cold_start, slots=cfg.max_replicas)
    results = [static, qps, ours]
    supplements: list[Result] = []
    if matched:
        same_slo = qps_search(trace, slo, cold_start, cfg, lambda r: r.attainment >= ours.attainment, True)
        same_cost = qps_search(
            trace, slo, cold_start, cfg, lambda r: r.replica_seconds <= ours.replica_seconds, False
        )
        for r, label in (
            (same_slo, "at Fortress's attainment"),
            (same_cost, "within Fortress's replica-seconds"),
        ):
            if r is not None:
                r.policy = f"QPS threshold, target {r.target_qps:.3g} ({label})"
                supplements.append(r)
    for r in results + supplements:
        r.relative = r.replica_seconds / static.replica_seconds if static.replica_seconds else math.nan
    targets = [
        (
            f"Fortress attainment >= {ATTAINMENT_TARGET:.0%}",
            f"{ours.attainment:.2%}",
            ours.attainment >= ATTAINMENT_TARGET,
        ),
        (
            f"Fortress replica-seconds <= {COST_TARGET:.0%} of static",
            f"{ours.relative:.1%}",
            ours.relative <= COST_TARGET,
        ),
        (
            "Fortress attainment above the QPS baseline's",
            f"{ours.attainment:.2%} vs {qps.attainment:.2%}",
            ours.attainment > qps.attainment,
        ),
        (
            "Fortress replica-seconds below the QPS baseline's",
            f"{ours.replica_seconds:,.0f} vs {qps.replica_seconds:,.0f}",
            ours.replica_seconds < qps.replica_seconds,
        ),
    ]
    return {
        "trace": trace.description,
        "requests": len(trace),
        "duration_seconds": trace.duration,
        "mean_slot_seconds": slot,
        "slo_seconds": slo,
        "cold_start_seconds": cold_start,
        "qps_equivalence": (
            f"target_qps_per_replica = Fortress's in_flight target {in_flight:g} / mean slot time "
            f"{slot:.2f} s = {target_qps:.3g} req/s (Little's law: the same load per replica); "
            "SkyServe has no default for it"
        ),
        "results": results,
        "supplements": supplements,
        "targets": targets,
        "passed": all(ok for _, _, ok in targets),
    }


# -- output ----------------------------------------------------------------------------------


def _s(x: float) -> str:
    return "timeout" if math.isinf(x) else f"{x:.2f} s"


def table(results: list[Result], slo: float) -> list[str]:
    rows = [
        f"| policy | SLO attainment (TTFT <= {slo:g} s) | p50 TTFT | p95 TTFT | p99 TTFT | replica-seconds "
        "| vs static | waited for a wake | launches | most replicas |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        rows.append(
            f"| {r.policy} | {r.attainment:.2%} | {_s(r.p50)} | {_s(r.p95)} | {_s(r.p99)} | "
            f"{r.replica_seconds:,.0f} | {r.relative:.1%} | {r.woken} | {r.launches} | {r.peak_replicas} |"
        )
    return rows


def report(out: dict[str, Any], command: str) -> str:
    res: list[Result] = out["results"]
    sup: list[Result] = out["supplements"]
    _, qps, ours = res
    lines = [
        "```",
        command,
        "```",
        "",
        f"**Trace** (seed in the command): {out['trace']}; {out['requests']:,} requests. A replica runs "
        f"{PARALLEL} requests at once; time to first token {TTFT_BASE:g} s + prompt / "
        f"{PREFILL_RATE:g} tok/s, then {TPOT * 1000:g} ms per output token (prompts lognormal, median "
        f"{PROMPT[0]:g} tokens, at most {PROMPT[2]}; outputs lognormal, median {OUTPUT[0]:g}, at most "
        f"{OUTPUT[2]}): {out['mean_slot_seconds']:.2f} s of a slot per request on average. Least "
        "outstanding routing over ready replicas with a free slot, else one FIFO queue at the gateway. "
        f"Cold start {out['cold_start_seconds']:g} s; a replica is billed from launch to its end "
        "(cold start and draining included). SLO: time to first token, waits for a wake and at the "
        f"gateway included, at most {out['slo_seconds']:g} s.",
        "",
        "**Configs**",
        "",
    ]
    for r in res:
        lines.append(f"- {r.policy}: {r.config}.")
    lines.append(f"- The QPS baseline's target: {out['qps_equivalence']}.")
    lines += ["", *table(res + sup, out["slo_seconds"]), ""]
    if sup:
        lines += [
            "The last rows are the same QPS baseline, other delays and bounds unchanged, with its "
            "target_qps_per_replica found by bisection: the largest that reaches Fortress's "
            "attainment, and the smallest that stays within Fortress's replica-seconds. They are "
            "not the baseline of the targets below.",
            "",
        ]
    lines += ["| target | measured | result |", "| --- | --- | --- |"]
    for what, measured, ok in out["targets"]:
        lines.append(f"| {what} | {measured} | {'PASS' if ok else 'FAIL'} |")
    better = ours.attainment > qps.attainment
    cheaper = ours.replica_seconds < qps.replica_seconds
    lines += [
        "",
        "Better than the QPS baseline on both: "
        + ("reached." if better and cheaper else "**not reached**: ")
        + (
            ""
            if better and cheaper
            else f"at the same load per replica Fortress has {'higher' if better else 'lower or equal'} "
            f"attainment ({ours.attainment:.2%} vs {qps.attainment:.2%}) and "
            f"{'fewer' if cheaper else 'more'} replica-seconds ({ours.replica_seconds:,.0f} vs "
            f"{qps.replica_seconds:,.0f})."
        ),
    ]
    matched = [r for r in sup if r.attainment >= ours.attainment]
    budget = [r for r in sup if r.replica_seconds <= ours.replica_seconds]
    if matched and budget:
        lines += [
            "",
            "Across its targets, the QPS baseline does not do as well on both: reaching Fortress's "
            f"attainment takes it {matched[0].replica_seconds:,.0f} replica-seconds "
            f"({matched[0].replica_seconds / ours.replica_seconds - 1:+.0%}); within Fortress's "
            f"replica-seconds it reaches {budget[0].attainment:.2%}.",
        ]
    if ours.decisions:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(ours.decisions.items()))
        lines += ["", f"Fortress's changes of the desired count, by kind: {kinds}."]
    return "\n".join(lines) + "\n"


def as_json(out: dict[str, Any]) -> dict[str, Any]:
    def clean(r: Result) -> dict[str, Any]:
        d = {k: v for k, v in r.__dict__.items() if k != "timeline"}
        return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in d.items()}

    return {
        **{k: v for k, v in out.items() if k not in ("results", "supplements", "targets")},
        "results": [clean(r) for r in out["results"]],
        "supplements": [clean(r) for r in out["supplements"]],
        "targets": [{"target": t, "measured": m, "passed": ok} for t, m, ok in out["targets"]],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Replay a simulated day of traffic against static provisioning, a QPS-threshold "
        "autoscaler (SkyServe's defaults) and the fleet's autoscaler; exit 1 when a target is missed.",
        epilog="example: python bench/autoscale.py --seed 1 --cold-start 30 --slo 2",
    )
    ap.add_argument("--seed", type=int, default=1, help="the trace's seed (default 1)")
    ap.add_argument(
        "--cold-start", type=float, default=30.0, help="seconds from launch to ready (default 30)"
    )
    ap.add_argument(
        "--slo", type=float, default=2.0, help="time-to-first-token target in seconds (default 2)"
    )
    ap.add_argument(
        "--hours", type=float, default=24.0, help="simulate only the day's first HOURS (default 24)"
    )
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument(
        "--write-docs", action="store_true", help='replace the "Autoscaling" section of docs/benchmarks.md'
    )
    args = ap.parse_args(argv)

    began = time.process_time()
    trace = day_trace(args.seed, args.hours)
    out = run_all(trace, args.slo, args.cold_start)
    command = (
        f"python bench/autoscale.py --seed {args.seed} --cold-start {args.cold_start:g} --slo {args.slo:g}"
    )
    if args.hours != 24:
        command += f" --hours {args.hours:g}"
    if args.json:
        print(json.dumps(as_json(out), indent=2))
    else:
        print(report(out, command))
        print(f"({time.process_time() - began:.1f} s of CPU)")
    if args.write_docs:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from docs_section import machine_line, write_section

        when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        body = f"Simulated {when} on {machine_line()}.\n\n" + report(out, command + " --write-docs")
        print(write_section("autoscale", body, "## Autoscaling", after="embedded-model"), file=sys.stderr)
    return 0 if out["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
