"""What only a deployment needs: the ``deploy:`` section of ``fortress.yaml``.

Everything else a deployment is made of (pools, tiers, health checks, plans, audit, alarms,
schedules, spot) comes from the rest of the config; this section adds what AWS alone needs:
region, network, instance types, images, volumes, the gateway's own service, shared state,
the audit archive, a domain, budgets, and the assumptions the cost model prices with.

A pool is deployed when ``deploy.aws.pools`` names it. Its model servers come from the pool:

* a pool with ``engine: vllm`` replicas: one Auto Scaling group per replica entry, in its
  tier's zone (primary, secondary, standby in different AZs); a ``standby`` group is cold
  (desired 0, started from its image when needed), the others run ``count`` instances;
* a pool with ``fleet: {provider: aws}``: the groups its ``fleet.aws.groups`` name (spot and
  on-demand), sized by the fleet between its min and max, with its schedules; their vLLM
  settings are ``vllm:`` here (such a pool has no replicas to take them from).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Self

from pydantic import Field, field_validator, model_validator

from fortress.config.base import NAME_PATTERN, ConfigModel, seconds
from fortress.config.engines import VllmOptions

__all__ = [
    "AwsDeploy",
    "Deploy",
    "DeployArchive",
    "DeployBudget",
    "DeployCost",
    "DeployDomain",
    "DeployGateway",
    "DeployPool",
    "DeployPostgres",
    "DeployRedis",
    "DeployVolume",
    "DeployVpc",
]

# An AMI id, or an SSM parameter holding one (``ssm:/aws/service/...``), resolved at deploy time.
IMAGE_PATTERN = r"^(ami-[0-9a-f]{8,17}|ssm:/[A-Za-z0-9_./-]+)$"
# The Deep Learning AMI (Ubuntu 22.04, NVIDIA driver, Docker): vLLM runs in its container.
DEFAULT_GPU_IMAGE = (
    "ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
)


class DeployVolume(ConfigModel):
    """The model cache: an encrypted gp3 volume per instance, kept across engine restarts."""

    size_gb: int = Field(500, ge=20, le=16384)
    iops: int = Field(3000, ge=3000, le=16000, description="gp3: 3,000 included")
    throughput: int = Field(125, ge=125, le=1000, description="MB/s; gp3: 125 included")


class DeployPool(ConfigModel):
    """How one pool's model servers run on EC2."""

    instance_type: str = Field(..., pattern=r"^[a-z][a-z0-9-]*\.[a-z0-9]+$")
    image: str = Field(DEFAULT_GPU_IMAGE, pattern=IMAGE_PATTERN)
    volume: DeployVolume = Field(default_factory=DeployVolume)
    # The Auto Scaling group waits this long before its health checks count (a 72B model loads
    # for minutes).
    health_check_grace: float = Field(600.0, ge=0, description="seconds")
    # Sticky sessions on the pool's target groups (an application cookie), e.g. 900 s.
    stickiness: float | None = Field(None, gt=0, le=604800, description="seconds; None: off")
    stickiness_cookie: str = Field("LlmServiceStickiness", pattern=r"^[A-Za-z0-9_-]+$")
    # The most an hour of spot may cost (the seed's $0.25); None: up to the on-demand price.
    spot_max_price: float | None = Field(None, gt=0)
    # vLLM's settings for a pool whose servers come from ``fleet.aws`` (it has no replicas).
    vllm: VllmOptions | None = None
    # Generated output tokens per second one instance sustains: prices a million tokens.
    throughput_tokens_per_second: float | None = Field(None, gt=0)
    # Environment variables of the model server read from Secrets Manager at boot (e.g. HF_TOKEN
    # for a gated model): name -> the secret's ARN, or its name in the stack's region. The value
    # goes into a root-only file vLLM's unit reads, never into the template or the user data.
    env_secrets: dict[str, str] = Field(default_factory=dict)

    # ``env_secrets``: an environment variable's name, and a Secrets Manager secret's ARN or name.
    ENV_NAME_PATTERN: ClassVar[str] = r"^[A-Z_][A-Z0-9_]*$"
    SECRET_ARN_PATTERN: ClassVar[str] = (
        r"^arn:aws[a-z-]*:secretsmanager:[a-z0-9-]+:\d{12}:secret:[A-Za-z0-9/_+=.@-]+$"
    )
    SECRET_NAME_PATTERN: ClassVar[str] = r"^[A-Za-z0-9/_+=.@-]{1,512}$"

    @field_validator("health_check_grace", "stickiness", mode="before")
    @classmethod
    def _durations(cls, v: Any) -> Any:
        return seconds(v)

    @field_validator("env_secrets")
    @classmethod
    def _env_secrets(cls, v: dict[str, str]) -> dict[str, str]:
        import re

        for name, ref in v.items():
            if not re.match(cls.ENV_NAME_PATTERN, name):
                raise ValueError(
                    f"env_secrets: {name!r} is not an environment variable name (upper case letters, "
                    "digits and _, not starting with a digit)"
                )
            if ref.startswith("arn:"):
                if not re.match(cls.SECRET_ARN_PATTERN, ref):
                    raise ValueError(
                        f"env_secrets.{name}: {ref!r} is not a Secrets Manager secret ARN "
                        "(arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME-SUFFIX)"
                    )
            elif not re.match(cls.SECRET_NAME_PATTERN, ref):
                raise ValueError(
                    f"env_secrets.{name}: {ref!r} is neither a secret ARN nor a secret name (1-512 of "
                    "letters, digits and /_+=.@-)"
                )
        return v


