"""A Grafana dashboard (JSON model, importable) with the panels of the built-in dashboard.

It reads the gateway's ``/metrics`` through the Prometheus data source picked by the
``datasource`` template variable: every panel and query refers to ``${datasource}``, so the
same file works imported by hand and from file provisioning (which has no import step to
resolve ``__inputs``). The ``model`` variable filters the per-model panels. The seed
deployment's dashboard (healthy host count ≥ 1, response time < 30 s, request count, GPU
utilisation < 95 %, memory < 90 %) is the first row, with its thresholds drawn in.
"""

from __future__ import annotations

from typing import Any

_DS = {"type": "prometheus", "uid": "${datasource}"}
_RATE = "$__rate_interval"
_M = 'model=~"$model"'


def _target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {"datasource": _DS, "expr": expr, "legendFormat": legend, "refId": ref}


def _thresholds(*steps: tuple[float | None, str]) -> dict[str, Any]:
    return {"mode": "absolute", "steps": [{"value": v, "color": c} for v, c in steps]}


def _panel(
    title: str,
    targets: list[tuple[str, str]],
    x: int,
    y: int,
    w: int = 8,
    h: int = 8,
    kind: str = "timeseries",
    unit: str = "short",
    thresholds: dict[str, Any] | None = None,
    description: str = "",
) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit}
    if thresholds is not None:
        defaults["thresholds"] = thresholds
        if kind == "timeseries":
            defaults["custom"] = {"thresholdsStyle": {"mode": "line"}}
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": _DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else {},
        "targets": [_target(e, legend, chr(ord("A") + i)) for i, (e, legend) in enumerate(targets)],
    }


def _quantiles(metric: str, qs: tuple[float, ...]) -> list[tuple[str, str]]:
    return [
        (
            f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{_M}}}[{_RATE}])))",
            f"p{round(q * 100)}",
        )
        for q in qs
    ]


