"""Alarm rules evaluated inside the gateway, over sliding windows of recent traffic.

Each rule compares one signal (average latency over the last minute, 5xx in the last minute,
unhealthy replicas, GPU utilisation, ...) with a threshold at every evaluation. States follow
Prometheus' alerting rules, plus a visible RESOLVED step:

    OK ──condition true──▶ PENDING ──held ``for`` seconds──▶ FIRING
    FIRING ──condition false──▶ RESOLVED ──next evaluation, still false──▶ OK
    PENDING ──condition false──▶ OK;   RESOLVED ──condition true──▶ PENDING

A rule with ``for: 0`` goes from OK to FIRING in one evaluation. A signal with no data (no
requests in the window, no GPU) counts as "condition false", as CloudWatch's
``TreatMissingData: notBreaching`` does. Notifications are sent on FIRING and on RESOLVED only.

The clock is injectable: tests drive ``evaluate(now)`` with a fake one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import operator
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from fortress.config import AlarmRule
from fortress.observe.window import GaugeSeries, RecentTraffic, Summary
from fortress.routing.pool import Router
from fortress.routing.replica import State

log = logging.getLogger("fortress.alarms")

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}
_QUANTILE_METRICS = frozenset({"p95_latency", "ttft_p95"})
# Alarm metrics that are the increase of a layer's counter over the rule's window.
_COUNTER_METRICS = {
    "limiter_fail_open": ("fail_open_admissions_total",),
    # Turned away at the cap: answered 503 on a reserve connection, or closed past the reserve.
    "connections_refused": ("connections_refused_total", "connections_busy_total"),
    # Local replica processes restarted after a crash (the supervisor's stats).
    "replica_restarts": ("replica_restarts_total",),
}
# Units for messages; the thresholds in config use the same.
UNITS: dict[str, str] = {
    "avg_latency": "s",
    "p95_latency": "s",
    "ttft_p95": "s",
    "request_rate": "req/s",
    "gpu_utilization": "%",
    "memory_utilization": "%",
    "journal_disk_utilization": "%",
}


class AlarmState(StrEnum):
    OK = "ok"
    PENDING = "pending"
    FIRING = "firing"
    RESOLVED = "resolved"


def _iso(wall: float) -> str:
    return dt.datetime.fromtimestamp(wall, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _fmt(value: float | None) -> str:
    if value is None:
        return "no data"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def format_duration(seconds: float) -> str:
    """90 -> "90s", 180 -> "3m", 3600 -> "1h", 0.5 -> "0.5s"."""
    if seconds and seconds % 3600 == 0:
        return f"{seconds / 3600:g}h"
    if seconds and seconds % 60 == 0:
        return f"{seconds / 60:g}m"
    return f"{seconds:g}s"


@dataclass
class AlarmEvent:
    """A state change worth telling someone about: an alarm fired or resolved."""

    rule: AlarmRule
    state: AlarmState
    value: float | None
    at: float  # wall-clock time of the change
    since: float  # wall-clock time the condition started to hold (firing) or fired (resolved)
    source: str = "fortress"

    def text(self) -> str:
        r = self.rule
        unit = UNITS.get(r.metric, "")
        cond = f"{r.metric} {_fmt(self.value)}{unit} {r.op} {r.threshold:g}{unit}"
        if self.state is AlarmState.FIRING:
            held = f" for {format_duration(r.for_)}" if r.for_ else ""
            head = f"[FIRING] {r.name} ({r.severity}): {cond}{held}"
        else:
            head = f"[RESOLVED] {r.name} ({r.severity}): {r.metric} now {_fmt(self.value)}{unit}"
        return f"{head}. {r.description}" if r.description else head

    def payload(self) -> dict[str, Any]:
        """Slack-compatible webhook body: ``text`` plus structured fields."""
        rule = self.rule.describe()
        return {
            "text": self.text(),
            "alarm": rule.pop("name"),
            "state": str(self.state),
            **rule,
            "value": self.value,
            "at": _iso(self.at),
            "since": _iso(self.since),
            "source": self.source,
        }


class Notifier(Protocol):
    async def send(self, event: AlarmEvent) -> None: ...


class Signals:
    """The values alarm rules compare: recent traffic, the replica pool, GPUs, memory."""

    def __init__(
        self,
        recent: RecentTraffic,
        router: Router | None = None,
        gpu: GaugeSeries | None = None,
        memory: Callable[[], float | None] | None = None,
        stats: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.recent = recent
        self.router = router
        self.gpu = gpu if gpu is not None else GaugeSeries()
        self.memory = memory
        # The layers' stats() merged: journal disk, store and limiter state, refused connections.
        self.stats = stats
        self._stats: dict[str, Any] = {}
        self._summaries: dict[tuple[float, bool], Summary] = {}
        # Samples of the cumulative counters alarms look at, for their increase over a window
        # (kept for the longest window a rule uses: the evaluator sets it).
        self._counters: dict[str, deque[tuple[float, float]]] = {}
        self.horizon = 3600.0

    def begin(self, now: float | None = None) -> None:
        """Start one evaluation: rules with the same window share one summary; the layers'
        counters are sampled once."""
        self._summaries = {}
        self._stats = self.stats() if self.stats is not None else {}
        if now is not None:
            for metric, keys in _COUNTER_METRICS.items():
                values = [self._stats[k] for k in keys if self._stats.get(k) is not None]
                if values:
                    samples = self._counters.setdefault(metric, deque())
                    samples.append((now, float(sum(values))))
                    while len(samples) > 1 and samples[1][0] <= now - self.horizon:
                        samples.popleft()

    def _increase(self, metric: str, window: float, now: float) -> float | None:
        samples = self._counters.get(metric)
        if not samples:
            return None
        # The value at the window's start: the last sample at or before it; none that old means
        # the counter (which starts at 0 with the process) counted everything within the window.
        base = 0.0
        for t, v in samples:
            if t > now - window:
                break
            base = v
        return samples[-1][1] - base

    def _summary(self, window: float, now: float, quantiles: bool) -> Summary:
        s = self._summaries.get((window, quantiles))
        if s is None:
            s = self._summaries[(window, quantiles)] = self.recent.summary(window, now, quantiles)
        return s

    def value(self, rule: AlarmRule, now: float) -> float | None:
        m = rule.metric
        if m == "unhealthy_replicas":
            if self.router is None:
                return None
            return float(unhealthy_count(self.router, self._stats))
        if m in _COUNTER_METRICS:
            return self._increase(m, rule.window, now)
        if m == "journal_disk_utilization":
            return journal_disk_percent(self._stats)
        if m == "store_unreachable":
            return store_unreachable(self._stats)
        if m == "wrong_model_replicas":
            if self.router is None:
                return None
            return float(sum(1 for r in self.router.all_replicas() if r.wrong_model is not None))
        if m == "healthy_replicas":
            if self.router is None:
                return None
            counts = [
                self.router.healthy_count(route) for route in self.router.index.values() if not route.is_alias
            ]
            return float(min(counts)) if counts else None
        if m == "gpu_utilization":
            return self.gpu.mean(rule.window, now)
        if m == "memory_utilization":
            return self.memory() if self.memory is not None else None
        s = self._summary(rule.window, now, m in _QUANTILE_METRICS)
        if m == "errors_5xx":
            return float(s.errors_5xx)
        if m == "errors_4xx":
            return float(s.errors_4xx)
        if m == "rate_limited":
            return float(s.rate_limited)
        if m == "request_rate":
            return s.request_rate
        if m == "avg_latency":
            return s.avg_latency
        if m == "p95_latency":
            return s.p95
        if m == "ttft_p95":
            return s.ttft_p95
        raise ValueError(f"unknown alarm metric {m!r}")


def slot_down(slot: dict[str, Any]) -> bool:
    """A supervised slot (a ``Supervisor.status()`` row) whose process crashed or never came up
    and is restarting or given up: out of the router, yet a replica that should serve."""
    if slot.get("state") in ("stopping", "stopped") or slot.get("replica"):
        return False
    return slot.get("state") == "failed" or bool(slot.get("restarts"))


def unhealthy_count(router: Router, stats: dict[str, Any]) -> int:
    """Replicas in state unhealthy, plus local replicas whose process is down: the runtime
    takes a dead process out of the router at once, so the router alone would not count it
    between the crash and the restart's first passing check."""
    n = sum(1 for r in router.all_replicas() if r.state is State.UNHEALTHY)
    for slot in stats.get("local_slots") or ():
        if slot_down(slot) and router.replica_named(slot["name"]) is None:
            n += 1
    return n


