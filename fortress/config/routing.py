"""Pools of replicas and how traffic is routed to them: health checks, outlier detection, retries."""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import Field, field_validator, model_validator

from fortress.config.base import NAME_PATTERN, TIER_ORDER, ConfigModel, Tier, seconds
from fortress.config.engines import ExternalReplicaConfig, ReplicaConfig
from fortress.config.fleet import FleetConfig

__all__ = [
    "TIER_ORDER",
    "FleetConfig",
    "HealthCheck",
    "OutlierDetection",
    "PoolConfig",
    "PrefixRouting",
    "Routing",
    "SessionAffinity",
    "Tier",
]

# RFC 6265 cookie names and RFC 9110 header names: tokens (no separators, no spaces).
_TOKEN = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"


class HealthCheck(ConfigModel):
    """Active health check of one pool, with the semantics of an AWS ALB target group."""

    path: str = "/health"
    interval: float = Field(10.0, gt=0, description="seconds between checks")
    timeout: float = Field(5.0, gt=0, description="seconds before a check counts as failed")
    healthy_threshold: int = Field(2, ge=1, le=10)
    unhealthy_threshold: int = Field(2, ge=1, le=10)
    expected_status: list[int] = Field(default_factory=lambda: [200])

    @field_validator("interval", "timeout", mode="before")
    @classmethod
    def _check_durations(cls, v: Any) -> Any:
        return seconds(v)

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
    def _timeout_below_interval(self) -> Self:
        if self.timeout > self.interval:
            raise ValueError("timeout must not exceed interval")
        return self


class OutlierDetection(ConfigModel):
    """Passive health: eject a replica that real traffic shows failing (Envoy's outlier detection).

    A refused or reset connection (the process is gone) ejects at once. 5xx answers and
    gateway failures eject only after several in a row, so one bad request does not take a
    replica out. An ejected replica stays out for ``base_ejection_time`` times the number of
    its ejections since it last answered well, capped at ``max_ejection_time``, and returns
    once its health checks pass.
    """

    consecutive_5xx: int = Field(
        5, ge=0, description="5xx answers in a row that eject the replica; 0 turns this off"
    )
    consecutive_gateway_failure: int = Field(
        5, ge=0, description="timeouts, resets and 502/503/504 in a row that eject; 0 turns this off"
    )
    base_ejection_time: float = Field(30.0, gt=0, description="seconds out for a first ejection")
    max_ejection_time: float = Field(300.0, gt=0, description="longest ejection, however many repeats")
    # At most this percentage of a tier is ejected by 5xx/timeouts at once, so one poison
    # request that fails everywhere cannot empty the tier; one replica may always be ejected.
    max_ejection_percent: int = Field(50, ge=0, le=100)
    # When fewer than this percentage of a tier's replicas are healthy, the tier is in panic:
    # traffic spills to the next tier, or fails open when there is none; 0 turns it off.
    panic_threshold: int = Field(0, ge=0, le=100)

    @field_validator("base_ejection_time", "max_ejection_time", mode="before")
    @classmethod
    def _durations(cls, v: Any) -> Any:
        return seconds(v)

    @model_validator(mode="after")
    def _max_not_below_base(self) -> Self:
        if self.max_ejection_time < self.base_ejection_time:
            raise ValueError("max_ejection_time must be at least base_ejection_time")
        return self


class Routing(ConfigModel):
    """Retries, the behaviour when no replica is healthy, and the engine-load scrape."""

    max_attempts: int = Field(3, ge=1, le=10, description="replicas tried per request")
    when_all_unhealthy: Literal["fail_open", "reject"] = "fail_open"
    retry_after: int = Field(5, ge=1, description="Retry-After seconds on a 503")
    # Seconds between scrapes of each replica's /metrics for its engine load (queue, KV cache);
    # 0 stops scraping.
    engine_metrics_interval: float = Field(10.0, ge=0)

    @field_validator("engine_metrics_interval", mode="before")
    @classmethod
    def _durations(cls, v: Any) -> Any:
        return seconds(v)


class SessionAffinity(ConfigModel):
    """``balancer: session``: where a request's session key comes from and how hot keys spill.

    ``source: header`` reads the key from the request header ``header``; ``source: cookie``
    reads the cookie ``cookie``, and when a request has none the gateway makes a key and sets
    the cookie on the answer (``Max-Age`` = ``ttl``, HttpOnly, SameSite=Lax). Keys map to
    replicas by consistent hashing with bounded loads: a new session goes to the first replica
    in its key's order whose requests in flight and active sessions stay within
    ``load_factor`` times the pool's average, and its requests stay there (``ttl`` after the
    last one) while that replica's requests in flight stay within the bound.
    """

    source: Literal["header", "cookie"] = "header"
    header: str = Field("x-session-id", pattern=_TOKEN, max_length=128)
    cookie: str = Field("fortress-session", pattern=_TOKEN, max_length=128)
    ttl: float = Field(
        900.0, gt=0, description="seconds the session cookie lives, and a session's replica is remembered"
    )
    load_factor: float = Field(
        1.25, ge=1.0, le=10.0, description="a replica takes at most ceil(load_factor x average) in flight"
    )

    @field_validator("ttl", mode="before")
    @classmethod
    def _ttl(cls, v: Any) -> Any:
        return seconds(v)

    @field_validator("header")
    @classmethod
    def _lower(cls, v: str) -> str:
        return v.lower()  # ASGI hands header names over in lower case


