"""Observability: alarms and their notifications, the access log, metrics and the dashboard."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from fortress.config.base import ConfigModel, seconds

AlarmMetric = Literal[
    "unhealthy_replicas",  # replicas in state unhealthy (all models)
    "healthy_replicas",  # fewest healthy replicas of any configured model
    "wrong_model_replicas",  # replicas seen serving another model than their pool's
    "avg_latency",  # seconds, mean over the window
    "p95_latency",  # seconds
    "ttft_p95",  # seconds to the first streamed token
    "errors_5xx",  # count over the window
    "errors_4xx",  # count over the window
    "rate_limited",  # 429s over the window
    "request_rate",  # requests per second over the window
    "gpu_utilization",  # percent, mean over the window (NVML, where a GPU exists)
    "memory_utilization",  # percent of host memory in use
    "journal_disk_utilization",  # percent of the audit journal's filesystem in use
    "store_unreachable",  # 1 while the audit shipper or the key cache cannot reach the store
    "limiter_fail_open",  # admissions by the local fallback while Redis was out, over the window
    "connections_refused",  # connections turned away at the connection cap, over the window
    "replica_restarts",  # local replica processes restarted after a crash, over the window
]


class AlarmRule(ConfigModel):
    """One alarm: ``metric op threshold`` must hold for ``for`` seconds before it fires."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$")
    metric: AlarmMetric
    op: Literal[">", ">=", "<", "<="] = ">"
    threshold: float
    for_: float = Field(0.0, ge=0, alias="for", description="seconds the condition must hold")
    window: float = Field(60.0, gt=0, description="seconds of traffic the metric is computed over")
    severity: Literal["page", "warning", "info"] = "warning"
    # "scale_up" marks a rule the fleet's autoscaler listens to, beside notifying.
    action: Literal["notify", "scale_up"] = "notify"
    description: str = ""

    def describe(self) -> dict[str, Any]:
        """The rule as alarm snapshots and notifications show it."""
        return {
            "name": self.name,
            "severity": self.severity,
            "action": self.action,
            "metric": self.metric,
            "op": self.op,
            "threshold": self.threshold,
            "for_seconds": self.for_,
            "window_seconds": self.window,
            "description": self.description,
        }

    @field_validator("for_", "window", mode="before")
    @classmethod
    def _durations(cls, v: Any) -> Any:
        return seconds(v)


def default_alarm_rules() -> list[AlarmRule]:
    """The alarms of the seed deployment (CloudWatch alarms on its ALB and GPUs)."""
    return [
        AlarmRule(
            name="unhealthy_replicas",
            metric="unhealthy_replicas",
            threshold=0,
            severity="page",
            description="A replica failed its health checks or was ejected.",
        ),
        AlarmRule(
            name="model_mismatch",
            metric="wrong_model_replicas",
            threshold=0,
            severity="page",
            description="A replica serves another model than its pool's (its answers are not relayed).",
        ),
        AlarmRule(
            name="latency_warning",
            metric="avg_latency",
            threshold=30,
            for_=180,
            severity="warning",
            description="Average response time above 30 s for 3 minutes.",
        ),
        AlarmRule(
            name="latency_page",
            metric="avg_latency",
            threshold=60,
            for_=60,
            severity="page",
            description="Average response time above 60 s for 1 minute.",
        ),
        AlarmRule(
            name="errors_5xx",
            metric="errors_5xx",
            threshold=10,
            for_=120,
            severity="page",
            description="More than 10 server errors per minute for 2 minutes.",
        ),
        AlarmRule(
            name="journal_disk",
            metric="journal_disk_utilization",
            threshold=90,
            severity="page",
            description="The audit journal's disk is over 90 % full; near full, requests are refused.",
        ),
        AlarmRule(
            name="store_unreachable",
            metric="store_unreachable",
            threshold=0,
            for_=60,
            severity="warning",
            description="The database is unreachable: records wait in the journal, new keys are unknown.",
        ),
        AlarmRule(
            name="limiter_fail_open",
            metric="limiter_fail_open",
            threshold=0,
            severity="warning",
            description="Redis is unavailable: usage plans are enforced per gateway, not shared.",
        ),
        AlarmRule(
            name="connections_refused",
            metric="connections_refused",
            threshold=0,
            severity="warning",
            description="Clients were turned away at the connection cap (server.max_connections).",
        ),
        AlarmRule(
            name="replica_restarts",
            metric="replica_restarts",
            threshold=0,
            window=600,
            severity="warning",
            description="A local replica process crashed and was restarted in the last 10 minutes.",
        ),
        AlarmRule(
            name="gpu_scale_up",
            metric="gpu_utilization",
            threshold=95,
            for_=300,
            severity="info",
            action="scale_up",
            description="GPU utilisation above 95 % for 5 minutes: add capacity.",
        ),
    ]


class AlarmNotify(ConfigModel):
    """Where alarm state changes (firing, resolved) are sent."""

    log: bool = True
    webhooks: list[str] = Field(default_factory=list, description="Slack-compatible incoming webhooks")
    sns_topic_arn: str | None = None
    sns_region: str | None = None
    timeout: float = Field(5.0, gt=0)


class Alarms(ConfigModel):
    """Alarm rules evaluated in the gateway. Giving ``rules`` replaces the defaults."""

    enabled: bool = True
    evaluate_every: float = Field(5.0, gt=0, description="seconds between evaluations")
    notify: AlarmNotify = Field(default_factory=AlarmNotify)
    rules: list[AlarmRule] = Field(default_factory=default_alarm_rules)

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, v: list[AlarmRule]) -> list[AlarmRule]:
        names = [r.name for r in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate alarm names: {sorted(dup)}")
        return v


class AccessLog(ConfigModel):
    """One JSON line per completion request on the ``fortress.access_log`` logger."""

    enabled: bool = True
    stream: Literal["stdout", "stderr", "none"] = Field("stdout", description="none: only your handlers")
    # A file instead of ``stream``: appended to, reopened on SIGHUP (for logrotate).
    file: str | None = Field(None, description="append the lines to this file instead of stream")
    emf: bool = Field(False, description="write CloudWatch Embedded Metric Format lines")
    emf_namespace: str = "Fortress"


class Observe(ConfigModel):
    """Metrics, alarms, the dashboard and the access log."""

    # false: none of them (no observers on the request path, no /metrics, /alarms, /dashboard);
    # for a gateway observed by other means, and the overhead benchmark's baseline.
    enabled: bool = True
    metrics: bool = Field(True, description="serve GET /metrics")
    # Without it /metrics follows the admin rule (admin token, or this machine only).
    metrics_public: bool = False
    dashboard: bool = True
    access_log: AccessLog = Field(default_factory=AccessLog)
    alarms: Alarms = Field(default_factory=Alarms)
