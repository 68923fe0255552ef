"""Everything observe/ builds for one gateway process, from the config.

``Observability`` holds the per-request observers (metrics, access log), the routes it serves
(``/metrics``, ``/alarms``, ``/dashboard``) and the background tasks (the sampler: replica
health every second and the dashboard's history every 5 s, GPUs; the alarm evaluator). The
runtime passes ``observers`` and ``routes`` to the gateway at construction and calls
``start``/``stop``; the fleet's autoscaler can listen to alarm events through
``evaluator.listeners`` (rules whose action is ``scale_up``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from fortress.config import FortressConfig
from fortress.core import errors
from fortress.core.admin import admin_allowed
from fortress.core.asgi import Handler, Receive, Scope, Send, respond, respond_error, respond_json
from fortress.core.layers import Observer
from fortress.observe.alarms import (
    AlarmEvaluator,
    Signals,
    journal_disk_percent,
    store_unreachable,
    unhealthy_count,
)
from fortress.observe.dashboard import Dashboard, replica_health
from fortress.observe.logs import AccessLog
from fortress.observe.metrics import GatewayMetrics
from fortress.observe.notify import build_notifiers
from fortress.observe.shared import WorkerMetrics
from fortress.observe.system import GpuProbe, host_memory
from fortress.observe.window import GaugeSeries, History, RecentTraffic
from fortress.routing.pool import Router

__all__ = ["Observability"]

log = logging.getLogger("fortress.observe")

SAMPLE_EVERY = 5.0  # seconds between GPU samples (alarm windows are a minute or more)
HEALTH_EVERY = 1.0  # seconds between replica health readings (a restart's dip lasts a few)
HISTORY_STEP = 5.0  # seconds per point of the dashboard's history
HISTORY_SECONDS = 3600.0
EMF_GAUGES_EVERY = 60.0  # CloudWatch's standard resolution


def memory_percent() -> float | None:
    mem = host_memory()
    return 100.0 * mem[0] / mem[1] if mem else None


class Observability:
    """Metrics, alarms, dashboard and access log of one gateway; built by the runtime."""

    def __init__(
        self,
        config: FortressConfig,
        router: Router,
        stats: Sequence[Callable[[], dict[str, Any]]] = (),
        workers: WorkerMetrics | None = None,
    ) -> None:
        cfg = config.observe
        # The layers' stats() (audit, access, connections, the supervisor's slots), read at
        # scrape, evaluation and sampling time.
        self._stats_sources = tuple(stats)
        self._emf_counters: dict[str, float] = {}
        self.config = config
        # perf_counter: the clock of ctx.t0, so one reading serves the latency and the window.
        self.clock = clock = time.perf_counter
        self.admin_token = config.server.admin_token
        self.metrics_public = cfg.metrics_public
        self.recent = RecentTraffic(clock=clock)
        self.history = History(HISTORY_STEP, HISTORY_SECONDS)
        self.gpus = GpuProbe()
        self.gpu_series = GaugeSeries()
        self.access_log = AccessLog(cfg.access_log) if cfg.access_log.enabled else None
        self.signals = Signals(
            self.recent, router, self.gpu_series, memory_percent, self.stats if stats else None
        )
        self.evaluator: AlarmEvaluator | None = None
        if cfg.alarms.enabled:
            self.evaluator = AlarmEvaluator(
                cfg.alarms.rules,
                self.signals,
                build_notifiers(cfg.alarms.notify),
                every=cfg.alarms.evaluate_every,
                clock=clock,
            )
        self.metrics = GatewayMetrics(
            router,
            self.recent,
            engines=config.routing.engine_metrics_interval > 0,
            gpus=self.gpus,
            layer_stats=self.stats if stats else None,
            alarm_states=self.evaluator.states if self.evaluator is not None else None,
            workers=workers,
        )
        self.dashboard = Dashboard(
            router,
            self.recent,
            self.admin_token,
            self.gpus,
            self.evaluator.snapshot if self.evaluator is not None else None,
            self.history,
            self._slots,
            lambda: self.stats().get("fleet") or [],
        )
        self._router = router
        self._sampler: asyncio.Task[None] | None = None

    def stats(self) -> dict[str, Any]:
        """The layers' stats() merged into one dict (their keys are distinct)."""
        out: dict[str, Any] = {}
        for source in self._stats_sources:
            out.update(source())
        return out

    def _slots(self) -> list[dict[str, Any]]:
        slots: list[dict[str, Any]] = self.stats().get("local_slots") or []
        return slots

    @property
    def observers(self) -> list[Observer]:
        """Called by the gateway with every finished completion request."""
        out: list[Observer] = [self.metrics.requests.observe]
        if self.access_log is not None:
            out.append(self.access_log.observe)
        return out

    @property
    def routes(self) -> dict[str, Handler]:
        """Path prefix → handler, served by the gateway beside the API."""
        cfg = self.config.observe
        routes: dict[str, Handler] = {}
        if cfg.metrics:
            routes["/metrics"] = self.serve_metrics
        routes["/alarms"] = self.serve_alarms
        if cfg.dashboard:
            routes["/dashboard"] = self.dashboard
        return routes

    async def start(self) -> None:
        if self.evaluator is not None:
            await self.evaluator.start()
        self._sampler = asyncio.create_task(self._sample_loop(), name="observe-sampler")

    async def stop(self) -> None:
        try:
            self.metrics.publish()  # the last counts of this worker, for the others
        except Exception:
            log.exception("publishing this worker's metrics failed")
        if self.access_log is not None:
            await self.access_log.shutdown()  # write the buffered lines
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        if self.evaluator is not None:
            await self.evaluator.stop()
        self.gpus.close()

    def sample(self, now: float) -> None:
        """Take one GPU sample for the alarms (mean utilisation over the GPUs)."""
        if self.gpus.available:
            gpus = self.gpus.sample()
            if gpus:
                self.gpu_series.add(now, sum(g.utilization for g in gpus) / len(gpus))

    def sample_health(self, stats: dict[str, Any] | None = None) -> None:
        """Note the replicas' health for the history's current step (every second)."""
        stats = self.stats() if stats is None else stats
        self.history.note(replica_health(self._router, stats.get("local_slots")))

    def sample_history(self, now: float) -> dict[str, Any] | None:
        """Close the history's current step: traffic since the last point, the step's worst
        health, and the supervisor's restart counter."""
        stats = self.stats()
        self.sample_health(stats)
        restarts = stats.get("replica_restarts_total")
        # Each managed pool's desired and current replicas (the dashboard's fleet chart).
        fleet = {p["pool"]: [p["desired"], p["current"]] for p in stats.get("fleet") or ()}
        return self.history.close(time.time(), now, self.recent, restarts=restarts, fleet=fleet)

    async def _sample_loop(self) -> None:
        start = self.clock()
        next_gpu = next_emf = start
        next_point = start + HISTORY_STEP
        while True:
            now = self.clock()
            try:
                if now >= next_point:
                    next_point = max(next_point + HISTORY_STEP, now)
                    self.sample_history(now)
                else:
                    self.sample_health()
                if now >= next_gpu:
                    next_gpu = now + SAMPLE_EVERY
                    self.sample(now)
                self.metrics.publish()  # with workers: what the others sum into their /metrics
                if self.access_log is not None and self.access_log.emf and now >= next_emf:
                    next_emf = now + EMF_GAUGES_EVERY
                    self.access_log.emit_gauges(self.gauges())
            except Exception:
                log.exception("observability sampling failed")
            await asyncio.sleep(HEALTH_EVERY)

    def gauges(self) -> dict[str, float | None]:
        """The periodic gauges written as EMF (the CloudWatch alarm export refers to them)."""
        replicas = list(self._router.all_replicas())
        counts = [
            self._router.healthy_count(route) for route in self._router.index.values() if not route.is_alias
        ]
        stats = self.stats()
        return {
            "JournalDiskUtilization": journal_disk_percent(stats),
            "StoreUnreachable": store_unreachable(stats),
            "LimiterFailOpen": self._emf_increase(stats, "fail_open_admissions_total"),
            "ConnectionsRefused": self._emf_increase(
                stats, "connections_refused_total", "connections_busy_total"
            ),
            "ReplicaRestarts": self._emf_increase(stats, "replica_restarts_total"),
            "UnhealthyReplicas": float(unhealthy_count(self._router, stats)),
            "HealthyReplicas": float(min(counts)) if counts else None,
            "WrongModelReplicas": float(sum(1 for r in replicas if r.wrong_model is not None)),
            "GpuUtilization": self.gpu_series.last(),
            "MemoryUtilization": memory_percent(),
        }

    def _emf_increase(self, stats: dict[str, Any], *keys: str) -> float | None:
        # CloudWatch sums these per period: write what the counters gained since the last line.
        values = [stats[k] for k in keys if stats.get(k) is not None]
        if not values:
            return None
        value = float(sum(values))
        last = self._emf_counters.get(keys[0], 0.0)
        self._emf_counters[keys[0]] = value
        return value - last

    # -- routes -------------------------------------------------------------------------------

    async def serve_metrics(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] != "/metrics":
            await respond_error(send, errors.not_found(scope["method"], scope["path"]))
            return
        if not (self.metrics_public or admin_allowed(scope, self.admin_token, allow_cookie=True)):
            await respond_error(send, errors.admin_required())
            return
        await respond(send, 200, self.metrics.render(), CONTENT_TYPE_LATEST)

    async def serve_alarms(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] != "/alarms":
            await respond_error(send, errors.not_found(scope["method"], scope["path"]))
            return
        if not admin_allowed(scope, self.admin_token, allow_cookie=True):
            await respond_error(send, errors.admin_required())
            return
        no_store = [(b"cache-control", b"no-store")]
        if self.evaluator is None:
            await respond_json(send, 200, {"enabled": False, "evaluated_at": None, "alarms": []}, no_store)
            return
        await respond_json(send, 200, {"enabled": True, **self.evaluator.snapshot()}, no_store)