def journal_disk_percent(stats: dict[str, Any]) -> float | None:
    """Percent of the audit journal's filesystem in use, from the audit layer's stats()."""
    free, total = stats.get("journal_disk_free_bytes"), stats.get("journal_disk_total_bytes")
    return 100.0 * (1.0 - free / total) if free is not None and total else None


def store_unreachable(stats: dict[str, Any]) -> float | None:
    """1 while the audit shipper fails or the key cache cannot read the store; None with no
    layer reporting either."""
    if "shipper_error" not in stats and "key_store_reachable" not in stats:
        return None
    return 1.0 if stats.get("shipper_error") or stats.get("key_store_reachable") is False else 0.0


class Alarm:
    """One rule and where it stands."""

    def __init__(self, rule: AlarmRule) -> None:
        self.rule = rule
        self.state = AlarmState.OK
        self.value: float | None = None
        self.pending_since: float | None = None  # evaluation clock
        self.changed_at: float | None = None  # wall clock
        self.fired_at: float | None = None  # wall clock of the last FIRING
        self._since_wall: float | None = None

    def step(self, value: float | None, now: float, wall: float) -> AlarmEvent | None:
        """Apply one evaluation; returns an event on FIRING or RESOLVED."""
        r = self.rule
        self.value = value
        breached = value is not None and _OPS[r.op](value, r.threshold)
        if breached:
            if self.state in (AlarmState.OK, AlarmState.RESOLVED):
                self._set(AlarmState.PENDING, wall)
                self.pending_since = now
                self._since_wall = wall
            if self.state is AlarmState.PENDING:
                assert self.pending_since is not None
                if now - self.pending_since >= r.for_ - 1e-9:
                    self._set(AlarmState.FIRING, wall)
                    self.fired_at = wall
                    return AlarmEvent(r, AlarmState.FIRING, value, wall, self._since_wall or wall)
            return None
        if self.state is AlarmState.FIRING:
            self._set(AlarmState.RESOLVED, wall)
            return AlarmEvent(r, AlarmState.RESOLVED, value, wall, self.fired_at or wall)
        if self.state in (AlarmState.PENDING, AlarmState.RESOLVED):
            self._set(AlarmState.OK, wall)
            self.pending_since = None
        return None

    def _set(self, state: AlarmState, wall: float) -> None:
        self.state = state
        self.changed_at = wall

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.rule.describe(),
            "state": str(self.state),
            "value": self.value,
            "unit": UNITS.get(self.rule.metric, ""),
            "since": self.changed_at,
            "last_fired": self.fired_at,
        }


