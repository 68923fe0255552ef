"""Observability pieces in-process: the sliding window, engine metrics parsing, the metrics
observer, the access log (and its EMF form), the dashboard's data and access rule, exports."""

from __future__ import annotations

import io
import json
import logging
import sys
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fortress.config import AccessLog as AccessLogConfig
from fortress.config import ConfigError, parse_config
from fortress.core.admin import COOKIE, admin_allowed, cookie_value
from fortress.core.context import Identity, RequestContext
from fortress.gateway.app import Gateway
from fortress.observe.grafana import grafana_dashboard
from fortress.observe.logs import AccessLog
from fortress.observe.metrics import error_kind, outcome
from fortress.observe.rules_export import cloudwatch_alarms, prometheus_rules
from fortress.observe.window import History, RecentTraffic
from fortress.routing.load import parse_engine_metrics
from fortress.routing.replica import State
from fortress.runtime import Runtime

CONFIG = """\
pools:
  - model: m
    aliases: [gpt-4o-mini]
    replicas:
      - {url: 'http://127.0.0.1:9', tier: primary}
      - {url: 'http://127.0.0.1:10', tier: secondary}
auth: {enabled: false}
audit: {enabled: false}
routing: {engine_metrics_interval: 0}
observe: {access_log: {enabled: false}}
"""