class PrefixRouting(ConfigModel):
    """``balancer: prefix``: how prompts are cut into blocks and how far load may outweigh a match.

    The prompt (chat messages serialized as ``role: content`` lines) is hashed in blocks of
    ``block_chars`` characters, each hash chained to the ones before, up to ``max_blocks``
    blocks. The balancer remembers which replicas served which chains (at most ``entries``
    chains, least recently used first out) and sends a request to the replica with the longest
    matching chain, unless that replica has more than ``max_imbalance`` requests in flight more
    than the least loaded one, and unless the match covers less than ``min_match`` of the
    prompt's blocks. A prompt no candidate holds (or holds enough of) goes to the replica
    serving the fewest hot prefixes (ones that came back within a minute), then the least
    loaded.
    """

    block_chars: int = Field(256, ge=16, le=65536)
    max_blocks: int = Field(64, ge=1, le=4096)
    entries: int = Field(100_000, ge=1, le=10_000_000, description="block chains remembered")
    max_imbalance: int = Field(
        4, ge=0, description="in flight a warm replica may carry above the least loaded one"
    )
    # A match on a small part of the prompt (a short system prompt every conversation shares)
    # says little about where the rest is cached: following it would send every new
    # conversation to the one replica that served the first.
    min_match: float = Field(
        0.5, ge=0, le=1, description="share of the prompt's blocks a match must cover to be followed"
    )


class PoolConfig(ConfigModel):
    """The replicas serving one model.

    ``model`` is the id the replicas report in ``/v1/models``; a replica that does not report
    it never gets this pool's traffic. ``None`` means "whatever each replica reports" (the
    ``fortress serve --replica URL`` case). ``aliases`` are extra names clients may use.
    ``name`` names the pool in metrics and status (default: the model, or ``default`` for the
    pool without one).
    """

    name: str | None = Field(None, pattern=NAME_PATTERN)
    model: str | None = None
    aliases: list[str] = Field(default_factory=list)
    health_check: HealthCheck = Field(default_factory=HealthCheck)
    outlier: OutlierDetection = Field(default_factory=OutlierDetection)
    # How a replica is picked within a tier (``routing/balancers.py``; docs/routing.md).
    balancer: Literal["least_outstanding", "session", "prefix"] = "least_outstanding"
    session: SessionAffinity = Field(default_factory=SessionAffinity)
    prefix: PrefixRouting = Field(default_factory=PrefixRouting)
    deregistration_delay: float = Field(
        30.0, ge=0, description="seconds a draining replica keeps in-flight requests"
    )
    # Carry a chat stream on to another replica when its replica dies mid-stream (the text sent
    # so far becomes the start of the assistant's answer; docs/routing.md).
    continuation: bool = False
    replicas: list[ReplicaConfig] = Field(default_factory=list)
    # Autoscaling: the pool's one local replica is the template the fleet starts copies of.
    fleet: FleetConfig | None = None

    @field_validator("deregistration_delay", mode="before")
    @classmethod
    def _delay(cls, v: Any) -> Any:
        return seconds(v)

    @model_validator(mode="after")
    def _strategy_settings_match(self) -> Self:
        # Settings for a strategy the pool does not use are a mistake, not a no-op.
        # (Compared with the defaults: a config dumped and loaded again carries every section.)
        for name, default in (("session", SessionAffinity()), ("prefix", PrefixRouting())):
            if self.balancer != name and getattr(self, name) != default:
                raise ValueError(
                    f"`{name}:` settings apply to `balancer: {name}`, but this pool's balancer is "
                    f"{self.balancer!r}"
                )
        return self

    @model_validator(mode="after")
    def _aliases_need_model(self) -> Self:
        if self.aliases and not self.model:
            raise ValueError("aliases need the pool's model to be set")
        return self

    @model_validator(mode="after")
    def _fleet_template(self) -> Self:
        if self.fleet is None:
            return self
        if not self.model:
            raise ValueError("a pool with `fleet:` needs its `model`: requests for it wake the pool")
        if self.fleet.provider == "aws":
            if self.replicas:
                raise ValueError(
                    "a pool with fleet provider aws has no `replicas:`: its replicas are the instances of "
                    "its Auto Scaling groups"
                )
            return self
        local = [rc for rc in self.replicas if not isinstance(rc, ExternalReplicaConfig)]
        if len(local) != 1 or len(self.replicas) != 1:
            raise ValueError(
                "a pool with `fleet:` has exactly one replica, a local one (engine: llamacpp, vllm, "
                "sim or bedrock): the template the fleet starts copies of"
            )
        if local[0].count != 1:
            raise ValueError(
                "a fleet's replica count comes from fleet.min_replicas/max_replicas: remove `count`"
            )
        return self