def grafana_dashboard(title: str = "Fortress") -> dict[str, Any]:
    """The dashboard's JSON model (Dashboards → Import in Grafana)."""
    red, green, amber = "red", "green", "orange"
    panels = [
        # Row 1: the seed deployment's dashboard.
        _panel(
            "Healthy replicas",
            [("sum by (tier) (fortress_replicas_healthy)", "{{tier}}")],
            0,
            0,
            6,
            6,
            kind="stat",
            thresholds=_thresholds((None, red), (1, green)),
            description="Healthy host count per tier; at least 1 in total.",
        ),
        _panel(
            "Response time (average)",
            [
                (
                    f"sum(rate(fortress_request_duration_seconds_sum{{{_M}}}[{_RATE}]))"
                    f" / sum(rate(fortress_request_duration_seconds_count{{{_M}}}[{_RATE}]))",
                    "average",
                )
            ],
            6,
            0,
            6,
            6,
            unit="s",
            thresholds=_thresholds((None, green), (30, amber), (60, red)),
            description="Target: under 30 s (warning above for 3 min, page above 60 s for 1 min).",
        ),
        _panel(
            "Request count",
            [(f"sum(increase(fortress_requests_total{{{_M}}}[1m]))", "requests / min")],
            12,
            0,
            4,
            6,
        ),
        _panel(
            "GPU utilisation",
            [("100 * fortress_gpu_utilization_ratio", "GPU {{gpu}}")],
            16,
            0,
            4,
            6,
            unit="percent",
            thresholds=_thresholds((None, green), (95, red)),
            description="Above 95 % for 5 min: scale up.",
        ),
        _panel(
            "Memory utilisation",
            [
                ("100 * fortress_host_memory_used_bytes / fortress_host_memory_total_bytes", "host"),
                ("100 * fortress_gpu_memory_used_bytes / fortress_gpu_memory_total_bytes", "GPU {{gpu}}"),
            ],
            20,
            0,
            4,
            6,
            unit="percent",
            thresholds=_thresholds((None, green), (90, red)),
        ),
        # Row 2: traffic.
        _panel(
            "Requests / s by outcome",
            [(f"sum by (outcome) (rate(fortress_requests_total{{{_M}}}[{_RATE}]))", "{{outcome}}")],
            0,
            6,
            unit="reqps",
        ),
        _panel(
            "Latency p50 / p95 / p99",
            _quantiles("fortress_request_duration_seconds", (0.5, 0.95, 0.99)),
            8,
            6,
            unit="s",
        ),
        _panel(
            "Time to first token p50 / p95",
            _quantiles("fortress_time_to_first_token_seconds", (0.5, 0.95)),
            16,
            6,
            unit="s",
        ),
        _panel(
            "Tokens / s",
            [(f"sum by (direction) (rate(fortress_tokens_total{{{_M}}}[{_RATE}]))", "{{direction}}")],
            0,
            14,
        ),
        _panel(
            "4xx / 5xx / 429",
            [
                (f'sum(rate(fortress_requests_total{{status=~"4..",{_M}}}[{_RATE}]))', "4xx"),
                (f'sum(rate(fortress_requests_total{{status=~"5..",{_M}}}[{_RATE}]))', "5xx"),
                (f"sum(rate(fortress_rate_limited_total{{{_M}}}[{_RATE}]))", "429"),
            ],
            8,
            14,
            unit="reqps",
        ),
        _panel(
            "Upstream errors and retries",
            [
                (f"sum by (kind) (rate(fortress_upstream_errors_total[{_RATE}]))", "{{kind}}"),
                (f"sum(rate(fortress_retries_total{{{_M}}}[{_RATE}]))", "retries"),
            ],
            16,
            14,
            unit="reqps",
        ),
        # Row 3: replicas and engines.
        _panel(
            "In flight per replica",
            [("fortress_replica_in_flight", "{{replica}} ({{tier}})")],
            0,
            22,
        ),
        _panel(
            "Engine queue",
            [
                ("sum by (replica) (fortress_engine_requests_running)", "{{replica}} running"),
                ("sum by (replica) (fortress_engine_requests_waiting)", "{{replica}} waiting"),
            ],
            8,
            22,
        ),
        _panel(
            "KV cache usage",
            [("100 * fortress_engine_kv_cache_usage_ratio", "{{replica}}")],
            16,
            22,
            unit="percent",
        ),
        _panel(
            "Replica states",
            [('sum by (tier, state) (fortress_replicas{state!="healthy"})', "{{tier}} {{state}}")],
            0,
            30,
        ),
        _panel(
            "Gateway overhead p50 / p99",
            [
                (
                    f"histogram_quantile({q}, sum by (le) "
                    f"(rate(fortress_gateway_overhead_seconds_bucket[{_RATE}])))",
                    f"p{round(q * 100)}",
                )
                for q in (0.5, 0.99)
            ],
            8,
            30,
            unit="s",
        ),
        _panel(
            "Local replica restarts",
            [
                ("sum by (replica) (increase(fortress_replica_restarts_total[10m]))", "{{replica}}"),
                ("sum(fortress_replica_process_down)", "down now"),
            ],
            0,
            38,
            description="Local replica processes restarted after a crash, and those down now.",
        ),
        _panel(
            "Alarms firing",
            [("sum by (alarm, severity) (fortress_alarm_firing)", "{{alarm}} ({{severity}})")],
            16,
            30,
        ),
    ]
    for i, p in enumerate(panels, start=1):
        p["id"] = i
    return {
        "title": title,
        "uid": "fortress-gateway",
        "tags": ["fortress", "llm"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    # Resolved by Grafana itself: the default Prometheus data source, or the
                    # one picked in the dashboard's menu.
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "refresh": 1,
                    "hide": 0,
                    "current": {},
                },
                {
                    "name": "model",
                    "type": "query",
                    "datasource": _DS,
                    "query": "label_values(fortress_requests_total, model)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                    "refresh": 2,
                },
            ]
        },
        "panels": panels,
    }
