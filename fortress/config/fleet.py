"""The fleet of one pool: how many replicas it runs, when, and what drives the count.

A pool with a ``fleet:`` section has exactly one local replica in ``replicas:``: the template
the fleet starts copies of (``<pool>-1`` .. ``<pool>-<max_replicas>``, stable names). Without
``fleet:`` a pool runs what its replicas list, as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Self
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from fortress.config.base import NAME_PATTERN, ConfigModel, HttpUrl, seconds

__all__ = ["METRICS", "AwsFleet", "FleetConfig", "FleetSchedule", "FleetTarget"]

# What target tracking can follow, and how each is read:
# * per replica, summed over the pool, then divided by the target: in_flight (requests in
#   flight at the gateway, including those waiting for a wake), queue (the engines' waiting
#   requests), tokens_per_second (generated tokens);
# * a utilisation averaged over the running replicas (0..1 for kv_cache; percent for cpu, gpu).
METRICS = ("in_flight", "queue", "tokens_per_second", "kv_cache", "cpu", "gpu")


class FleetTarget(ConfigModel):
    """Target tracking: keep ``metric`` per replica near ``value`` (AWS target tracking, HPA)."""

    metric: Literal["in_flight", "queue", "tokens_per_second", "kv_cache", "cpu", "gpu"]
    value: float = Field(..., gt=0)

    @model_validator(mode="after")
    def _utilisation_bounds(self) -> Self:
        if self.metric == "kv_cache" and self.value > 1:
            raise ValueError("kv_cache is a fraction: give a value in (0, 1], e.g. 0.7")
        if self.metric in ("cpu", "gpu") and self.value > 100:
            raise ValueError(f"{self.metric} is a percentage: give a value in (0, 100], e.g. 70")
        return self


class FleetSchedule(ConfigModel):
    """A scheduled action (AWS Auto Scaling's): from each time ``cron`` fires, in ``timezone``,
    until another schedule fires, the pool's bounds are ``min_replicas``/``max_replicas``.

    ``cron`` has five fields (minute hour day-of-month month day-of-week), e.g. ``0 6 * * *``.
    """

    name: str | None = Field(None, pattern=NAME_PATTERN)
    cron: str
    timezone: str = "UTC"
    min_replicas: int | None = Field(None, ge=0)
    max_replicas: int | None = Field(None, ge=0)

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        from croniter import croniter

        v = " ".join(v.split())
        if len(v.split()) != 5 or not croniter.is_valid(v):
            raise ValueError(f"{v!r} is not a five-field cron expression (minute hour day month weekday)")
        return v

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (use an IANA name such as Europe/Paris)") from None
        return v

    @model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.min_replicas is None and self.max_replicas is None:
            raise ValueError("a schedule sets min_replicas, max_replicas or both")
        if (
            self.min_replicas is not None
            and self.max_replicas is not None
            and self.min_replicas > self.max_replicas
        ):
            raise ValueError("min_replicas must not exceed max_replicas")
        return self


class AwsFleet(ConfigModel):
    """The ``aws`` provider: EC2 Auto Scaling groups Fortress sizes and whose instances it routes
    to (``http://<address>:<port>``). One group per capacity type; ``capacity`` orders them."""

    region: str | None = Field(None, min_length=1, description="default: the AWS chain's region")
    endpoint_url: HttpUrl | None = Field(None, description="a VPC endpoint or a test server")
    groups: dict[Literal["spot", "on-demand"], str] = Field(..., min_length=1)
    port: int = Field(8000, ge=1, le=65535, description="the engine's port on each instance")
    address: Literal["private_ip", "public_ip"] = "private_ip"
    poll_interval: float = Field(10.0, gt=0, description="seconds between reads of the groups")
    # Spot refused: the spot group stayed short of its desired capacity this long (or refused
    # the capacity outright): the shortfall goes to the next capacity type.
    spot_fallback_after: float = Field(120.0, gt=0)
    return_to_spot_after: float = Field(600.0, gt=0, description="seconds before trying spot again")
    # A terminating lifecycle hook on the groups: Fortress drains an instance the group is
    # terminating on its own (health replacement, rebalancing), then completes the action.
    lifecycle_hook: str | None = Field(None, min_length=1)
    # cpu and gpu targets read CloudWatch, per group, every metrics_interval: EC2's
    # CPUUtilization, and the CloudWatch agent's GPU metric aggregated by AutoScalingGroupName
    # (its nvidia_gpu plugin; the deploy's launch template configures it).
    metrics_interval: float = Field(60.0, gt=0, description="seconds between CloudWatch reads")
    gpu_namespace: str = Field("CWAgent", min_length=1)
    gpu_metric: str = Field("nvidia_smi_utilization_gpu", min_length=1)

    @field_validator(
        "poll_interval", "spot_fallback_after", "return_to_spot_after", "metrics_interval", mode="before"
    )
    @classmethod
    def _aws_durations(cls, v: Any) -> Any:
        return seconds(v)


class FleetConfig(ConfigModel):
    """Autoscaling of one pool: bounds, targets, delays, schedules, scale to zero."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    # Several targets may be given: each gives a replica count, the largest wins.
    target: list[FleetTarget] = Field(default_factory=list)
    # Stabilisation windows (HPA's): scale out once every recommendation during the last
    # scale_out_delay asked for more (to the latest one), in to the largest recommended during
    # the last scale_in_delay, so a short burst or lull does not start or stop a replica.
    scale_out_delay: float = Field(30.0, ge=0, description="seconds")
    scale_in_delay: float = Field(300.0, ge=0, description="seconds")
    max_step: int | None = Field(None, ge=1, description="replicas added or removed per decision")
    # HPA's tolerance: a metric within this fraction of its target (per replica) changes
    # nothing, so Poisson noise around the target does not add and remove replicas.
    tolerance: float = Field(0.1, ge=0, lt=1)
    # Scale-in reads the metrics averaged over this many seconds (scale-out the latest interval):
    # the in window keeps the largest count it saw, and the largest of noisy short readings of
    # Poisson traffic sits far above their mean. 0: no averaging.
    metric_window: float = Field(60.0, ge=0, description="seconds")
    # Instance warm-up (AWS target tracking's): after a scale-out, while the new replicas are
    # still starting, at most this long, no further scale-out: the requests queued during a
    # cold start would otherwise ask for replicas the starting ones are about to absorb.
    warmup: float = Field(120.0, ge=0, description="seconds")
    schedules: list[FleetSchedule] = Field(default_factory=list)
    # Seconds without a request before the pool goes to 0 (min_replicas 0 only). Without it a
    # pool with min 0 keeps one replica while it is not scheduled off.
    idle_to_zero: float | None = Field(None, gt=0)
    wake_timeout: float = Field(120.0, gt=0, description="seconds a request waits for a wake")
    # Alarm actions (the seed's "GPU > 95 % for 5 min -> scale up"): while one of these alarms
    # fires, the pool asks for at least one replica more than it has (out window and max apply).
    # None: every alarm whose action is scale_up; [] : none.
    scale_out_on_alarms: list[str] | None = None
    interval: float = Field(2.0, gt=0, description="seconds between decisions")
    provider: Literal["local", "aws"] = "local"
    # aws: which capacity types to use, in order of preference (spot first: on-demand takes
    # what spot refuses or loses, and gives it back when spot returns). Default: as in groups.
    capacity: list[Literal["spot", "on-demand"]] | None = None
    aws: AwsFleet | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        # `target: {in_flight: 4}` and `target: [{metric: in_flight, value: 4}]` mean the same.
        if isinstance(v, Mapping):
            t = v.get("target")
            if isinstance(t, Mapping):
                v = {**v, "target": [{"metric": k, "value": val} for k, val in t.items()]}
        return v

    @field_validator(
        "scale_out_delay", "scale_in_delay", "idle_to_zero", "wake_timeout", "interval", mode="before"
    )
    @classmethod
    def _durations(cls, v: Any) -> Any:
        return seconds(v)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if self.idle_to_zero is not None and self.min_replicas != 0:
            raise ValueError("idle_to_zero needs min_replicas: 0")
        if self.provider == "aws":
            if self.aws is None:
                raise ValueError("provider aws needs an `aws:` section (groups, region, port)")
            for cap in self.capacity or []:
                if cap not in self.aws.groups:
                    raise ValueError(f"capacity {cap!r} has no group in aws.groups")
        elif self.aws is not None or self.capacity is not None:
            raise ValueError("`aws:` and `capacity:` are for provider: aws")
        metrics = [t.metric for t in self.target]
        if len(set(metrics)) != len(metrics):
            raise ValueError("each target metric may be given once")
        for s in self.schedules:
            for bound in (s.min_replicas, s.max_replicas):
                if bound is not None and bound > self.max_replicas:
                    raise ValueError(
                        f"schedule {s.name or s.cron!r} asks for {bound} replicas, above max_replicas "
                        f"{self.max_replicas} (the slots this pool has)"
                    )
        return self

    @property
    def capacity_order(self) -> list[str]:
        """The capacity types in order of preference (aws: ``capacity``, else spot first)."""
        if self.provider != "aws" or self.aws is None:
            return ["local"]
        if self.capacity:
            return list(self.capacity)
        return sorted(self.aws.groups, key=lambda c: c != "spot")