class DeployVpc(ConfigModel):
    """A new VPC (``cidr``, ``max_azs``, ``nat_gateways``) or an existing one (``id``)."""

    id: str | None = Field(None, pattern=r"^vpc-[0-9a-f]{8,17}$")
    cidr: str = Field("10.0.0.0/16", pattern=r"^\d{1,3}(\.\d{1,3}){3}/\d{1,2}$")
    max_azs: int = Field(3, ge=2, le=6)
    nat_gateways: int = Field(1, ge=0, le=6, description="0: no internet egress from private subnets")
    flow_logs: bool = True


class DeployGateway(ConfigModel):
    """Fortress itself: an ECS Fargate service behind an internet-facing ALB."""

    cpu: Literal[256, 512, 1024, 2048, 4096] = 512  # vCPU units
    memory: int = Field(1024, ge=512, le=30720, description="MiB")
    min_tasks: int = Field(2, ge=1)
    max_tasks: int = Field(10, ge=1)
    cpu_target: float = Field(70.0, gt=0, le=100)
    memory_target: float = Field(80.0, gt=0, le=100)
    # How a new task definition replaces the old one. rolling: new tasks pass the ALB's /health
    # before old ones stop, and a failed deployment rolls back (ECS's circuit breaker).
    # blue_green: CodeDeploy starts the new tasks beside the old ones behind a second target
    # group, shifts the public listener's traffic to them as blue_green_traffic says, and rolls
    # back if the deployment fails or the gateway's 5xx alarm fires.
    deployment: Literal["rolling", "blue_green"] = "rolling"
    # all_at_once: every request at once; canary_10_5m: 10 % for 5 minutes, then the rest;
    # linear_10_1m: 10 % more each minute.
    blue_green_traffic: Literal["all_at_once", "canary_10_5m", "linear_10_1m"] = "canary_10_5m"
    # An image to run instead of the one built from this repository's Dockerfile.
    image: str | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _tasks(self) -> Self:
        if self.min_tasks > self.max_tasks:
            raise ValueError("min_tasks is above max_tasks")
        # Only a value other than the default is refused: a config written back out (the
        # deployed gateway's, a replace()) carries every field.
        default = type(self).model_fields["blue_green_traffic"].default
        if self.blue_green_traffic != default and self.deployment != "blue_green":
            raise ValueError("blue_green_traffic applies only to deployment: blue_green")
        return self


class DeployPostgres(ConfigModel):
    """RDS PostgreSQL for keys, plans and the audit store (encrypted; Multi-AZ when ``ha``)."""

    instance_class: str = Field("db.t4g.medium", pattern=r"^db\.[a-z0-9]+\.[a-z0-9]+$")
    storage_gb: int = Field(100, ge=20, le=65536)
    ha: bool = True
    backup_days: int = Field(7, ge=1, le=35)