class AlarmEvaluator:
    """Evaluates every rule on a timer and sends the resulting notifications in order."""

    def __init__(
        self,
        rules: Iterable[AlarmRule],
        signals: Signals,
        notifiers: Iterable[Notifier] = (),
        every: float = 5.0,
        clock: Callable[[], float] = time.perf_counter,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.alarms = [Alarm(r) for r in rules]
        self.signals = signals
        signals.horizon = max([signals.horizon, *(a.rule.window for a in self.alarms)])
        self.notifiers = list(notifiers)
        self.every = every
        self.clock = clock
        self.wall = wall
        # Called (synchronously, must not block) with every event: the autoscaler listens for
        # FIRING events of rules whose action is "scale_up".
        self.listeners: list[Callable[[AlarmEvent], None]] = []
        # Called before each timed evaluation (sampling GPUs, say).
        self.before: list[Callable[[float], None]] = []
        self.evaluated_at: float | None = None
        self._queue: asyncio.Queue[AlarmEvent] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def evaluate(self, now: float | None = None) -> list[AlarmEvent]:
        """One evaluation of every rule at ``now`` (the evaluator's clock)."""
        now = self.clock() if now is None else now
        wall = self.wall()
        try:
            self.signals.begin(now)
        except Exception:  # a layer's stats() failing must not stop the evaluation
            log.exception("reading the layers' stats failed")
        events = []
        for alarm in self.alarms:
            try:
                value = self.signals.value(alarm.rule, now)
            except Exception:  # a broken signal must not stop the other rules
                log.exception("alarm %s: reading %s failed", alarm.rule.name, alarm.rule.metric)
                value = None
            event = alarm.step(value, now, wall)
            if event is not None:
                events.append(event)
        self.evaluated_at = wall
        for event in events:
            for listener in self.listeners:
                try:
                    listener(event)
                except Exception:
                    log.exception("alarm listener failed")
        return events

    async def dispatch(self, events: Iterable[AlarmEvent]) -> None:
        """Send each event to every notifier (notifiers concurrently, events in order)."""
        for event in events:
            await asyncio.gather(*(self._send(n, event) for n in self.notifiers))

    @staticmethod
    async def _send(notifier: Notifier, event: AlarmEvent) -> None:
        try:
            await notifier.send(event)
        except Exception as exc:
            log.warning("alarm %s: %s failed: %s", event.rule.name, type(notifier).__name__, exc)

    def snapshot(self) -> dict[str, Any]:
        """What ``GET /alarms`` and the dashboard show."""
        return {"evaluated_at": self.evaluated_at, "alarms": [a.snapshot() for a in self.alarms]}

    def states(self) -> list[tuple[str, str, str]]:
        return [(a.rule.name, a.rule.severity, str(a.state)) for a in self.alarms]

    # -- the background loop ------------------------------------------------------------------

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._tasks = [
            asyncio.create_task(self._loop(), name="alarms-evaluate"),
            asyncio.create_task(self._sender(), name="alarms-notify"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _loop(self) -> None:
        assert self._queue is not None
        while True:
            await asyncio.sleep(self.every)
            now = self.clock()
            for hook in self.before:
                try:
                    hook(now)
                except Exception:
                    log.exception("alarm sampling hook failed")
            for event in self.evaluate(now):
                self._queue.put_nowait(event)

    async def _sender(self) -> None:
        # One sender: notifications leave in the order the states changed, and a slow webhook
        # delays notifications, never evaluations.
        assert self._queue is not None
        while True:
            event = await self._queue.get()
            await self.dispatch([event])
