"""Who may call: API keys, usage plans and where the limiter keeps its state."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fortress.config.base import ConfigModel


class UsagePlan(ConfigModel):
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
    # Keys of this plan may name the end user in the body's `user` field instead of x-llm-user
    # (audit.user_from_body allows it for every key).
    user_from_body: bool = False


# The built-in plan of the operator's own key (the first key `fortress up` creates): no rate,
# no burst, no quotas, so the operator's load tests and scripts are never answered 429. A
# config that defines a plan of this name replaces it.
OPERATOR_PLAN = "operator"


def operator_plan() -> UsagePlan:
    """The built-in ``operator`` plan: unlimited (no bucket, no quotas)."""
    return UsagePlan(rate=None, burst=None, requests={})


def default_plans() -> dict[str, UsagePlan]:
    """The plans of a config that names none: ``default`` (the seed's) and ``operator``."""
    return {"default": UsagePlan(), OPERATOR_PLAN: operator_plan()}


class Auth(ConfigModel):
    """API keys. Switching auth off must be explicit: ``auth: {enabled: false}``."""

    enabled: bool = True
    # HMAC secret for key hashes and the audit chain; from FORTRESS__AUTH__SECRET, or generated
    # once into `state_dir`/secret when unset.
    secret: str | None = None
    cache_refresh: float = Field(2.0, gt=0, le=5, description="seconds between key-cache syncs")
    rotation_grace: float = Field(24 * 3600.0, ge=0, description="seconds an old key works after rotate")


class Limits(ConfigModel):
    """Where usage-plan state lives: this process, or Redis shared by several gateways."""

    backend: Literal["memory", "redis"] = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "fortress:"
    # Redis unavailable: admit through this gateway's own limiter (the same plans, enforced per
    # gateway), count those admissions and add them to Redis's usage when it is back (true); or
    # answer 503 (false).
    fail_open: bool = True
    # The longest one Redis call may take, connecting included; a frozen Redis costs a request
    # at most this much, and only until the breaker opens.
    timeout: float = Field(0.25, gt=0, le=30, description="seconds one Redis call may take")
    # This many failed calls in a row open the breaker: no Redis call at all, immediate decisions.
    breaker_failures: int = Field(3, ge=1, description="failures in a row that open the breaker")
    # While open, one probe every this many seconds; when Redis answers the breaker closes.
    breaker_reset: float = Field(5.0, gt=0, description="seconds between probes while open")
