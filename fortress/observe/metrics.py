"""Prometheus metrics of the gateway, served at ``GET /metrics`` from a private registry.

Two kinds of series:

* **per request**, updated by ``RequestMetrics.observe`` (a gateway observer) once a completion
  request has finished: counts by model, status and outcome, latency, time to first token,
  inter-token latency, tokens, retries, upstream errors and the gateway's own overhead. The
  labelled children for a (model, status) pair are bound once and cached, so a request costs a
  dict lookup and a few increments;
* **read at scrape time** by ``StateCollector``: replica states and in-flight counts from the
  router, the engines' own load (``replica.load``, scraped by ``routing.load``), GPUs (NVML) or
  host memory, the audit trail's counters and the alarms. Nothing of this is on the request path.

Label values are bounded: ``model`` is a configured or discovered model name (the gateway sets
``ctx.model`` only once the name routed), ``status`` an HTTP status, ``replica`` a member of the
pool; nothing per request or per user.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from time import perf_counter
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from fortress.core.context import RequestContext
from fortress.observe.alarms import slot_down
from fortress.observe.series import CounterFamily, Families, HistogramFamily
from fortress.observe.shared import WorkerMetrics
from fortress.observe.system import GpuProbe, host_memory
from fortress.observe.window import RecentTraffic
from fortress.routing.pool import Pool, Router
from fortress.routing.replica import Replica, State

# LLM answers take seconds to minutes; the seed's alarms sit at 30 s and 60 s.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1)
OVERHEAD_BUCKETS = (25e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 50e-3)

UNKNOWN_MODEL = "unknown"
ALARM_STATES = ("ok", "pending", "firing", "resolved")


def outcome(status: int) -> str:
    """A coarse, alertable reading of a final HTTP status."""
    if 0 < status < 400:
        return "ok"
    if status == 429:
        return "rate_limited"
    if status == 499:
        return "cancelled"
    if status == 502:
        return "upstream_error"
    if status == 503:
        return "unavailable"
    if status == 504:
        return "timeout"
    if 400 <= status < 500:
        return "client_error"
    if status >= 500:
        return "server_error"
    return "aborted"  # no status: the request ended by an exception


def error_kind(status: int, error: str | None) -> str | None:
    """Why a request failed upstream (None when it did not): bounded, from the relay's message."""
    if status < 500 or status == 503:
        return "no_healthy_replica" if status == 503 else None
    text = error or ""
    if status == 504 or "timeout" in text:
        return "timeout"
    if "connect failed" in text:
        return "connect"
    if " answered 5" in text:
        return "status_5xx"
    if "ended the stream early" in text:
        return "stream_ended"
    if "closed by replica" in text or "reset by replica" in text or "cut off" in text:
        return "disconnect"
    return "other"


class _Unused:
    """Stands in for the children a request without a routed model never updates."""

    def inc(self, amount: float = 1) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


_UNUSED = _Unused()


class _Bound:
    """The labelled children one (model, status) pair updates."""

    __slots__ = ("itl", "latency", "rate_limited", "requests", "retries", "tok_in", "tok_out", "ttft")

    def __init__(self, m: RequestMetrics, model: str | None, status: int) -> None:
        name = model or UNKNOWN_MODEL
        self.requests = m.requests.labels(name, str(status), outcome(status))
        self.latency = m.latency.labels(name)
        self.rate_limited = m.rate_limited.labels(name) if status == 429 else None
        # Requests refused before routing (400, 404, 413) never reach a replica: no empty
        # TTFT/token series for them.
        routed = model is not None
        self.ttft: Any = m.ttft.labels(name) if routed else _UNUSED
        self.itl: Any = m.itl.labels(name) if routed else _UNUSED
        self.tok_in: Any = m.tokens.labels(name, "in") if routed else _UNUSED
        self.tok_out: Any = m.tokens.labels(name, "out") if routed else _UNUSED
        self.retries: Any = m.retries.labels(name) if routed else _UNUSED


