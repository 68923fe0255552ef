"""Observability: metrics, alarms, the live dashboard and the access log.

``attach(gateway, config)`` wires all of it into a ``Gateway``: the per-request observers, the
``/metrics``, ``/alarms`` and ``/dashboard`` routes, and the background tasks (engine metrics
scraper, GPU sampler, alarm evaluator) started and stopped with the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST

from fortress.config import FortressConfig
from fortress.observe import http
from fortress.observe.alarms import AlarmEvaluator, Signals
from fortress.observe.dashboard import Dashboard
from fortress.observe.engines import EngineScraper
from fortress.observe.logs import AccessLog
from fortress.observe.metrics import GatewayMetrics
from fortress.observe.notify import build_notifiers
from fortress.observe.system import GpuProbe, host_memory
from fortress.observe.window import GaugeSeries, RecentTraffic
from fortress.routing.replica import State

if TYPE_CHECKING:
    from fortress.gateway.app import Gateway

__all__ = ["Observability", "attach"]

log = logging.getLogger("fortress.observe")

SAMPLE_EVERY = 5.0  # seconds between GPU samples (alarm windows are a minute or more)
EMF_GAUGES_EVERY = 60.0  # CloudWatch's standard resolution


def memory_percent() -> float | None:
    mem = host_memory()
    return 100.0 * mem[0] / mem[1] if mem else None


class Observability:
    """Everything ``attach`` builds, kept together so tests and other layers can reach it.

    The fleet's autoscaler can listen to alarms with
    ``obs.evaluator.listeners.append(callback)`` (events of rules whose action is ``scale_up``);
    the audit layer's lag is read from its ``journal_lag()`` method when it has one.
    """

    def __init__(self, gateway: Gateway, config: FortressConfig) -> None:
        cfg = config.observe
        router = gateway.router
        self.config = config
        # perf_counter: the clock of ctx.t0, so one reading serves the latency and the window.
        self.clock = clock = time.perf_counter
        self.admin_token = config.server.admin_token
        self.metrics_public = cfg.metrics_public
        self.recent = RecentTraffic(clock=clock)
        self.gpus = GpuProbe()
        self.gpu_series = GaugeSeries()
        self.scraper = (
            EngineScraper(router, cfg.engine_metrics_interval) if cfg.engine_metrics_interval > 0 else None
        )
        self.metrics = GatewayMetrics(router, self.recent, self.scraper, self.gpus)
        self.access_log = AccessLog(cfg.access_log) if cfg.access_log.enabled else None
        self.signals = Signals(self.recent, router, self.gpu_series, memory_percent)
        self.evaluator: AlarmEvaluator | None = None
        if cfg.alarms.enabled:
            self.evaluator = AlarmEvaluator(
                cfg.alarms.rules,
                self.signals,
                build_notifiers(cfg.alarms.notify),
                every=cfg.alarms.evaluate_every,
                clock=clock,
            )
            self.metrics.state.alarm_states = self.evaluator.states
        lag = getattr(gateway.audit, "journal_lag", None)
        if callable(lag):
            self.metrics.state.journal_lag = lag
        stats = getattr(gateway.audit, "stats", None)
        if callable(stats):
            self.metrics.state.audit_stats = stats
        self.dashboard = Dashboard(
            router,
            self.recent,
            self.admin_token,
            self.scraper,
            self.gpus,
            self.evaluator.snapshot if self.evaluator is not None else None,
        )
        self._router = router
        self._sampler: asyncio.Task[None] | None = None

    def install(self, gateway: Gateway) -> None:
        """Register observers, routes and start/stop hooks on ``gateway``."""
        cfg = self.config.observe
        gateway.observers.append(self.metrics.requests.observe)
        if self.access_log is not None:
            gateway.observers.append(self.access_log.observe)
            gateway.on_shutdown.append(self.access_log.shutdown)  # write the buffered lines
        if cfg.metrics:
            gateway.routes["/metrics"] = self.serve_metrics
        gateway.routes["/alarms"] = self.serve_alarms
        if cfg.dashboard:
            gateway.routes["/dashboard"] = self.dashboard
        gateway.on_startup.append(self.start)
        gateway.on_shutdown.append(self.stop)

    async def start(self) -> None:
        if self.scraper is not None:
            await self.scraper.start()
        if self.evaluator is not None:
            await self.evaluator.start()
        self._sampler = asyncio.create_task(self._sample_loop(), name="observe-sampler")

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        if self.evaluator is not None:
            await self.evaluator.stop()
        if self.scraper is not None:
            await self.scraper.stop()
        self.gpus.close()

    def sample(self, now: float) -> None:
        """Take one GPU sample for the alarms (mean utilisation over the GPUs)."""
        if self.gpus.available:
            gpus = self.gpus.sample()
            if gpus:
                self.gpu_series.add(now, sum(g.utilization for g in gpus) / len(gpus))

    async def _sample_loop(self) -> None:
        next_emf = self.clock()
        while True:
            now = self.clock()
            try:
                self.sample(now)
                if self.access_log is not None and self.access_log.emf and now >= next_emf:
                    next_emf = now + EMF_GAUGES_EVERY
                    self.access_log.emit_gauges(self.gauges())
            except Exception:
                log.exception("observability sampling failed")
            await asyncio.sleep(SAMPLE_EVERY)

    def gauges(self) -> dict[str, float | None]:
        """The periodic gauges written as EMF (the CloudWatch alarm export refers to them)."""
        replicas = list(self._router.all_replicas())
        counts = [
            self._router.healthy_count(route) for route in self._router.index.values() if not route.is_alias
        ]
        return {
            "UnhealthyReplicas": float(sum(1 for r in replicas if r.state is State.UNHEALTHY)),
            "HealthyReplicas": float(min(counts)) if counts else None,
            "GpuUtilization": self.gpu_series.last(),
            "MemoryUtilization": memory_percent(),
        }

    # -- routes -------------------------------------------------------------------------------

    async def serve_metrics(self, scope: http.Scope, receive: http.Receive, send: http.Send) -> None:
        if scope["path"] != "/metrics":
            await http.not_found(send, scope["path"])
            return
        if not (self.metrics_public or http.admin_allowed(scope, self.admin_token)):
            await http.forbidden(send)
            return
        await http.respond(send, 200, self.metrics.render(), CONTENT_TYPE_LATEST)

    async def serve_alarms(self, scope: http.Scope, receive: http.Receive, send: http.Send) -> None:
        if scope["path"] != "/alarms":
            await http.not_found(send, scope["path"])
            return
        if not http.admin_allowed(scope, self.admin_token):
            await http.forbidden(send)
            return
        if self.evaluator is None:
            await http.respond_json(send, 200, {"enabled": False, "evaluated_at": None, "alarms": []})
            return
        await http.respond_json(send, 200, {"enabled": True, **self.evaluator.snapshot()})


def attach(gateway: Gateway, config: FortressConfig) -> Observability:
    """Add metrics, alarms, the dashboard and the access log to ``gateway``."""
    obs = Observability(gateway, config)
    obs.install(gateway)
    return obs
