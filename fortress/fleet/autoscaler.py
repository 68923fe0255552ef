"""The autoscaler of one pool: signals, its own short memory and the time in; a count and why out.

Pure: no I/O, no clock of its own (``Signals`` carries the monotonic time for delays and the
wall-clock time for schedules), so every rule is unit-tested on a fake clock. Each ``decide``:

1. **Bounds.** The pool's ``min_replicas``/``max_replicas``, or those of the schedule in force
   (``fleet.schedule``). A schedule applies at once, whatever the delays.
2. **Recommendation.** Per target, the count that brings the metric to its target value:
   ``ceil(total / value)`` for per-replica amounts (in-flight requests, counting those waiting
   for a wake; engine queue; tokens/s), ``ceil(ready * average / value)`` for utilisations (KV
   cache, CPU, GPU); within ``tolerance`` of the target, the count the pool has. The largest
   wins. Without targets (or signals) the count holds. A pool with traffic is never
   recommended 0.
3. **Stabilisation** (HPA's windows). Out: once every recommendation during the last
   ``scale_out_delay`` asked for more, to the latest one; in: to the largest recommended during
   the last ``scale_in_delay``, from metrics averaged over ``metric_window`` (a burst shows at
   once; a lull only once it lasts). A request waiting for a pool at 0 skips the out window:
   waking is never delayed. After a scale-out, while replicas are still starting (at most
   ``warmup`` seconds), no further scale-out: requests queued during a cold start are for the
   replicas about to be ready.
4. **Step**: at most ``max_step`` replicas added or removed per decision.
5. **Zero.** Only when the bounds allow it (min 0) and either the bounds force it (max 0) or
   nothing was asked of the pool for ``idle_to_zero`` seconds; otherwise at least one.

An operator's ``pin`` (``fortress fleet scale``, ``stop``) replaces all of this until unpinned.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime

from fortress.config import FleetConfig
from fortress.fleet.schedule import Bounds, bounds_at

# Metrics read as a pool total per replica, and utilisations averaged over ready replicas.
TOTALS = ("in_flight", "queue", "tokens_per_second")
UTILISATIONS = ("kv_cache", "cpu", "gpu")


@dataclass(frozen=True)
class Signals:
    """What the controller saw of one pool at one moment."""

    now: float  # monotonic seconds: delays and idleness
    wall: datetime  # aware: schedules
    current: int  # replicas the pool has (starting or running)
    ready: int = 0  # of those, healthy and taking traffic
    # Pool totals for TOTALS, averages over ready replicas for UTILISATIONS; a metric without a
    # signal is absent.
    metrics: Mapping[str, float] = field(default_factory=dict)
    waiting: int = 0  # requests waiting for a replica of this pool (a wake)
    last_request: float | None = None  # monotonic time the pool last had a request in flight
    alarms: tuple[str, ...] = ()  # of the pool's scale_out_on_alarms, those firing now


@dataclass(frozen=True)
class Decision:
    """A desired count and why: ``kind`` is the metric label (target, schedule, idle, wake,
    bounds, manual, hold), ``reason`` the sentence for people."""

    desired: int
    kind: str
    reason: str
    bounds: Bounds
    recommended: int  # before stabilisation, step and bounds


class Autoscaler:
    """Decides the replica count of one pool; keeps only its recommendation history."""

    def __init__(self, config: FleetConfig, now: float, current: int) -> None:
        self.config = config
        self.pinned: int | None = None  # an operator's count, held until unpinned
        self.started = now
        # (time, recommendation): the windows are read from here. It starts with the count the
        # pool started with, so nothing scales out before a whole scale_out_delay of load.
        self.history: deque[tuple[float, int]] = deque([(now, current)])
        self.last_out: float | None = None  # when the count last went up (warm-up)
        # Scale-in's own recommendations, from metrics averaged over metric_window.
        self.in_history: deque[tuple[float, int]] = deque([(now, current)])
        self.samples: deque[tuple[float, Mapping[str, float], int]] = deque()  # (t, metrics, waiting)

    def pin(self, count: int | None) -> None:
        """Hold the pool at ``count`` (None: back to the autoscaler)."""
        if count is not None and not 0 <= count <= self.config.max_replicas:
            raise ValueError(
                f"the pool has {self.config.max_replicas} slots: give 0..{self.config.max_replicas}"
            )
        self.pinned = count

    def bounds(self, wall: datetime) -> Bounds:
        return bounds_at(self.config, wall)

    def recommend(self, s: Signals) -> tuple[int, str]:
        """The count the targets ask for (before windows and bounds), and the target's words."""
        best: tuple[int, str] | None = None
        for t in self.config.target:
            value = s.metrics.get(t.metric)
            if t.metric == "in_flight":
                value = (value or 0.0) + s.waiting
            if value is None:
                continue  # no signal: this target has no say
            if t.metric in TOTALS:
                count = math.ceil(value / t.value - 1e-9)
                ratio = value / (t.value * s.current) if s.current else None
                words = f"{t.metric} {value:g} at {t.value:g} per replica"
            else:
                count = math.ceil(s.ready * value / t.value - 1e-9) if s.ready else 0
                ratio = value / t.value if s.ready else None
                words = f"{t.metric} {value:g} on {s.ready} ready, target {t.value:g}"
            if ratio is not None and abs(ratio - 1) <= self.config.tolerance:
                count = s.current  # near enough the target (HPA's tolerance): no change
            if best is None or count > best[0]:
                best = (count, words)
        if s.alarms and s.current > 0:  # an alarm action: one more than the pool has
            more = (s.current + 1, f"alarm {', '.join(s.alarms)} firing")
            best = more if best is None or more[0] > best[0] else best
        if best is None:  # no target: hold, but wake for a waiting request
            return max(s.current, 1 if s.waiting else 0), "no target"
        count, words = best
        if count == 0 and (s.waiting or s.metrics.get("in_flight")):
            count = 1
        return count, words

    def decide(self, s: Signals) -> Decision:
        cfg = self.config
        bounds = self.bounds(s.wall)
        if self.pinned is not None:
            return Decision(
                self.pinned, "manual", f"held at {self.pinned} by the operator", bounds, self.pinned
            )
        rec, words = self.recommend(s)
        rec_in, words_in = self.recommend(self._smoothed(s))
        self.history.append((s.now, rec))
        self.in_history.append((s.now, rec_in))
        horizon = s.now - max(cfg.scale_out_delay, cfg.scale_in_delay)
        for h in (self.history, self.in_history):
            while len(h) > 1 and h[1][0] <= horizon:
                h.popleft()  # keep one entry at or before the horizon: the window's start

        kind, reason = "hold", f"{words}: hold at {s.current}"
        desired = s.current
        warming = s.ready < s.current and self.last_out is not None and s.now - self.last_out < cfg.warmup
        if rec > s.current:
            if warming and s.current > 0:
                reason = f"{words}: wants {rec}, {s.current - s.ready} replica(s) still starting (warmup)"
            elif s.current == 0 and s.waiting:
                desired, kind = rec, "wake"
                reason = f"{s.waiting} request(s) waiting for a wake ({words})"
            else:
                # The window confirms that the pool needs more (every recommendation in it
                # asks for more); the latest reading says how many. Sizing on the window's
                # smallest would answer a burst in two steps, a cold start apart.
                if min(r for t, r in self._window(s.now, cfg.scale_out_delay)) > s.current:
                    desired, kind = rec, "target"
                    reason = f"{words}: scale out to {rec}"
                else:
                    reason = f"{words}: wants {rec}, waiting out scale_out_delay {cfg.scale_out_delay:g}s"
        elif rec_in < s.current and rec <= s.current:
            keep = max(r for t, r in self._window(s.now, cfg.scale_in_delay, self.in_history))
            # Never below what scale-out would ask for again at once: no flapping between the
            # averaged scale-in signal and the latest interval's.
            keep = max(keep, min(r for t, r in self._window(s.now, cfg.scale_out_delay)))
            if keep < s.current:
                desired, kind = keep, "target"
                reason = f"{words_in}: scale in to {keep}"
            else:
                reason = f"{words_in}: wants {rec_in}, waiting out scale_in_delay {cfg.scale_in_delay:g}s"

        if cfg.max_step is not None and abs(desired - s.current) > cfg.max_step:
            desired = s.current + (cfg.max_step if desired > s.current else -cfg.max_step)
            reason += f" (max_step {cfg.max_step}: {desired})"

        # Zero only when allowed and meant: idle for idle_to_zero (min 0), or scheduled off
        # (max 0, below). A pool at 0 stays there until a request (or its min) wakes it.
        busy = bool(s.waiting or s.metrics.get("in_flight"))
        if bounds.min == 0 and s.current > 0 and self._idle(s, busy):
            desired, kind = 0, "idle"
            reason = f"no request for {cfg.idle_to_zero:g}s: scale to zero"
        elif desired == 0 and s.current > 0 and bounds.max > 0:
            desired = 1
            reason = f"{words}: keep one replica (zero only after idle_to_zero)"

        # Bounds last: a cap that only limits a change keeps its kind; one that makes or turns
        # the change is the schedule's (or the bounds').
        wanted = desired
        desired = min(max(desired, bounds.min), bounds.max)
        if desired != wanted:
            by = f" by {bounds.schedule}" if bounds.schedule else ""
            reason = (
                f"{reason}; capped at max {bounds.max}{by}"
                if desired < wanted
                else f"at least min {bounds.min}{by}"
            )
            if (wanted - s.current) * (desired - s.current) <= 0:
                kind = "schedule" if bounds.schedule else "bounds"
        if desired > s.current:
            self.last_out = s.now
        return Decision(desired, kind if desired != s.current else "hold", reason, bounds, rec)

    def _idle(self, s: Signals, busy: bool) -> bool:
        """Nothing asked of the pool for idle_to_zero seconds (since start, if never)."""
        if self.config.idle_to_zero is None or busy:
            return False
        since = s.last_request if s.last_request is not None else self.started
        return s.now - since >= self.config.idle_to_zero

    def _window(
        self, now: float, delay: float, history: deque[tuple[float, int]] | None = None
    ) -> list[tuple[float, int]]:
        """The recommendations in force during the last ``delay`` seconds: those made within it,
        and the one made just before it (it held at the window's start)."""
        start = now - delay
        history = self.history if history is None else history
        inside = [(t, r) for t, r in history if t > start]
        before = [(t, r) for t, r in history if t <= start]
        return ([before[-1]] if before else []) + inside

    def _smoothed(self, s: Signals) -> Signals:
        """``s`` with its metrics (and waiting requests) averaged over ``metric_window``."""
        window = self.config.metric_window
        if window <= 0:
            return s
        self.samples.append((s.now, s.metrics, s.waiting))
        while self.samples and self.samples[0][0] <= s.now - window:
            self.samples.popleft()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for _, metrics, _ in self.samples:
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
                counts[k] = counts.get(k, 0) + 1
        waiting = sum(w for _, _, w in self.samples) / len(self.samples)
        return replace(s, metrics={k: sums[k] / counts[k] for k in sums}, waiting=math.ceil(waiting - 1e-9))