class RequestMetrics:
    """Per-request series, and the observer the gateway calls with each finished request."""

    def __init__(self, registry: CollectorRegistry, recent: RecentTraffic | None = None) -> None:
        self.recent = recent
        self.requests = CounterFamily(
            "fortress_requests",
            "Completion requests answered, by model, HTTP status and outcome.",
            ["model", "status", "outcome"],
        )
        self.latency = HistogramFamily(
            "fortress_request_duration_seconds",
            "Time from a request's arrival to the end of its answer.",
            ["model"],
            buckets=LATENCY_BUCKETS,
        )
        self.ttft = HistogramFamily(
            "fortress_time_to_first_token_seconds",
            "Streams: time from arrival to the first event sent to the client.",
            ["model"],
            buckets=TTFT_BUCKETS,
        )
        self.itl = HistogramFamily(
            "fortress_inter_token_latency_seconds",
            "Streams: mean gap between output tokens, (duration - TTFT) / (tokens - 1).",
            ["model"],
            buckets=ITL_BUCKETS,
        )
        self.tokens = CounterFamily(
            "fortress_tokens",
            "Tokens by model and direction (in: prompt, out: completion), from usage.",
            ["model", "direction"],
        )
        self.retries = CounterFamily(
            "fortress_retries",
            "Extra attempts on another replica after a failure before the first byte.",
            ["model"],
        )
        self.rate_limited = CounterFamily(
            "fortress_rate_limited",
            "Requests refused with 429 by the usage plan.",
            ["model"],
        )
        self.upstream_errors = CounterFamily(
            "fortress_upstream_errors",
            "Requests that failed because of the replicas, by kind.",
            ["kind"],
        )
        self.overhead = HistogramFamily(
            "fortress_gateway_overhead_seconds",
            "Time spent in the gateway itself (before the upstream call and preparing the answer).",
            buckets=OVERHEAD_BUCKETS,
        )
        # Plain numbers on the request path, read by the registry at scrape time (series.py).
        self.families = Families(
            [
                self.requests,
                self.latency,
                self.ttft,
                self.itl,
                self.tokens,
                self.retries,
                self.rate_limited,
                self.upstream_errors,
                self.overhead,
            ]
        )
        registry.register(self.families)
        self._overhead = self.overhead.labels()
        self._bound: dict[tuple[str | None, int], _Bound] = {}
        self._errors: dict[str, Any] = {}

    def _bind(self, model: str | None, status: int) -> _Bound:
        b = self._bound[(model, status)] = _Bound(self, model, status)
        return b

    def observe(self, ctx: RequestContext) -> None:
        """Record one finished request (the gateway observer); a few microseconds."""
        now = perf_counter()
        status = ctx.status
        b = self._bound.get((ctx.model, status)) or self._bind(ctx.model, status)
        latency = now - ctx.t0
        b.requests.inc()
        b.latency.observe(latency)
        ttft = None
        if ctx.stream and ctx.ttfb is not None:
            ttft = ctx.ttfb
            b.ttft.observe(ttft)
        tin = tout = 0
        usage = ctx.usage
        if usage:
            tin = usage.get("prompt_tokens") or 0
            tout = usage.get("completion_tokens") or 0
            if type(tin) is not int or type(tout) is not int or tin < 0 or tout < 0:
                tin = tout = 0  # a replica's odd usage: counters only go up
            if tin:
                b.tok_in.inc(tin)
            if tout:
                b.tok_out.inc(tout)
                if ttft is not None and tout > 1:
                    b.itl.observe((latency - ttft) / (tout - 1))
        if ctx.attempts > 1:
            b.retries.inc(ctx.attempts - 1)
        if status >= 400:
            self._failed(b, status, ctx.error)
        if ctx.overhead:
            self._overhead.observe(ctx.overhead)
        if self.recent is not None:
            self.recent.add(now, status, latency, ttft, tin, tout)

    def _failed(self, b: _Bound, status: int, error: str | None) -> None:
        if b.rate_limited is not None:
            b.rate_limited.inc()
        kind = error_kind(status, error)
        if kind is not None:
            child = self._errors.get(kind)
            if child is None:
                child = self._errors[kind] = self.upstream_errors.labels(kind)
            child.inc()


