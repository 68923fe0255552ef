"""The one typed model of ``fortress.yaml``.

Nothing else in Fortress parses configuration. ``load_config`` reads the YAML, applies
``FORTRESS__SECTION__KEY`` environment overrides and validates the result; a
``ConfigError`` names every bad key together with the file line it came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "FORTRESS__"


class Tier(StrEnum):
    """Replica tiers, highest first: traffic goes to the highest tier with a healthy replica."""

    PRIMARY = "primary"
    SECONDARY = "secondary"
    STANDBY = "standby"


TIER_ORDER: tuple[Tier, ...] = (Tier.PRIMARY, Tier.SECONDARY, Tier.STANDBY)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HealthCheck(_Model):
    """Active health check of one pool, with the semantics of an AWS ALB target group."""

    path: str = "/health"
    interval: float = Field(10.0, gt=0, description="seconds between checks")
    timeout: float = Field(5.0, gt=0, description="seconds before a check counts as failed")
    healthy_threshold: int = Field(2, ge=1, le=10)
    unhealthy_threshold: int = Field(2, ge=1, le=10)
    expected_status: list[int] = Field(default_factory=lambda: [200])
    # Passive ejection backs off: the first re-check after an ejection waits `eject_backoff`,
    # doubling on each consecutive ejection up to `eject_backoff_max`.
    eject_backoff: float = Field(1.0, ge=0)
    eject_backoff_max: float = Field(30.0, ge=0)
    # How often (in checks) a healthy replica's /v1/models is re-read to confirm its model.
    models_refresh_every: int = Field(6, ge=1)

    @field_validator("path")
    @classmethod
    def _path_starts_with_slash(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError("must start with '/'")
        return v

    @field_validator("expected_status", mode="before")
    @classmethod
    def _status_list(cls, v: Any) -> Any:
        # Accept 200, "200", "200-299" or "200,204" like an ALB matcher.
        if isinstance(v, int):
            return [v]
        if isinstance(v, str):
            codes: list[int] = []
            for part in v.split(","):
                part = part.strip()
                if "-" in part:
                    lo, hi = part.split("-", 1)
                    codes.extend(range(int(lo), int(hi) + 1))
                else:
                    codes.append(int(part))
            return codes
        return v

    @model_validator(mode="after")
    def _timeout_below_interval(self) -> HealthCheck:
        if self.timeout > self.interval:
            raise ValueError("timeout must not exceed interval")
        return self


class ReplicaConfig(_Model):
    """One replica: a URL of a running OpenAI-compatible server, or a local engine."""

    url: str | None = None
    engine: Literal["external", "llamacpp", "vllm", "sim"] = "external"
    tier: Tier = Tier.PRIMARY
    count: int = Field(1, ge=1, description="local engines: how many processes to start")
    options: dict[str, Any] = Field(default_factory=dict, description="engine options")

    @field_validator("url")
    @classmethod
    def _url_is_http(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _url_for_external(self) -> ReplicaConfig:
        if self.engine == "external" and not self.url:
            raise ValueError("an external replica needs a url")
        return self


class PoolConfig(_Model):
    """The replicas serving one model.

    ``model`` is the id the replicas report in ``/v1/models``; a replica that does not report
    it never gets this pool's traffic. ``None`` means "whatever each replica reports" (the
    ``fortress serve --replica URL`` case). ``aliases`` are extra names clients may use.
    """

    model: str | None = None
    aliases: list[str] = Field(default_factory=list)
    health_check: HealthCheck = Field(default_factory=HealthCheck)
    deregistration_delay: float = Field(
        30.0, ge=0, description="seconds a draining replica keeps in-flight requests"
    )
    replicas: list[ReplicaConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _aliases_need_model(self) -> PoolConfig:
        if self.aliases and not self.model:
            raise ValueError("aliases need the pool's model to be set")
        return self


class Timeouts(_Model):
    """Upstream timeouts in seconds."""

    connect: float = Field(5.0, gt=0)
    first_byte: float = Field(120.0, gt=0, description="until the replica's response headers")
    idle: float = Field(60.0, gt=0, description="longest gap between two chunks of a stream")
    total: float = Field(600.0, gt=0)


class Routing(_Model):
    """Retries and the behaviour when no replica is healthy."""

    max_attempts: int = Field(3, ge=1, le=10, description="replicas tried per request")
    when_all_unhealthy: Literal["fail_open", "reject"] = "fail_open"
    retry_after: int = Field(5, ge=1, description="Retry-After seconds on a 503")


class Server(_Model):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    upstream_connections: int = Field(1000, ge=1, description="keep-alive pool size to replicas")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Bearer token for /admin/*; without one, the admin API answers only to this machine.
    admin_token: str | None = None
    # Add keys OpenAI's schema requires that an engine left out (llama.cpp: logprobs, refusal).
    conform_responses: bool = True


class UsagePlan(_Model):
    """Who may call how much: a token bucket plus quotas, like an API Gateway usage plan."""

    rate: float | None = Field(5.0, gt=0, description="requests per second (bucket refill)")
    burst: int | None = Field(10, ge=1, description="bucket size")
    max_concurrent: int | None = Field(None, ge=1, description="requests in flight per key")
    # Quotas: period -> limit; periods are "day", "week", "month" (UTC calendar periods).
    requests: dict[Literal["day", "week", "month"], int] = Field(default_factory=lambda: {"day": 5000})
    input_tokens: dict[Literal["day", "week", "month"], int] = Field(default_factory=dict)
    output_tokens: dict[Literal["day", "week", "month"], int] = Field(default_factory=dict)
    # Output tokens reserved at admission when the request gives no max_tokens.
    default_max_tokens: int = Field(2048, ge=1)


class Auth(_Model):
    """API keys. Switching auth off must be explicit: ``auth: {enabled: false}``."""

    enabled: bool = True
    # HMAC secret for key hashes and the audit chain; from FORTRESS__AUTH__SECRET, or generated
    # once into `state_dir`/secret when unset.
    secret: str | None = None
    cache_refresh: float = Field(2.0, gt=0, le=5, description="seconds between key-cache syncs")
    rotation_grace: float = Field(24 * 3600.0, ge=0, description="seconds an old key works after rotate")


class Limits(_Model):
    """Where usage-plan state lives: this process, or Redis shared by several gateways."""

    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "fortress:"
    # Redis unreachable: admit and log (true, the gateway stays up) or answer 503 (false).
    fail_open: bool = True


class Audit(_Model):
    """The audit trail: required headers, body capture, journal and where records are shipped."""

    enabled: bool = True
    required_headers: list[str] = Field(
        default_factory=lambda: ["x-llm-source", "x-llm-user", "x-llm-request-type"]
    )
    body_capture: Literal["none", "metadata", "full"] = "none"
    redact_fields: list[str] = Field(default_factory=lambda: ["messages", "prompt"])
    journal_dir: str | None = Field(None, description="default: <state_dir>/journal")
    group_commit_ms: float = Field(2.0, ge=0, description="longest wait to batch records per fsync")
    archive_dir: str | None = Field(None, description="JSONL.gz per day, or s3://bucket/prefix")
    anchor_every: float = Field(60.0, gt=0, description="seconds between chain-head anchors")
    segment_bytes: int = Field(64 * 1024 * 1024, ge=4096, description="journal segment size before rotation")
    ship_batch: int = Field(1000, ge=1, le=100_000, description="records per store transaction")
    ship_interval: float = Field(
        0.25, ge=0, le=60, description="least seconds between store transactions (gathers records)"
    )
    archive_every: float = Field(300.0, gt=0, description="seconds between archive part files")

    @field_validator("required_headers")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return [h.lower() for h in v]


class Database(_Model):
    """The store for keys and audit records: SQLite by default, PostgreSQL by URL."""

    url: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///<state_dir>/fortress.db")


def _seconds(v: Any) -> Any:
    """Durations as numbers of seconds or strings like "90s", "3m", "1h"."""
    if isinstance(v, str):
        s = v.strip().lower()
        for suffix, mult in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
            if s.endswith(suffix) and s[: -len(suffix)].replace(".", "", 1).isdigit():
                return float(s[: -len(suffix)]) * mult
    return v


AlarmMetric = Literal[
    "unhealthy_replicas",  # replicas in state unhealthy (all models)
    "healthy_replicas",  # fewest healthy replicas of any configured model
    "avg_latency",  # seconds, mean over the window
    "p95_latency",  # seconds
    "ttft_p95",  # seconds to the first streamed token
    "errors_5xx",  # count over the window
    "errors_4xx",  # count over the window
    "rate_limited",  # 429s over the window
    "request_rate",  # requests per second over the window
    "gpu_utilization",  # percent, mean over the window (NVML, where a GPU exists)
    "memory_utilization",  # percent of host memory in use
]


class AlarmRule(_Model):
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
        return _seconds(v)


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
            name="gpu_scale_up",
            metric="gpu_utilization",
            threshold=95,
            for_=300,
            severity="info",
            action="scale_up",
            description="GPU utilisation above 95 % for 5 minutes: add capacity.",
        ),
    ]


class AlarmNotify(_Model):
    """Where alarm state changes (firing, resolved) are sent."""

    log: bool = True
    webhooks: list[str] = Field(default_factory=list, description="Slack-compatible incoming webhooks")
    sns_topic_arn: str | None = None
    sns_region: str | None = None
    timeout: float = Field(5.0, gt=0)


class Alarms(_Model):
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


class AccessLog(_Model):
    """One JSON line per completion request on the ``fortress.access_log`` logger."""

    enabled: bool = True
    stream: Literal["stdout", "stderr", "none"] = Field("stdout", description="none: only your handlers")
    emf: bool = Field(False, description="write CloudWatch Embedded Metric Format lines")
    emf_namespace: str = "Fortress"


class Observe(_Model):
    """Metrics, alarms, the dashboard and the access log."""

    # false: none of them (no observers on the request path, no /metrics, /alarms, /dashboard);
    # for a gateway observed by other means, and the overhead benchmark's baseline.
    enabled: bool = True
    metrics: bool = Field(True, description="serve GET /metrics")
    # Without it /metrics follows the admin rule (admin token, or this machine only).
    metrics_public: bool = False
    dashboard: bool = True
    engine_metrics_interval: float = Field(10.0, ge=0, description="seconds; 0 stops scraping engines")
    access_log: AccessLog = Field(default_factory=AccessLog)
    alarms: Alarms = Field(default_factory=Alarms)


class FortressConfig(_Model):
    """The whole of ``fortress.yaml``."""

    server: Server = Field(default_factory=Server)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    routing: Routing = Field(default_factory=Routing)
    pools: list[PoolConfig] = Field(default_factory=list)
    state_dir: str = Field(".fortress", description="local state: secret, journal, SQLite, logs")
    auth: Auth = Field(default_factory=Auth)
    plans: dict[str, UsagePlan] = Field(default_factory=lambda: {"default": UsagePlan()})
    limits: Limits = Field(default_factory=Limits)
    audit: Audit = Field(default_factory=Audit)
    database: Database = Field(default_factory=Database)
    observe: Observe = Field(default_factory=Observe)

    @model_validator(mode="after")
    def _names_unique(self) -> FortressConfig:
        seen: dict[str, int] = {}
        for i, pool in enumerate(self.pools):
            for name in ([pool.model] if pool.model else []) + list(pool.aliases):
                if name in seen:
                    raise ValueError(f"model name {name!r} is used by pools {seen[name]} and {i}")
                seen[name] = i
        return self


class ConfigError(Exception):
    """A config that cannot be used; the message names each bad key and its line."""


def _line_index(text: str) -> dict[tuple[str | int, ...], int]:
    """Map each key path in the YAML document to its 1-based line number."""
    index: dict[tuple[str | int, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str | int, ...]) -> None:
        index.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = (*path, key_node.value)
                index[key] = key_node.start_mark.line + 1
                walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                index[(*path, i)] = item.start_mark.line + 1
                walk(item, (*path, i))

    root = yaml.compose(text, Loader=yaml.SafeLoader)
    if root is not None:
        walk(root, ())
    return index


def _apply_env(data: dict[str, Any], env: Mapping[str, str]) -> None:
    """Apply ``FORTRESS__SERVER__PORT=9000``-style overrides (values parsed as YAML scalars)."""
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX) :].split("__") if p]
        if not parts:
            continue
        node: Any = data
        for part in parts[:-1]:
            if isinstance(node, list):
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
        value = yaml.safe_load(raw) if raw != "" else ""
        if isinstance(node, list):
            node[int(parts[-1])] = value
        else:
            node[parts[-1]] = value


def _format_errors(err: ValidationError, lines: dict[tuple[str | int, ...], int], source: str) -> str:
    out = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        line = None
        probe = loc
        while probe and line is None:
            line = lines.get(probe)
            probe = probe[:-1]
        where = f" (line {line})" if line else ""
        out.append(f"  {key}{where}: {e['msg']}")
    return "\n".join(out)


def parse_config(text: str, source: str = "<string>", env: Mapping[str, str] | None = None) -> FortressConfig:
    """Validate YAML text into a ``FortressConfig`` (env overrides applied)."""
    try:
        data = yaml.safe_load(text) or {}
        lines = _line_index(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML in {source}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"invalid configuration in {source}: the top level must be a mapping")
    try:
        _apply_env(data, os.environ if env is None else env)
    except (KeyError, IndexError, ValueError, TypeError) as exc:
        raise ConfigError(f"bad {ENV_PREFIX}* override: {exc}") from exc
    try:
        return FortressConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, lines, source)) from None


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> FortressConfig:
    """Read and validate ``fortress.yaml``."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror}") from exc
    return parse_config(text, str(p), env)