class DeployRedis(ConfigModel):
    """ElastiCache Redis for shared limits (encrypted in transit and at rest)."""

    node_type: str = Field("cache.t4g.small", pattern=r"^cache\.[a-z0-9]+\.[a-z0-9]+$")
    replicas: int = Field(1, ge=0, le=5, description="read replicas; >= 1 gives failover")


class DeployArchive(ConfigModel):
    """The audit archive bucket: encrypted, versioned, public access blocked."""

    glacier_after_days: int = Field(90, ge=1)
    expire_after_days: int | None = Field(None, ge=1)
    object_lock_days: int | None = Field(None, ge=1, description="compliance-mode retention; None: off")

    @model_validator(mode="after")
    def _order(self) -> Self:
        if self.expire_after_days is not None and self.expire_after_days <= self.glacier_after_days:
            raise ValueError("expire_after_days must come after glacier_after_days")
        return self


class DeployDomain(ConfigModel):
    """The gateway's public name and its ACM certificate (HTTPS; HTTP answers 301)."""

    name: str = Field(..., pattern=r"^([a-z0-9-]+\.)+[a-z]{2,}$")
    certificate_arn: str = Field(..., pattern=r"^arn:aws[a-z-]*:acm:[a-z0-9-]+:\d{12}:certificate/.+$")
    hosted_zone_id: str | None = Field(None, pattern=r"^Z[A-Z0-9]+$")


class DeployBudget(ConfigModel):
    """An AWS Budgets alarm on the month's cost."""

    monthly_usd: float = Field(..., gt=0)
    alert_at_percent: float = Field(80.0, gt=0, le=1000)
    emails: list[str] = Field(..., min_length=1)


class DeployCost(ConfigModel):
    """What the cost model assumes beyond the config: commitments and traffic (requests a month
    and their tokens, which also price a pool of ``engine: bedrock`` replicas)."""

    # How the instances are paid: on demand, or with a 1-year commitment (reserved instances,
    # or a compute savings plan).
    commitment: Literal["on_demand", "reserved_1yr", "savings_plan_1yr"] = "on_demand"
    hours_per_month: float = Field(730.0, gt=0, le=744)
    data_transfer_gb: float = Field(2000.0, ge=0, description="out to the internet per month")
    nat_gb: float = Field(100.0, ge=0, description="through the NAT gateways per month")
    requests_per_month: int | None = Field(None, ge=0)
    # Tokens of an average request: Bedrock bills both, at different prices; the output tokens
    # also measure what self-hosted instances are asked to generate.
    input_tokens_per_request: float = Field(500.0, ge=0)
    output_tokens_per_request: float = Field(200.0, gt=0)
    archive_gb: float = Field(50.0, ge=0, description="audit archive held")
    # Share of an hour a spot instance costs against on demand (AWS's historical ~70 % saving).
    spot_discount: float = Field(0.70, ge=0, lt=1)


class AwsDeploy(ConfigModel):
    """``deploy.aws``: one stack in one region and account."""

    region: str = Field("us-east-1", pattern=r"^[a-z]{2}(-gov)?-[a-z]+-\d$")
    account: str | None = Field(None, pattern=r"^\d{12}$")
    stack_name: str = Field("fortress", pattern=r"^[A-Za-z][A-Za-z0-9-]{0,127}$")
    vpc: DeployVpc = Field(default_factory=DeployVpc)
    gateway: DeployGateway = Field(default_factory=DeployGateway)
    postgres: DeployPostgres | None = None
    redis: DeployRedis | None = None
    archive: DeployArchive = Field(default_factory=DeployArchive)
    domain: DeployDomain | None = None
    alarm_emails: list[str] = Field(default_factory=list)
    budget: DeployBudget | None = None
    pools: dict[str, DeployPool] = Field(default_factory=dict)
    cost: DeployCost = Field(default_factory=DeployCost)

    @field_validator("pools")
    @classmethod
    def _pool_names(cls, v: dict[str, DeployPool]) -> dict[str, DeployPool]:
        import re

        for name in v:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"{name!r} is not a pool name")
        return v


class Deploy(ConfigModel):
    """``deploy:``: where and how the config runs outside this machine."""

    aws: AwsDeploy | None = None