def _pool_model(pool: Pool, replica: Replica) -> str:
    if pool.model is not None:
        return pool.model
    return ",".join(sorted(replica.models)) or UNKNOWN_MODEL


class StateCollector(Collector):
    """Series computed when Prometheus scrapes: replicas, engines, GPUs, journal lag, alarms."""

    def __init__(
        self,
        router: Router,
        engines: bool = False,
        gpus: GpuProbe | None = None,
        layer_stats: Callable[[], dict[str, Any]] | None = None,
        alarm_states: Callable[[], Iterable[tuple[str, str, str]]] | None = None,
    ) -> None:
        self.router = router
        self.engines = engines  # engine load is scraped (routing.engine_metrics_interval > 0)
        self.gpus = gpus
        # The layers' ``stats()`` merged (their keys are distinct): the audit journal and
        # shipper, the key cache and the limiter, the connection guard.
        self.layer_stats = layer_stats
        # (name, severity, state) of each alarm.
        self.alarm_states = alarm_states

    def describe(self) -> Iterable[Metric]:
        return []  # computed at scrape time; names are not known ahead

    def collect(self) -> Iterable[Metric]:
        return self.families(machine=True)

    def families(self, machine: bool) -> Iterable[Metric]:
        """The series; without ``machine``, only those other workers sum (no GPUs, host
        memory, engines or alarms: every worker sees the same)."""
        yield from self._replicas()
        if self.engines and machine:
            yield from self._engines()
        if machine:
            yield from self._machine()
        if self.layer_stats is not None:
            stats = self.layer_stats()
            if "journal_seq" in stats:  # the audit layer reports
                yield from self._audit(stats)
            yield from _guards(stats)
            if "local_slots" in stats:  # the supervisor reports
                yield from _slots(stats["local_slots"])
            if "fleet" in stats:  # the fleet's controllers report
                yield from _fleet(stats["fleet"])
        if self.alarm_states is not None and machine:
            firing = GaugeMetricFamily(
                "fortress_alarm_firing", "1 while an alarm fires.", labels=["alarm", "severity"]
            )
            states = GaugeMetricFamily(
                "fortress_alarm_state", "1 for the alarm's current state.", labels=["alarm", "state"]
            )
            for name, severity, state in self.alarm_states():
                firing.add_metric([name, severity], 1.0 if state == "firing" else 0.0)
                for s in ALARM_STATES:
                    states.add_metric([name, s], 1.0 if state == s else 0.0)
            yield firing
            yield states

    @staticmethod
    def _audit(stats: dict[str, Any]) -> Iterable[Metric]:
        backlog = GaugeMetricFamily(
            "fortress_audit_backlog_records", "Audit records in the journal not yet in the store."
        )
        backlog.add_metric([], float(stats.get("backlog") or 0))
        journal = CounterMetricFamily("fortress_audit_journal_records", "Audit records made durable.")
        journal.add_metric([], float(stats.get("journal_seq") or 0))
        fsyncs = CounterMetricFamily("fortress_audit_journal_fsyncs", "Group commits of the audit journal.")
        fsyncs.add_metric([], float(stats.get("journal_fsyncs") or 0))
        ok = GaugeMetricFamily("fortress_audit_shipper_ok", "0 while shipping records to the store fails.")
        ok.add_metric([], 0.0 if stats.get("shipper_error") else 1.0)
        yield from (backlog, journal, fsyncs, ok)

    def _replicas(self) -> Iterable[Metric]:
        labels = ["replica", "model", "tier"]
        healthy = GaugeMetricFamily(
            "fortress_replicas_healthy",
            "Healthy replicas per model and tier (the load balancer's healthy host count).",
            labels=["model", "tier"],
        )
        counts = GaugeMetricFamily(
            "fortress_replicas", "Replicas per model, tier and state.", labels=["model", "tier", "state"]
        )
        in_flight_model = GaugeMetricFamily(
            "fortress_requests_in_flight", "Requests being answered by replicas, per model.", labels=["model"]
        )
        info = GaugeMetricFamily(
            "fortress_replica_info", "One per replica: its URL.", labels=[*labels, "url"]
        )
        state = GaugeMetricFamily(
            "fortress_replica_state", "1 for the replica's current state.", labels=[*labels, "state"]
        )
        in_flight = GaugeMetricFamily(
            "fortress_replica_in_flight", "Requests in flight to this replica.", labels=labels
        )
        served = CounterMetricFamily(
            "fortress_replica_requests", "Requests this replica answered.", labels=labels
        )
        failures = CounterMetricFamily(
            "fortress_replica_failures",
            "Passive failures (refused, reset, 5xx, timeout) of this replica, retried ones included.",
            labels=labels,
        )
        ejections = CounterMetricFamily(
            "fortress_replica_ejections",
            "Times outlier detection took this replica out of rotation.",
            labels=labels,
        )
        incarnation = GaugeMetricFamily(
            "fortress_replica_incarnation",
            "1 + restarts of the process behind this replica name (local replicas).",
            labels=labels,
        )
        wrong = GaugeMetricFamily(
            "fortress_replica_wrong_model",
            "1 while the replica serves another model than its pool's (out of rotation).",
            labels=labels,
        )
        mismatches = CounterMetricFamily(
            "fortress_replica_model_mismatches",
            "Times the replica was seen serving another model: by a health check's /v1/models "
            "(source=check) or in an answer, which was not relayed (source=answer).",
            labels=[*labels, "source"],
        )
        per_state: dict[tuple[str, str, str], int] = {}
        per_tier: dict[tuple[str, str], int] = {}
        per_model: dict[str, int] = {}
        for pool in self.router.pools:
            for r in pool.replicas:
                model = _pool_model(pool, r)
                tier = str(r.tier)
                lv = [r.name, model, tier]
                info.add_metric([*lv, r.url], 1.0)
                for s in State:
                    state.add_metric([*lv, str(s)], 1.0 if r.state is s else 0.0)
                in_flight.add_metric(lv, float(r.in_flight))
                served.add_metric(lv, float(r.served))
                failures.add_metric(lv, float(r.failures))
                ejections.add_metric(lv, float(r.ejections_total))
                incarnation.add_metric(lv, float(r.incarnation))
                wrong.add_metric(lv, 0.0 if r.wrong_model is None else 1.0)
                for source in ("check", "answer"):
                    mismatches.add_metric([*lv, source], float((r.model_mismatches or {}).get(source, 0)))
                key = (model, tier, str(r.state))
                per_state[key] = per_state.get(key, 0) + 1
                per_tier[(model, tier)] = per_tier.get((model, tier), 0) + (r.state is State.HEALTHY)
                per_model[model] = per_model.get(model, 0) + r.in_flight
        for (model, tier), n in per_tier.items():
            healthy.add_metric([model, tier], float(n))
        for (model, tier, st), n in per_state.items():
            counts.add_metric([model, tier, st], float(n))
        for model, n in per_model.items():
            in_flight_model.add_metric([model], float(n))
        yield from (healthy, counts, in_flight_model, info, state, in_flight, served, failures, ejections)
        yield from (incarnation, wrong, mismatches)

    def _engines(self) -> Iterable[Metric]:
        labels = ["replica", "model", "tier", "engine"]
        up = GaugeMetricFamily(
            "fortress_engine_scrape_success",
            "1 when the last scrape of the engine's /metrics worked.",
            labels=labels,
        )
        gauges = {
            "running": GaugeMetricFamily(
                "fortress_engine_requests_running",
                "Requests the engine is running (vllm:num_requests_running, llamacpp:requests_processing).",
                labels=labels,
            ),
            "waiting": GaugeMetricFamily(
                "fortress_engine_requests_waiting",
                "Requests queued in the engine (vllm:num_requests_waiting, llamacpp:requests_deferred).",
                labels=labels,
            ),
            "kv_usage": GaugeMetricFamily(
                "fortress_engine_kv_cache_usage_ratio", "KV-cache in use, 0..1.", labels=labels
            ),
        }
        counters = {
            "prefix_hits": CounterMetricFamily(
                "fortress_engine_prefix_cache_hits", "Prefix-cache hits in tokens (vLLM).", labels=labels
            ),
            "prefix_queries": CounterMetricFamily(
                "fortress_engine_prefix_cache_queries",
                "Prefix-cache queries in tokens (vLLM).",
                labels=labels,
            ),
            "prompt_tokens": CounterMetricFamily(
                "fortress_engine_prompt_tokens", "Prompt tokens the engine processed.", labels=labels
            ),
            "generation_tokens": CounterMetricFamily(
                "fortress_engine_generation_tokens", "Tokens the engine generated.", labels=labels
            ),
        }
        for pool in self.router.pools:
            for r in pool.replicas:
                s = r.load
                if s is None:
                    continue
                lv = [r.name, _pool_model(pool, r), str(r.tier), s.engine]
                up.add_metric(lv, 1.0 if s.ok else 0.0)
                for key, fam in (*gauges.items(), *counters.items()):
                    value = getattr(s, key)
                    if value is not None:
                        fam.add_metric(lv, float(value))
        yield up
        yield from gauges.values()
        yield from counters.values()

    def _machine(self) -> Iterable[Metric]:
        if self.gpus is not None and self.gpus.available:
            util = GaugeMetricFamily(
                "fortress_gpu_utilization_ratio", "GPU busy time, 0..1 (NVML).", labels=["gpu", "name"]
            )
            used = GaugeMetricFamily(
                "fortress_gpu_memory_used_bytes", "GPU memory used.", labels=["gpu", "name"]
            )
            total = GaugeMetricFamily(
                "fortress_gpu_memory_total_bytes", "GPU memory.", labels=["gpu", "name"]
            )
            for g in self.gpus.sample():
                lv = [str(g.index), g.name]
                util.add_metric(lv, g.utilization / 100.0)
                used.add_metric(lv, float(g.memory_used))
                total.add_metric(lv, float(g.memory_total))
            yield from (util, used, total)
        mem = host_memory()
        if mem is not None:
            used_b, total_b = mem
            g = GaugeMetricFamily("fortress_host_memory_used_bytes", "Memory in use on this machine.")
            g.add_metric([], float(used_b))
            t = GaugeMetricFamily("fortress_host_memory_total_bytes", "Memory of this machine.")
            t.add_metric([], float(total_b))
            yield from (g, t)


