"""The alarm rules of ``fortress.yaml`` as Prometheus alerting rules and CloudWatch alarms.

The same rules the gateway evaluates itself, for the monitoring system a deployment already
has: Prometheus rules over the series of ``/metrics``; CloudWatch alarms over the metrics the
access log writes in Embedded Metric Format (``observe.access_log.emf: true``), each one the
parameters of a ``PutMetricAlarm`` call (what the AWS deployment feeds to CDK or
``aws cloudwatch put-metric-alarm --cli-input-json``).
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from fortress.config import AlarmRule, FortressConfig
from fortress.observe.alarms import format_duration
from fortress.observe.logs import SERVICE


def _dur(seconds: float) -> str:
    return format_duration(max(1, math.ceil(seconds)))  # Prometheus durations are whole units


def promql(rule: AlarmRule) -> str:
    """The PromQL expression of a rule's metric (without the comparison)."""
    w = _dur(rule.window)
    m = rule.metric
    if m == "unhealthy_replicas":
        # Crashed local replicas are out of the router while they restart: count them too.
        return 'sum(fortress_replicas{state="unhealthy"}) + (sum(fortress_replica_process_down) or vector(0))'
    if m == "healthy_replicas":
        return "min(sum by (model) (fortress_replicas_healthy))"
    if m == "wrong_model_replicas":
        return "sum(fortress_replica_wrong_model)"
    if m == "journal_disk_utilization":
        return (
            "100 * max(1 - fortress_audit_journal_disk_free_bytes / fortress_audit_journal_disk_total_bytes)"
        )
    if m == "store_unreachable":
        return '1 - min({__name__=~"fortress_audit_shipper_ok|fortress_key_store_reachable"})'
    if m == "limiter_fail_open":
        return f"sum(increase(fortress_limiter_fail_open_admissions_total[{w}]))"
    if m == "connections_refused":
        return (
            f"sum(increase(fortress_connections_refused_total[{w}]))"
            f" + sum(increase(fortress_connections_busy_total[{w}]))"
        )
    if m == "replica_restarts":
        return f"sum(increase(fortress_replica_restarts_total[{w}]))"
    if m == "avg_latency":
        return (
            f"sum(rate(fortress_request_duration_seconds_sum[{w}]))"
            f" / sum(rate(fortress_request_duration_seconds_count[{w}]))"
        )
    if m == "p95_latency":
        return f"histogram_quantile(0.95, sum by (le) (rate(fortress_request_duration_seconds_bucket[{w}])))"
    if m == "ttft_p95":
        return (
            f"histogram_quantile(0.95, sum by (le) (rate(fortress_time_to_first_token_seconds_bucket[{w}])))"
        )
    if m == "errors_5xx":
        return f'sum(increase(fortress_requests_total{{status=~"5.."}}[{w}]))'
    if m == "errors_4xx":
        return f'sum(increase(fortress_requests_total{{status=~"4.."}}[{w}]))'
    if m == "rate_limited":
        return f"sum(increase(fortress_rate_limited_total[{w}]))"
    if m == "request_rate":
        return f"sum(rate(fortress_requests_total[{w}]))"
    if m == "gpu_utilization":
        return f"100 * avg(avg_over_time(fortress_gpu_utilization_ratio[{w}]))"
    if m == "memory_utilization":
        return "100 * max(fortress_host_memory_used_bytes / fortress_host_memory_total_bytes)"
    raise ValueError(f"unknown alarm metric {m!r}")


def prometheus_rules(config: FortressConfig) -> dict[str, Any]:
    """A Prometheus rule file (``groups:``) with one alerting rule per alarm."""
    rules = []
    for r in config.observe.alarms.rules:
        rule: dict[str, Any] = {
            "alert": r.name,
            "expr": f"{promql(r)} {r.op} {r.threshold:g}",
        }
        if r.for_:
            rule["for"] = _dur(r.for_)
        rule["labels"] = {"severity": r.severity, "action": r.action, "service": SERVICE}
        rule["annotations"] = {
            "summary": f"{r.metric} {r.op} {r.threshold:g}" + (f" for {_dur(r.for_)}" if r.for_ else ""),
            "description": r.description or r.name,
        }
        rules.append(rule)
    return {"groups": [{"name": "fortress", "rules": rules}]}