EXAMPLE_CONFIG = """\
# fortress.yaml: Fortress configuration. Every key is optional unless marked.
# Any key can be overridden from the environment: FORTRESS__SERVER__PORT=9000.

server:
  host: 127.0.0.1          # address the gateway listens on
  port: 8080
  max_body_bytes: 4194304  # larger requests get 413
  log_level: info

timeouts:                  # seconds, towards the replicas
  connect: 5
  first_byte: 120          # until the replica starts answering (non-stream: the whole answer)
  idle: 60                 # longest silence between two chunks of a stream
  total: 600

routing:
  max_attempts: 3          # replicas tried for one request, when nothing reached the client yet
  when_all_unhealthy: fail_open   # fail_open: try them anyway (like an ALB); reject: 503
  retry_after: 5           # Retry-After seconds on a 503

pools:
  - model: smollm2         # the id the replicas report in /v1/models (required match)
    aliases: [gpt-4o-mini] # extra names clients may use for this model
    health_check:          # ALB-style target health
      path: /health
      interval: 10
      timeout: 5
      healthy_threshold: 2
      unhealthy_threshold: 2
      expected_status: 200 # or "200-299"
    deregistration_delay: 30   # seconds a draining replica may finish its requests
    replicas:
      - url: http://127.0.0.1:8081
        tier: primary      # primary | secondary | standby
      - url: http://127.0.0.1:8082
        tier: secondary
      # - engine: llamacpp     # a local llama-server started by `fortress up -c` (not `serve`)
      #   count: 1

state_dir: .fortress       # server secret, audit journal, SQLite store, logs

auth:                      # API keys: Authorization: Bearer <key> or x-api-key: <key>
  enabled: true            # off only when written here: enabled: false
  cache_refresh: 2         # seconds; a revoked key stops working within this on every gateway
  rotation_grace: 86400    # seconds an old key keeps working after `fortress keys rotate`
  # secret: ...            # gateways sharing a database must share it (FORTRESS__AUTH__SECRET)

plans:                     # usage plans; a key belongs to one (fortress keys create --plan)
  default:
    rate: 5                # requests per second (token bucket refill)
    burst: 10              # bucket size
    max_concurrent: null   # requests in flight per key
    requests: {day: 5000}  # quotas per UTC day / week / month
    input_tokens: {}       # e.g. {month: 10000000}
    output_tokens: {}
    default_max_tokens: 2048   # output tokens reserved when a request sets no max_tokens

limits:
  backend: memory          # memory (one gateway) | redis (several gateways share the limits)
  redis_url: redis://127.0.0.1:6379/0
  fail_open: true          # Redis unreachable: admit (true) or answer 503 (false)

audit:
  enabled: true
  required_headers: [x-llm-source, x-llm-user, x-llm-request-type]
  body_capture: none       # none | metadata | full (with redact_fields replaced)
  redact_fields: [messages, prompt]
  archive_dir: null        # JSONL.gz per day: a directory, or s3://bucket/prefix

database:
  url: null                # default sqlite:///<state_dir>/fortress.db; or postgresql+psycopg://user:pass@host/db

observe:
  metrics: true            # GET /metrics (admin token, or this machine only, unless metrics_public)
  dashboard: true          # GET /dashboard
  access_log: {enabled: true, stream: stdout}
  alarms:
    notify: {log: true, webhooks: []}   # Slack-compatible webhooks; sns_topic_arn for AWS SNS
"""