class GatewayMetrics:
    """The registry and everything registered in it."""

    def __init__(
        self,
        router: Router,
        recent: RecentTraffic | None = None,
        engines: bool = False,
        gpus: GpuProbe | None = None,
        layer_stats: Callable[[], dict[str, Any]] | None = None,
        alarm_states: Callable[[], Iterable[tuple[str, str, str]]] | None = None,
        workers: WorkerMetrics | None = None,
    ) -> None:
        # The *_created series double the output for no use on a dashboard or in an alarm.
        disable_created_metrics()
        self.registry = CollectorRegistry()
        self.requests = RequestMetrics(self.registry, recent)
        self.state = StateCollector(router, engines, gpus, layer_stats, alarm_states)
        self.registry.register(self.state)
        # process_cpu_seconds_total, process_resident_memory_bytes, ... of the gateway itself.
        self.process = ProcessCollector(registry=self.registry)
        # server.workers > 1: the other workers' series, summed into this one's at scrape time.
        self.workers = workers

    def render(self) -> bytes:
        """The Prometheus text exposition of every series (of every worker, with workers)."""
        from prometheus_client import generate_latest

        if self.workers is None:
            return generate_latest(self.registry)
        merged = self.workers.merged(self.registry.collect())
        return generate_latest(_Families(merged))  # type: ignore[arg-type]

    def publish(self) -> None:
        """Publish this worker's summed series for the other workers (no-op without workers)."""
        if self.workers is None:
            return
        own: list[Metric] = list(self.requests.families.collect())
        own.extend(self.process.collect())
        own.extend(self.state.families(machine=False))
        self.workers.publish(own)