def prometheus_yaml(config: FortressConfig) -> str:
    return yaml.safe_dump(prometheus_rules(config), sort_keys=False, width=200)


# metric → (CloudWatch metric name written by logs.py, statistic, unit scale for the threshold)
_CLOUDWATCH: dict[str, tuple[str, str]] = {
    "unhealthy_replicas": ("UnhealthyReplicas", "Maximum"),
    "healthy_replicas": ("HealthyReplicas", "Minimum"),
    "wrong_model_replicas": ("WrongModelReplicas", "Maximum"),
    "journal_disk_utilization": ("JournalDiskUtilization", "Maximum"),
    "store_unreachable": ("StoreUnreachable", "Maximum"),
    "limiter_fail_open": ("LimiterFailOpen", "Sum"),
    "connections_refused": ("ConnectionsRefused", "Sum"),
    "replica_restarts": ("ReplicaRestarts", "Sum"),
    "avg_latency": ("Latency", "Average"),
    "p95_latency": ("Latency", "p95"),
    "ttft_p95": ("TimeToFirstToken", "p95"),
    "errors_5xx": ("Errors5xx", "Sum"),
    "errors_4xx": ("Errors4xx", "Sum"),
    "rate_limited": ("RateLimited", "Sum"),
    "request_rate": ("Requests", "Sum"),
    "gpu_utilization": ("GpuUtilization", "Average"),
    "memory_utilization": ("MemoryUtilization", "Maximum"),
}
_COMPARE = {
    ">": "GreaterThanThreshold",
    ">=": "GreaterThanOrEqualToThreshold",
    "<": "LessThanThreshold",
    "<=": "LessThanOrEqualToThreshold",
}


def _period(window: float) -> int:
    # CloudWatch periods: 10, 30 or a multiple of 60 seconds.
    if window <= 10:
        return 10
    if window <= 30:
        return 30
    return max(60, round(window / 60) * 60)


def cloudwatch_alarms(config: FortressConfig, prefix: str = "fortress-") -> list[dict[str, Any]]:
    """One ``PutMetricAlarm`` parameter set per rule, over the access log's EMF metrics."""
    notify = config.observe.alarms.notify
    namespace = config.observe.access_log.emf_namespace
    actions = [notify.sns_topic_arn] if notify.sns_topic_arn else []
    out = []
    for r in config.observe.alarms.rules:
        name, stat = _CLOUDWATCH[r.metric]
        period = _period(r.window)
        periods = max(1, math.ceil(r.for_ / period - 1e-9))
        threshold = r.threshold * period if r.metric == "request_rate" else r.threshold
        alarm: dict[str, Any] = {
            "AlarmName": prefix + r.name,
            "AlarmDescription": r.description or r.name,
            "Namespace": namespace,
            "MetricName": name,
            "Dimensions": [{"Name": "Service", "Value": SERVICE}],
            "Period": period,
            "EvaluationPeriods": periods,
            "DatapointsToAlarm": periods,
            "Threshold": threshold,
            "ComparisonOperator": _COMPARE[r.op],
            # No data is no breach ("nobody called"), except for a floor on healthy replicas,
            # where silence means the gateway itself is gone.
            "TreatMissingData": "breaching" if r.metric == "healthy_replicas" else "notBreaching",
            "ActionsEnabled": bool(actions),
            "AlarmActions": actions,
            "OKActions": actions,
            "Tags": [
                {"Key": "severity", "Value": r.severity},
                {"Key": "action", "Value": r.action},
            ],
        }
        if stat.startswith("p"):
            alarm["ExtendedStatistic"] = stat
        else:
            alarm["Statistic"] = stat
        out.append(alarm)
    return out