def samples(text: bytes | str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    if isinstance(text, bytes):
        text = text.decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(all_: dict, metric: str, /, **labels: str) -> float | None:
    return all_.get((metric, frozenset(labels.items())))


def make_ctx(
    status: int,
    model: str | None = "m",
    t0: float = 0.0,
    stream: bool = False,
    ttfb: float | None = None,
    usage: dict[str, Any] | None = None,
    attempts: int = 1,
    error: str | None = None,
) -> RequestContext:
    ctx = RequestContext("req-1", "/v1/chat/completions", t0, "127.0.0.1")
    ctx.status, ctx.model, ctx.stream, ctx.ttfb = status, model, stream, ttfb
    ctx.usage, ctx.attempts, ctx.error = usage, attempts, error
    return ctx


def test_window_counts_and_percentiles() -> None:
    now = [1000.0]
    w = RecentTraffic(horizon=120, clock=lambda: now[0])
    for i in range(100):  # latencies 0.1 .. 10 s, one per request, spread over 10 s
        w.add(991.0 + i / 10, 200, 0.1 * (i + 1), ttft=0.05, tokens_in=10, tokens_out=20)
    w.add(999.5, 503, 0.01)
    w.add(999.5, 429, 0.01)
    s = w.summary(10)
    assert (s.requests, s.errors_5xx, s.errors_4xx, s.rate_limited) == (102, 1, 1, 1)
    assert s.tokens_out == 2000 and s.tokens_per_s == 200
    assert s.p50 is not None and 4.0 < s.p50 < 6.5
    assert s.p99 is not None and 8.0 < s.p99 < 12.5
    assert s.ttft_p95 is not None and 0.04 < s.ttft_p95 < 0.06
    # Older than the window: not counted; the ring forgets what is beyond its horizon.
    assert w.summary(5).requests == 52
    now[0] = 1200.0
    assert w.summary(60).requests == 0 and w.summary(60).avg_latency is None
    assert w.totals() == {"requests": 102, "errors_4xx": 1, "errors_5xx": 1, "rate_limited": 1}


VLLM_TEXT = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen"} 3.0
vllm:num_requests_running{engine="1",model_name="qwen"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="qwen"} 7.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="qwen"} 0.25
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{model_name="qwen"} 0.5
# TYPE vllm:prefix_cache_hits counter
vllm:prefix_cache_hits_total{model_name="qwen"} 40.0
# TYPE vllm:prefix_cache_queries counter
vllm:prefix_cache_queries_total{model_name="qwen"} 100.0
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="qwen"} 4.0
vllm:e2e_request_latency_seconds_count{model_name="qwen"} 4.0
# TYPE vllm:generation_tokens counter
vllm:generation_tokens_total{model_name="qwen"} 1234.0
"""
OLD_VLLM_TEXT = (
    'vllm:gpu_cache_usage_perc{model_name="x"} 0.75\nvllm:num_requests_running{model_name="x"} 1\n'
)
LLAMACPP_TEXT = """\
# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 321
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 654
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 2
# TYPE llamacpp:requests_deferred gauge
llamacpp:requests_deferred 5
"""


def test_engine_metrics_both_dialects() -> None:
    v = parse_engine_metrics(VLLM_TEXT)
    assert v.engine == "vllm" and v.ok
    assert (v.running, v.waiting, v.kv_usage) == (5.0, 7.0, 0.5)  # summed over engines; new name wins
    assert (v.prefix_hits, v.prefix_queries, v.generation_tokens, v.prompt_tokens) == (40, 100, 1234, None)
    old = parse_engine_metrics(OLD_VLLM_TEXT)
    assert old.kv_usage == 0.75 and old.running == 1  # the deprecated name still read
    ll = parse_engine_metrics(LLAMACPP_TEXT)
    assert ll.engine == "llamacpp"
    assert (ll.running, ll.waiting, ll.prompt_tokens, ll.generation_tokens, ll.kv_usage) == (
        2,
        5,
        321,
        654,
        None,
    )
    assert parse_engine_metrics("# nothing here\n").engine == "unknown"


def test_outcome_and_error_kinds() -> None:
    assert [outcome(s) for s in (200, 400, 429, 499, 502, 503, 504, 500, 0)] == [
        "ok", "client_error", "rate_limited", "cancelled", "upstream_error", "unavailable", "timeout",
        "server_error", "aborted",
    ]  # fmt: skip
    assert error_kind(502, "Replica r1 answered 500: boom") == "status_5xx"
    assert error_kind(502, "Replica r1 failed: connect failed (Connection refused)") == "connect"
    assert error_kind(504, "Replica r1 did not answer within the first_byte timeout.") == "timeout"
    assert error_kind(502, "Replica r1 ended the stream early.") == "stream_ended"
    assert error_kind(503, None) == "no_healthy_replica"
    assert error_kind(404, "nope") is None


def gateway() -> tuple[Gateway, Any]:
    runtime = Runtime(parse_config(CONFIG, "test", env={}))
    return runtime.gateway, runtime.observe


def test_observer_series_are_exact_and_bounded() -> None:
    gw, obs = gateway()
    assert gw.observers == (obs.metrics.requests.observe,)
    assert set(gw.routes) == {"/metrics", "/alarms", "/dashboard"}
    observe = gw.observers[0]
    clock = obs.recent.clock
    t = clock()
    for _ in range(5):
        observe(make_ctx(200, t0=t - 2.0, usage={"prompt_tokens": 10, "completion_tokens": 5}))
    observe(
        make_ctx(200, t0=t - 3.0, stream=True, ttfb=1.0, usage={"prompt_tokens": 4, "completion_tokens": 11})
    )
    observe(make_ctx(502, t0=t - 1.0, attempts=3, error="Replica r2 answered 500: x"))
    observe(make_ctx(429, t0=t - 0.001, attempts=0, error="Rate limit"))
    observe(make_ctx(404, model=None, t0=t - 0.001, attempts=0, error="The model 'x' does not exist"))
    observe(make_ctx(200, usage={"prompt_tokens": "many"}, t0=t - 1))  # odd usage: ignored
    observe(make_ctx(200, usage={"prompt_tokens": -50, "completion_tokens": 3}, t0=t - 1))  # ignored too
    s = samples(obs.metrics.render())
    assert value(s, "fortress_requests_total", model="m", status="200", outcome="ok") == 8
    assert value(s, "fortress_requests_total", model="m", status="502", outcome="upstream_error") == 1
    assert value(s, "fortress_requests_total", model="m", status="429", outcome="rate_limited") == 1
    assert value(s, "fortress_requests_total", model="unknown", status="404", outcome="client_error") == 1
    assert value(s, "fortress_request_duration_seconds_count", model="m") == 10
    assert value(s, "fortress_request_duration_seconds_bucket", model="m", le="2.5") == 9  # not the 3 s one
    assert value(s, "fortress_time_to_first_token_seconds_count", model="m") == 1
    # (3 s - 1 s) / (11 - 1) tokens = 0.2 s between tokens
    assert value(s, "fortress_inter_token_latency_seconds_bucket", model="m", le="0.15") == 0
    assert value(s, "fortress_inter_token_latency_seconds_bucket", model="m", le="0.25") == 1
    assert value(s, "fortress_tokens_total", model="m", direction="in") == 54
    assert value(s, "fortress_tokens_total", model="m", direction="out") == 36
    assert value(s, "fortress_retries_total", model="m") == 2
    assert value(s, "fortress_rate_limited_total", model="m") == 1
    assert value(s, "fortress_upstream_errors_total", kind="status_5xx") == 1
    # A request refused before routing creates no TTFT or token series for "unknown".
    assert value(s, "fortress_time_to_first_token_seconds_count", model="unknown") is None
    assert value(s, "fortress_tokens_total", model="unknown", direction="in") is None
    assert not any(name.endswith("_created") for name, _ in s)
    # Replica series, read from the router at scrape time.
    assert value(s, "fortress_replicas_healthy", model="m", tier="primary") == 0
    r1 = next(iter(gw.router.all_replicas()))
    assert r1.name == "m-1"  # named from the config: the same in every process
    assert (
        value(s, "fortress_replica_state", replica=r1.name, model="m", tier="primary", state="initial") == 1
    )
    assert value(s, "fortress_alarm_firing", alarm="unhealthy_replicas", severity="page") == 0
    r1.state, r1.in_flight = State.HEALTHY, 3
    s = samples(obs.metrics.render())
    assert value(s, "fortress_replicas_healthy", model="m", tier="primary") == 1
    assert value(s, "fortress_replica_in_flight", replica=r1.name, model="m", tier="primary") == 3
    assert value(s, "fortress_requests_in_flight", model="m") == 3
    stats = {
        "journal_seq": 9,
        "journal_fsyncs": 4,
        "store_seq": 7,
        "backlog": 2,
        "shipper_error": "db down",
        "journal_disk_free_bytes": 10,
        "journal_disk_total_bytes": 40,
        "key_store_reachable": False,
        "limiter_state": "open",
        "fail_open_admissions_total": 5,
        "connections_busy_total": 4,
        "connections_timeouts_total": {"header": 2, "body": 1},
    }
    obs.metrics.state.layer_stats = lambda: stats
    s = samples(obs.metrics.render())
    assert value(s, "fortress_audit_backlog_records") == 2 and value(s, "fortress_audit_shipper_ok") == 0
    assert value(s, "fortress_audit_journal_records_total") == 9
    assert value(s, "fortress_audit_journal_disk_free_bytes") == 10
    assert value(s, "fortress_key_store_reachable") == 0
    assert value(s, "fortress_limiter_state", state="open") == 1
    assert value(s, "fortress_limiter_state", state="ok") == 0
    assert value(s, "fortress_limiter_fail_open_admissions_total") == 5
    assert value(s, "fortress_connections_busy_total") == 4
    assert value(s, "fortress_connections_timeouts_total", phase="header") == 2
    assert value(s, "fortress_limiter_redis_errors_total") is None  # a key no layer reports: no series
    # The dashboard's window saw the same requests.
    assert obs.recent.totals() == {"requests": 11, "errors_4xx": 2, "errors_5xx": 1, "rate_limited": 1}


def test_dashboard_data_shape() -> None:
    gw, obs = gateway()
    t = obs.recent.clock()
    gw.observers[0](
        make_ctx(200, t0=t - 0.5, stream=True, ttfb=0.1, usage={"prompt_tokens": 3, "completion_tokens": 9})
    )
    d = obs.dashboard.data()
    assert d["totals"]["requests"] == 1 and d["last_60s"]["tokens_out"] == 9
    assert d["tiers"]["primary"] == {"healthy": 0, "unhealthy": 0, "total": 1}
    assert [r["state"] for r in d["replicas"]] == ["initial", "initial"]
    assert len(d["series"]) <= 1  # no points from before the gateway started
    obs.dashboard.series_start -= 600
    series = obs.dashboard.data()["series"]
    assert len(series) == 150 and series[-1]["t"] > series[0]["t"]
    assert sum(p["requests"] for p in series) in (0, 1)  # the current, unfinished step may hold it
    assert {a["name"] for a in d["alarms"]} >= {"unhealthy_replicas", "errors_5xx", "replica_restarts"}
    assert "cpu_percent" in d["machine"]
    assert d["history"] == [] and d["history_step"] == 5.0
    json.dumps(d)  # JSON-ready


def test_history_ring_partitions_traffic_and_keeps_the_worst_health() -> None:
    now = [1000.2]
    recent = RecentTraffic(horizon=900, clock=lambda: now[0])
    h = History(step=5, horizon=30)  # six points
    ok = {"primary": {"healthy": 2, "unhealthy": 0, "total": 2}}
    dip = {"primary": {"healthy": 1, "unhealthy": 1, "total": 2}}
    sent = 0
    for second in range(1000, 1100):
        now[0] = second + 0.2
        recent.add(now[0], 500 if second % 10 == 0 else 200, 0.5, tokens_out=3)
        sent += 1
        # Health is read every second; one second of the step at 1040..1044 has a dip.
        h.note(dip if second == 1042 else ok)
        if second % 5 == 4:
            p = h.close(10_000.0 + second, now[0], recent, restarts=second // 50)
            assert p is not None
    points = h.points()
    assert len(points) == 6  # bounded: the oldest points are gone
    assert [p["t"] for p in points] == [10_000.0 + s for s in range(1074, 1100, 5)]
    # Each point covers the whole seconds since the previous one, the current one excluded:
    # every request counted exactly once across points.
    assert [p["seconds"] for p in points] == [5.0] * 6
    assert sum(p["requests"] for p in points) == 30  # seconds 1069..1098 (1099 is not over)
    assert sum(p["errors_5xx"] for p in points) == 3 and points[-1]["tokens_out"] == 15
    assert points[-1]["avg_latency"] == pytest.approx(0.5) and points[-1]["p95"] is not None
    assert all(p["health"] == ok for p in points)  # the dip was before the kept hour
    assert points[-1]["restarts"] == 21
    # The dip lasted one second, the step five: the step keeps it.
    h2 = History(step=5, horizon=60)
    for second in range(2000, 2010):
        now[0] = second + 0.2
        h2.note(dip if second == 2002 else ok)
        if second % 5 == 4:
            h2.close(float(second), now[0], recent)
    assert [p["health"]["primary"]["healthy"] for p in h2.points()] == [1, 2]
    assert [p["health"]["primary"]["unhealthy"] for p in h2.points()] == [1, 0]
    # A poll asks only for what it has not seen.
    assert [p["t"] for p in h2.points(since=2004.0)] == [2009.0]
    assert h2.points(since=2009.0) == [] and len(h2.points(since=0)) == 2
    # Closing twice within the same second adds nothing.
    assert h2.close(2009.5, now[0], recent) is None


def test_dashboard_history_from_the_sampler_and_since() -> None:
    gw, obs = gateway()
    t = obs.recent.clock()
    for status in (200, 200, 502):
        gw.observers[0](make_ctx(status, t0=t - 0.5))
    obs.recent.add(t - 2, 200, 0.25)  # a request two seconds ago: in the first point
    p = obs.sample_history(t + 1)
    assert p is not None and p["requests"] >= 1 and p["restarts"] is None
    assert p["health"]["primary"] == {"healthy": 0, "unhealthy": 0, "total": 1}
    d = obs.dashboard.data()
    assert [h["t"] for h in d["history"]] == [p["t"]]
    assert obs.dashboard.data(since=p["t"])["history"] == []
    json.dumps(d)


def test_admin_rule_for_observability_endpoints() -> None:
    local = {"client": ("127.0.0.1", 5), "headers": []}
    remote = {"client": ("10.1.2.3", 5), "headers": []}
    assert admin_allowed(local, None) and not admin_allowed(remote, None)
    assert not admin_allowed(local, "s3cret")  # with a token, loopback is not enough
    assert admin_allowed({**remote, "headers": [(b"authorization", b"Bearer s3cret")]}, "s3cret")
    assert not admin_allowed({**remote, "headers": [(b"authorization", b"Bearer nope")]}, "s3cret")
    cookie = f"a=b; {COOKIE}={cookie_value('s3cret')}".encode()
    assert admin_allowed({**remote, "headers": [(b"cookie", cookie)]}, "s3cret", allow_cookie=True)
    # The cookie is for the dashboard's pages; /admin/* wants the token itself.
    assert not admin_allowed({**remote, "headers": [(b"cookie", cookie)]}, "s3cret")
    assert cookie_value("s3cret") != "s3cret"  # the browser never holds the token itself


def test_access_log_line_and_emf() -> None:
    buf = io.StringIO()
    logger = logging.getLogger("test.access_log")
    handler = logging.StreamHandler(buf)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        log = AccessLog(AccessLogConfig(stream="none", emf=True), logger=logger)
        ctx = make_ctx(
            200, t0=0.0, stream=True, ttfb=0.25, usage={"prompt_tokens": 7, "completion_tokens": 3}
        )
        ctx.identity = Identity("key_123", "never logged", "default", frozenset(), "fk_abcd")
        log.observe(ctx)
        log.emit_gauges({"UnhealthyReplicas": 1.0, "GpuUtilization": None, "Bogus": 3.0})
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in buf.getvalue().splitlines())
    assert first["key_id"] == "key_123" and "never logged" not in buf.getvalue()
    assert (first["model"], first["status"], first["tokens_in"], first["tokens_out"]) == ("m", 200, 7, 3)
    assert first["ttft_ms"] == 250.0
    directive = first["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == "Fortress"
    assert directive["Dimensions"] == [["Service"], ["Service", "Model"]]
    # Every metric the directive names is in the document, as the EMF specification requires.
    for m in directive["Metrics"]:
        assert isinstance(first[m["Name"]], int | float), m
    assert first["TimeToFirstToken"] == 0.25 and first["Errors5xx"] == 0
    assert [m["Name"] for m in second["_aws"]["CloudWatchMetrics"][0]["Metrics"]] == ["UnhealthyReplicas"]
    assert second["UnhealthyReplicas"] == 1.0


def test_alarm_rules_config() -> None:
    cfg = parse_config("observe: {alarms: {rules: [{name: slow, metric: p95_latency, threshold: 5, for: 2m, "
                       "window: 30s}]}}", env={})  # fmt: skip
    (rule,) = cfg.observe.alarms.rules
    assert (rule.for_, rule.window, rule.op, rule.severity) == (120.0, 30.0, ">", "warning")
    with pytest.raises(ConfigError, match=r"observe\.alarms\.rules\.0\.metric"):
        parse_config("observe: {alarms: {rules: [{name: x, metric: vibes, threshold: 1}]}}", env={})
    with pytest.raises(ConfigError, match="duplicate alarm names"):
        parse_config(
            "observe: {alarms: {rules: [{name: x, metric: errors_5xx, threshold: 1},"
            " {name: x, metric: errors_4xx, threshold: 1}]}}",
            env={},
        )
    defaults = {r.name: r for r in parse_config("", env={}).observe.alarms.rules}
    assert [(r.metric, r.threshold, r.for_, r.severity) for r in defaults.values()] == [
        ("unhealthy_replicas", 0, 0, "page"),
        ("wrong_model_replicas", 0, 0, "page"),
        ("avg_latency", 30, 180, "warning"),
        ("avg_latency", 60, 60, "page"),
        ("errors_5xx", 10, 120, "page"),
        ("journal_disk_utilization", 90, 0, "page"),
        ("store_unreachable", 0, 60, "warning"),
        ("limiter_fail_open", 0, 0, "warning"),
        ("connections_refused", 0, 0, "warning"),
        ("replica_restarts", 0, 0, "warning"),
        ("gpu_utilization", 95, 300, "info"),
    ]
    assert defaults["gpu_scale_up"].action == "scale_up"


def test_exports() -> None:
    cfg = parse_config(
        "observe: {alarms: {notify: {sns_topic_arn: 'arn:aws:sns:eu-west-1:123:pager'}}}", env={}
    )
    prom = yaml.safe_load(yaml.safe_dump(prometheus_rules(cfg)))
    rules = {r["alert"]: r for r in prom["groups"][0]["rules"]}
    assert rules["unhealthy_replicas"]["expr"] == (
        'sum(fortress_replicas{state="unhealthy"}) + (sum(fortress_replica_process_down) or vector(0)) > 0'
    )
    assert "for" not in rules["unhealthy_replicas"]
    assert rules["latency_warning"]["for"] == "3m" and rules["latency_page"]["for"] == "1m"
    assert rules["latency_page"]["expr"].endswith("> 60")
    assert rules["errors_5xx"]["expr"] == 'sum(increase(fortress_requests_total{status=~"5.."}[1m])) > 10'
    assert rules["gpu_scale_up"]["labels"] == {
        "severity": "info",
        "action": "scale_up",
        "service": "fortress",
    }
    cw = {a["AlarmName"]: a for a in cloudwatch_alarms(cfg)}
    warn = cw["fortress-latency_warning"]
    assert (warn["MetricName"], warn["Statistic"], warn["Period"], warn["EvaluationPeriods"]) == (
        "Latency", "Average", 60, 3,
    )  # fmt: skip
    assert warn["Threshold"] == 30 and warn["ComparisonOperator"] == "GreaterThanThreshold"
    assert warn["AlarmActions"] == ["arn:aws:sns:eu-west-1:123:pager"]
    assert cw["fortress-unhealthy_replicas"]["EvaluationPeriods"] == 1
    assert cw["fortress-errors_5xx"]["EvaluationPeriods"] == 2
    assert cw["fortress-gpu_scale_up"]["EvaluationPeriods"] == 5
    assert cw["fortress-latency_page"]["EvaluationPeriods"] == 1
    dash = grafana_dashboard()
    titles = [p["title"] for p in dash["panels"]]
    for needed in ("Healthy replicas", "Response time (average)", "Request count", "GPU utilisation",
                   "Memory utilisation", "Latency p50 / p95 / p99", "Time to first token p50 / p95",
                   "Tokens / s", "4xx / 5xx / 429"):  # fmt: skip
        assert needed in titles
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    json.dumps(dash)
    assert rules["replica_restarts"]["expr"] == "sum(increase(fortress_replica_restarts_total[10m])) > 0"
    assert cw["fortress-replica_restarts"]["MetricName"] == "ReplicaRestarts"


class _FakeNvml:
    """The few pynvml calls GpuProbe makes, for machines without a GPU (like CI's)."""

    class _Util:
        def __init__(self, gpu: int) -> None:
            self.gpu = gpu

    class _Mem:
        def __init__(self, used: int, total: int) -> None:
            self.used, self.total = used, total

    def __init__(self) -> None:
        self.shutdown = False

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        self.shutdown = True

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return b"NVIDIA A10G"

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return self._Util(90 + 8 * h)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return self._Mem(20 * 2**30, 24 * 2**30)


def test_gpu_series_through_nvml(monkeypatch) -> None:
    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    _, obs = gateway()
    assert obs.gpus.available
    s = samples(obs.metrics.render())
    assert value(s, "fortress_gpu_utilization_ratio", gpu="1", name="NVIDIA A10G") == pytest.approx(0.98)
    assert value(s, "fortress_gpu_memory_total_bytes", gpu="0", name="NVIDIA A10G") == 24 * 2**30
    obs.sample(obs.recent.clock())  # what the sampler task does every 5 s
    assert obs.gpu_series.last() == pytest.approx(94.0)  # mean of 90 % and 98 %
    assert obs.dashboard.data()["machine"]["gpus"][1]["utilization"] == 98.0
    assert obs.gauges()["GpuUtilization"] == pytest.approx(94.0)
    obs.gpus.close()
    assert fake.shutdown


def test_grafana_datasource_variable_for_file_provisioning() -> None:
    dash = grafana_dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    # Declared before the variables that query through it.
    assert dash["templating"]["list"][0]["name"] == "datasource"
    ref = {"type": "prometheus", "uid": "${datasource}"}
    assert variables["model"]["datasource"] == ref
    for panel in dash["panels"]:
        assert panel["datasource"] == ref, panel["title"]
        assert panel["targets"] and all(t["datasource"] == ref for t in panel["targets"]), panel["title"]
    # Nothing is left for an import step to fill in: provisioning reads the file as is.
    text = json.dumps(dash)
    assert "__inputs" not in dash and "DS_PROMETHEUS" not in text
    assert "fortress_replica_restarts_total" in text