class _Families:
    """A registry stand-in for ``generate_latest``: the merged families."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return iter(self._families)


# Series from the layers' stats() keys: (key, name, help, kind). A key a layer does not report
# (no Redis limiter, no access layer) leaves its series out.
_GUARD_SERIES: tuple[tuple[str, str, str, str], ...] = (
    (
        "journal_write_failures_total",
        "fortress_audit_journal_write_failures",
        "Requests that failed (503 audit_journal_unavailable) because the journal could not write.",
        "counter",
    ),
    (
        "fleet_store_pending",
        "fortress_fleet_store_pending_writes",
        "Fleet state writes (instances, decisions) not yet in the store.",
        "gauge",
    ),
    (
        "fleet_store_dropped",
        "fortress_fleet_store_dropped_writes",
        "Fleet state writes dropped because the queue was full while the store was down.",
        "counter",
    ),
    (
        "journal_disk_free_bytes",
        "fortress_audit_journal_disk_free_bytes",
        "Free bytes on the journal's filesystem.",
        "gauge",
    ),
    (
        "journal_disk_total_bytes",
        "fortress_audit_journal_disk_total_bytes",
        "Size of the journal's filesystem.",
        "gauge",
    ),
    (
        "journal_refused_total",
        "fortress_audit_journal_refused",
        "Requests refused (503) because the journal's disk was nearly full.",
        "counter",
    ),
    (
        "journal_unrecorded_total",
        "fortress_audit_journal_unrecorded",
        "Requests refused before any replica saw them and left without a record while the "
        "journal's disk was below its floor.",
        "counter",
    ),
    ("keys_cached", "fortress_keys_cached", "API keys in the gateway's key cache.", "gauge"),
    (
        "key_cache_age_seconds",
        "fortress_key_cache_age_seconds",
        "Seconds since the key cache last read the store.",
        "gauge",
    ),
    (
        "fail_open_admissions_total",
        "fortress_limiter_fail_open_admissions",
        "Requests admitted by the local fallback while the shared limiter (Redis) was unavailable.",
        "counter",
    ),
    (
        "redis_errors_total",
        "fortress_limiter_redis_errors",
        "Limiter calls to Redis that failed or timed out.",
        "counter",
    ),
    (
        "breaker_opens_total",
        "fortress_limiter_breaker_opens",
        "Times the limiter's circuit breaker opened.",
        "counter",
    ),
    (
        "pending_replay",
        "fortress_limiter_pending_replay",
        "Fail-open admissions not yet added to Redis usage.",
        "gauge",
    ),
    ("connections_open", "fortress_connections_open", "Client connections open.", "gauge"),
    (
        "connections_refused_total",
        "fortress_connections_refused",
        "Connections closed unanswered past max_connections + reserved_connections.",
        "counter",
    ),
    (
        "connections_busy_total",
        "fortress_connections_busy",
        "Requests answered 503 server_busy on a connection past max_connections.",
        "counter",
    ),
    (
        "connections_too_large_headers_total",
        "fortress_connections_too_large_headers",
        "Requests refused 431 (too many or too large headers).",
        "counter",
    ),
    (
        "connections_invalid_total",
        "fortress_connections_invalid",
        "Requests refused 400 (not valid HTTP/1.1).",
        "counter",
    ),
)
LIMITER_STATES = ("ok", "open", "half_open")


def _slots(slots: list[dict[str, Any]]) -> Iterable[Metric]:
    """Local replica processes, from the supervisor's slots (their names outlive restarts)."""
    labels = ["replica", "pool", "model", "tier", "engine"]
    restarts = CounterMetricFamily(
        "fortress_replica_restarts",
        "Times the supervisor restarted this local replica's process after it crashed.",
        labels=labels,
    )
    down = GaugeMetricFamily(
        "fortress_replica_process_down",
        "1 while this local replica's process is down (crashed: restarting, or given up).",
        labels=labels,
    )
    for slot in slots:
        lv = [slot["name"], slot["pool"], slot["model"] or UNKNOWN_MODEL, slot["tier"], slot["engine"]]
        restarts.add_metric(lv, float(slot["restarts"]))
        down.add_metric(lv, 1.0 if slot_down(slot) else 0.0)
    yield from (restarts, down)


def _fleet(pools: list[dict[str, Any]]) -> Iterable[Metric]:
    """Per managed pool: desired and current replicas, decisions by kind, wake times."""
    desired = GaugeMetricFamily(
        "fortress_fleet_desired_replicas", "Replicas the fleet wants in this pool.", labels=["pool"]
    )
    current = GaugeMetricFamily(
        "fortress_fleet_current_replicas", "Replicas of this pool starting or running.", labels=["pool"]
    )
    decisions = CounterMetricFamily(
        "fortress_fleet_decisions",
        "Changes of a pool's desired count, by kind (target, schedule, idle, wake, bounds, manual).",
        labels=["pool", "kind"],
    )
    interruptions = CounterMetricFamily(
        "fortress_fleet_spot_interruptions", "Spot interruption notices handled.", labels=["pool"]
    )
    wake = HistogramMetricFamily(
        "fortress_fleet_wake_seconds",
        "From a request for a pool at zero to its first healthy replica.",
        labels=["pool"],
    )
    for p in pools:
        desired.add_metric([p["pool"]], float(p["desired"]))
        current.add_metric([p["pool"]], float(p["current"]))
        for kind, n in sorted(p["decisions"].items()):
            decisions.add_metric([p["pool"], kind], float(n))
        interruptions.add_metric([p["pool"]], float(p["spot_interruptions"]))
        buckets = [(f"{b:g}", float(n)) for b, n in p["wake_buckets"]]
        buckets.append(("+Inf", float(p["wake_count"])))
        wake.add_metric([p["pool"]], buckets, float(p["wake_sum"]))
    yield from (desired, current, decisions, interruptions, wake)


def _guards(stats: dict[str, Any]) -> Iterable[Metric]:
    for key, name, help_, kind in _GUARD_SERIES:
        value = stats.get(key)
        if value is None:
            continue
        family = GaugeMetricFamily(name, help_) if kind == "gauge" else CounterMetricFamily(name, help_)
        family.add_metric([], float(value))
        yield family
    if "key_store_reachable" in stats:
        up = GaugeMetricFamily("fortress_key_store_reachable", "1 while the key cache can read the store.")
        up.add_metric([], 1.0 if stats["key_store_reachable"] else 0.0)
        yield up
    timeouts = stats.get("connections_timeouts_total")
    if isinstance(timeouts, dict):
        fam = CounterMetricFamily(
            "fortress_connections_timeouts",
            "Connections closed (408) because the request's headers or body came too slowly.",
            labels=["phase"],
        )
        for phase, n in sorted(timeouts.items()):
            fam.add_metric([phase], float(n))
        yield fam
    state = stats.get("limiter_state")
    if state is not None:
        fam = GaugeMetricFamily(
            "fortress_limiter_state", "1 for the limiter's circuit state.", labels=["state"]
        )
        for s in LIMITER_STATES:
            fam.add_metric([s], 1.0 if state == s else 0.0)
        yield fam
