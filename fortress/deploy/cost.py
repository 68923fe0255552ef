"""The monthly AWS cost of a config's ``deploy.aws``, line by line, and what it could save.

Pure: ``estimate(config, prices)`` reads the config and a price table, nothing else. What is
priced, and from which keys:

* model servers, per pool ``deploy.aws.pools`` names: a pool's ``engine: vllm`` replicas run one
  instance each (``count``); tiers ``primary`` and ``secondary`` run all month, ``standby`` is
  cold (0 hours) but keeps its model-cache volume, so a start takes minutes, not a download. A
  pool with ``fleet: {provider: aws}`` runs the baseline its bounds give over a representative
  week (``min_replicas``, and its schedules through ``fleet.schedule.bounds_at``; a pool with
  ``min_replicas: 0`` and no ``idle_to_zero`` keeps one replica while it is not scheduled off),
  on its first capacity type (spot at ``1 - spot_discount`` of on demand, at most
  ``spot_max_price``); what load adds above the baseline is not known here;
* one gp3 volume per running or kept instance (size, IOPS above 3,000, MB/s above 125);
* ``commitment``: reserved 1 year (-40 %) or a compute savings plan (-30 %) on on-demand hours;
* the gateway's Fargate tasks (``min_tasks`` x cpu/memory), the ALB (with ``ALB_LCUS`` LCUs),
  NAT gateways and ``nat_gb``, ``data_transfer_gb`` out, Postgres (twice for Multi-AZ), Redis
  (1 + replicas nodes), the archive bucket (``archive_gb``), a CloudWatch alarm per alarm rule,
  and the stack's secrets.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from fortress.config import FleetConfig
from fortress.config.deploy import AwsDeploy, DeployPool, DeployVolume
from fortress.config.loader import FortressConfig
from fortress.deploy.pricing import PriceTable
from fortress.fleet.schedule import bounds_at

__all__ = [
    "ALB_LCUS",
    "COMMITMENT_DISCOUNT",
    "Estimate",
    "LineItem",
    "PoolCost",
    "Saving",
    "estimate",
    "off_hours_share",
    "running_share",
    "volume_month",
]

# LCUs the ALB is assumed to use each hour: an LLM gateway has few, long requests, so new
# connections and rule evaluations stay low; 2 covers ~2 GB/h processed (an estimate).
ALB_LCUS = 2.0
# Instance discounts of the 1-year commitments, on the hours billed on demand.
COMMITMENT_DISCOUNT: dict[str, float] = {"on_demand": 0.0, "reserved_1yr": 0.40, "savings_plan_1yr": 0.30}
# The representative week: Monday 2024-01-01 00:00 UTC, sampled every 15 minutes (a schedule at
# :30 counts as well as one on the hour). January: no daylight-saving change inside it.
WEEK_START = datetime(2024, 1, 1, tzinfo=UTC)
STEP = timedelta(minutes=15)
SAMPLES = 7 * 24 * 4
# The scheduled scale-down the savings price: off 20:00-07:00 on weekdays and all weekend (UTC).
OFF_HOURS_CRON = ("0 20 * * 1-5", "0 7 * * 1-5")

Capacity = Literal["on_demand", "spot", "cold"]


@dataclass(frozen=True)
class LineItem:
    """One priced resource: ``quantity`` of ``unit`` at ``unit_usd`` each is ``monthly_usd``."""

    resource: str
    what: str
    quantity: float
    unit: str
    unit_usd: float
    monthly_usd: float


@dataclass(frozen=True)
class PoolCost:
    """A deployed pool's instances: how many run on average, their cost, and per token."""

    pool: str
    instance_type: str
    instances: float  # running on average over the month
    instance_hours: float
    monthly_usd: float  # instances and volumes
    usd_per_instance_hour: float | None  # what a running hour costs as billed (spot, commitment)
    usd_per_million_tokens: float | None  # at full use of throughput_tokens_per_second


@dataclass(frozen=True)
class Saving:
    """The same config, changed one way: its monthly total and what it saves."""

    name: str
    what: str
    monthly_usd: float
    saves_usd: float


@dataclass(frozen=True)
class Estimate:
    """The monthly cost of one config: line items, totals, per-token and per-request, savings."""

    region: str
    prices_region: str
    prices_date: str
    prices_source: str
    commitment: str
    hours_per_month: float
    items: tuple[LineItem, ...]
    pools: tuple[PoolCost, ...]
    total_usd: float
    instances_usd: float  # the model servers' instances (no volumes)
    requests_per_month: int | None = None
    usd_per_request: float | None = None
    utilisation: float | None = None  # requested tokens / what the running instances can give
    savings: tuple[Saving, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``fortress cost --json``)."""
        return asdict(self)


@dataclass(frozen=True)
class _Scenario:
    spot_tiers: frozenset[str] = frozenset()
    commitment: str | None = None
    off_hours: bool = False


def volume_month(volume: DeployVolume, prices: PriceTable) -> float:
    """$/month of one gp3 volume: size, plus IOPS and throughput above what gp3 includes."""
    gp3 = prices.raw["ebs_gp3"]
    return (
        volume.size_gb * float(gp3["gb_month"])
        + max(0, volume.iops - int(gp3["iops_included"])) * float(gp3["iops_month"])
        + max(0, volume.throughput - int(gp3["mbps_included"])) * float(gp3["mbps_month"])
    )


def _week() -> list[datetime]:
    return [WEEK_START + i * STEP for i in range(SAMPLES)]


def _running(fleet: FleetConfig, now: datetime) -> tuple[int, int]:
    """(baseline running, most allowed) at ``now``: min 0 without idle_to_zero keeps one."""
    b = bounds_at(fleet, now)
    if b.min > 0:
        return b.min, b.max
    return (1 if b.max > 0 and fleet.idle_to_zero is None else 0), b.max


@functools.cache
def _off_hours_mask() -> tuple[bool, ...]:
    from fortress.config import FleetSchedule

    mask = FleetConfig(
        min_replicas=1,
        max_replicas=1,
        schedules=[
            FleetSchedule(name="off", cron=OFF_HOURS_CRON[0], min_replicas=0, max_replicas=0),
            FleetSchedule(name="on", cron=OFF_HOURS_CRON[1], min_replicas=1, max_replicas=1),
        ],
    )
    return tuple(bounds_at(mask, t).max > 0 for t in _week())


def off_hours_share() -> float:
    """The share of a week the scheduled scale-down leaves running (65 of 168 hours)."""
    mask = _off_hours_mask()
    return sum(mask) / len(mask)


def running_share(fleet: FleetConfig, *, off_hours: bool = False) -> tuple[float, float]:
    """(baseline, ceiling) instances a fleet runs on average over the representative week, by
    its min_replicas and schedules; ``off_hours``: also stopped at night and on weekends."""
    mask = _off_hours_mask() if off_hours else (True,) * SAMPLES
    lo = hi = 0
    for t, on in zip(_week(), mask, strict=True):
        if on:
            base, most = _running(fleet, t)
            lo += base
            hi += most
    return lo / SAMPLES, hi / SAMPLES


def _hourly(
    dp: DeployPool, prices: PriceTable, capacity: Capacity, commitment: str, spot_discount: float
) -> float:
    od = prices.ec2_hour(dp.instance_type)
    if capacity == "spot":
        spot = od * (1 - spot_discount)
        return min(spot, dp.spot_max_price) if dp.spot_max_price is not None else spot
    if capacity == "cold":
        return 0.0
    return od * (1 - COMMITMENT_DISCOUNT[commitment])


def _pool_name(pool: Any) -> str:
    return str(pool.name or pool.model or "default")


def _priced(
    config: FortressConfig, prices: PriceTable, sc: _Scenario
) -> tuple[list[LineItem], list[PoolCost], list[str]]:
    aws = config.deploy.aws
    assert aws is not None
    cost = aws.cost
    hours = cost.hours_per_month
    commitment = sc.commitment or cost.commitment
    items: list[LineItem] = []
    pools: list[PoolCost] = []
    notes: list[str] = []
    by_name = {_pool_name(p): p for p in config.pools}
    on_share = off_hours_share() if sc.off_hours else 1.0
    paid = {
        "on_demand": "on demand",
        "reserved_1yr": "reserved 1 yr",
        "savings_plan_1yr": "savings plan 1 yr",
    }

    for name, dp in aws.pools.items():
        pool = by_name[name]
        vol = volume_month(dp.volume, prices)
        # (what, instances, share of the month running, capacity)
        groups: list[tuple[str, float, float, Capacity]] = []
        if pool.fleet is not None and pool.fleet.provider == "aws":
            base, ceiling = running_share(pool.fleet, off_hours=sc.off_hours)
            first = pool.fleet.capacity_order[0]
            capacity: Capacity = "spot" if first == "spot" else "on_demand"
            groups.append((f"{name} fleet ({first} first), baseline", base, 1.0, capacity))
            if ceiling > base:
                peak = ceiling * hours * prices.ec2_hour(dp.instance_type)
                notes.append(
                    f"{name}: a fleet between {pool.fleet.min_replicas} and {pool.fleet.max_replicas} "
                    f"replicas; priced at its baseline ({base:.2f} instances on average); at its "
                    f"scheduled maximum all month the instances would cost ${peak:,.0f} on demand"
                )
            kept = base  # a fleet's scaled-in instances terminate with their volumes
        else:
            counts: dict[str, int] = {}
            for rc in pool.replicas:
                if rc.engine == "vllm":
                    tier = str(rc.tier)
                    counts[tier] = counts.get(tier, 0) + int(getattr(rc, "count", 1))
            for tier, n in counts.items():
                if tier == "standby":
                    groups.append((f"{name} {tier}", n, 0.0, "cold"))
                else:
                    cap: Capacity = "spot" if tier in sc.spot_tiers else "on_demand"
                    groups.append((f"{name} {tier}", n, on_share, cap))
            kept = float(sum(counts.values()))  # volumes stay, also while stopped or cold
        inst_usd = inst_hours = 0.0
        for what, n, share, cap in groups:
            rate = _hourly(dp, prices, cap, commitment, cost.spot_discount)
            h = n * share * hours
            usd = h * rate
            label = {"cold": "cold, 0 h", "spot": "spot", "on_demand": paid[commitment]}[cap]
            if sc.off_hours and cap != "cold":
                label += ", off nights and weekends"
            items.append(
                LineItem(f"EC2 {dp.instance_type}", f"{what}: {label}", h, "instance-hour", rate, usd)
            )
            inst_usd += usd
            inst_hours += h
        items.append(
            LineItem(
                "EBS gp3",
                f"{name}: {dp.volume.size_gb} GB, {dp.volume.iops} IOPS, {dp.volume.throughput} MB/s",
                kept,
                "volume-month",
                vol,
                kept * vol,
            )
        )
        per_hour = inst_usd / inst_hours if inst_hours else None
        per_m = (
            per_hour / (dp.throughput_tokens_per_second * 3600) * 1e6
            if per_hour is not None and dp.throughput_tokens_per_second
            else None
        )
        pools.append(
            PoolCost(
                name, dp.instance_type, inst_hours / hours, inst_hours, inst_usd + kept * vol, per_hour, per_m
            )
        )

    items += _shared(config, aws, prices, notes)
    return items, pools, notes


def _shared(config: FortressConfig, aws: AwsDeploy, prices: PriceTable, notes: list[str]) -> list[LineItem]:
    """Everything but the model servers: gateway, network, state, archive, alarms, secrets."""
    cost = aws.cost
    hours = cost.hours_per_month
    items: list[LineItem] = []
    gw = aws.gateway
    vcpu, gb = gw.cpu / 1024, gw.memory / 1024
    task_hour = vcpu * prices.price("fargate", "vcpu_hour") + gb * prices.price("fargate", "gb_hour")
    items.append(
        LineItem(
            "Fargate",
            f"gateway: {gw.min_tasks} tasks x {vcpu:g} vCPU / {gb:g} GB (min_tasks)",
            gw.min_tasks * hours,
            "task-hour",
            task_hour,
            gw.min_tasks * hours * task_hour,
        )
    )
    alb_hour = prices.price("alb", "hour")
    items.append(LineItem("ALB", "load balancer hours", hours, "hour", alb_hour, hours * alb_hour))
    lcu = prices.price("alb", "lcu_hour")
    items.append(
        LineItem(
            "ALB", f"LCUs (assumed {ALB_LCUS:g})", ALB_LCUS * hours, "LCU-hour", lcu, ALB_LCUS * hours * lcu
        )
    )
    if aws.vpc.id is None:
        n = aws.vpc.nat_gateways
        if n:
            nat_h = prices.price("nat_gateway", "hour")
            items.append(
                LineItem("NAT gateway", f"{n} gateway(s)", n * hours, "hour", nat_h, n * hours * nat_h)
            )
            nat_gb = prices.price("nat_gateway", "gb")
            items.append(
                LineItem(
                    "NAT gateway", "data processed (nat_gb)", cost.nat_gb, "GB", nat_gb, cost.nat_gb * nat_gb
                )
            )
    else:
        notes.append(f"an existing VPC ({aws.vpc.id}): its NAT gateways are not priced here")
    out = prices.price("data_transfer_out_gb")
    items.append(
        LineItem(
            "Data transfer",
            "out to the internet (data_transfer_gb)",
            cost.data_transfer_gb,
            "GB",
            out,
            cost.data_transfer_gb * out,
        )
    )
    if aws.postgres is not None:
        pg = aws.postgres
        az = 2 if pg.ha else 1
        rate = prices.rds_hour(pg.instance_class) * az
        multi = "Multi-AZ" if pg.ha else "single-AZ"
        items.append(
            LineItem("RDS PostgreSQL", f"{pg.instance_class}, {multi}", hours, "hour", rate, hours * rate)
        )
        gb_month = prices.price("rds_gp3_gb_month") * az
        items.append(
            LineItem(
                "RDS storage",
                f"{pg.storage_gb} GB gp3, {multi}",
                pg.storage_gb,
                "GB-month",
                gb_month,
                pg.storage_gb * gb_month,
            )
        )
    if aws.redis is not None:
        nodes = 1 + aws.redis.replicas
        rate = prices.elasticache_hour(aws.redis.node_type)
        items.append(
            LineItem(
                "ElastiCache Redis",
                f"{nodes} x {aws.redis.node_type} (1 + {aws.redis.replicas} replicas)",
                nodes * hours,
                "node-hour",
                rate,
                nodes * hours * rate,
            )
        )
    # The archive moves to Glacier after glacier_after_days: the share of what it holds that is
    # younger than that stays in Standard (retention: expire_after_days, else a year).
    arch = aws.archive
    span = arch.expire_after_days or 365
    young = min(1.0, arch.glacier_after_days / span) * cost.archive_gb
    std, glacier = prices.price("s3", "standard_gb_month"), prices.price("s3", "glacier_gb_month")
    items.append(LineItem("S3 archive", "Standard (recent audit)", young, "GB-month", std, young * std))
    old = cost.archive_gb - young
    items.append(LineItem("S3 archive", "Glacier (older audit)", old, "GB-month", glacier, old * glacier))
    alarms = config.observe.alarms
    n_alarms = len(alarms.rules) if config.observe.enabled and alarms.enabled else 0
    a = prices.price("cloudwatch_alarm_month")
    items.append(
        LineItem("CloudWatch", "alarms (one per alarm rule)", n_alarms, "alarm-month", a, n_alarms * a)
    )
    # The server secret and the admin token, plus the database's and Redis's credentials.
    n_secrets = 2 + (aws.postgres is not None) + (aws.redis is not None)
    s = prices.price("secret_month")
    items.append(LineItem("Secrets Manager", "gateway secrets", n_secrets, "secret-month", s, n_secrets * s))
    return items


def estimate(config: FortressConfig, prices: PriceTable) -> Estimate:
    """The monthly cost of ``config``'s ``deploy.aws`` at ``prices``, with what it could save.

    Raises ``ValueError`` when the config has no ``deploy.aws``, ``PriceError`` when it names an
    instance type, database class or node type the table does not price.
    """
    aws = config.deploy.aws
    if aws is None:
        raise ValueError("the config has no `deploy.aws` section: nothing to price")
    items, pools, notes = _priced(config, prices, _Scenario())
    total = sum(i.monthly_usd for i in items)
    instances = sum(i.monthly_usd for i in items if i.resource.startswith("EC2 "))
    cost = aws.cost
    if aws.region != prices.region:
        notes.append(
            f"the prices are {prices.region}'s, the stack's region is {aws.region}: "
            f"run `fortress cost refresh --region {aws.region}` for its own"
        )
    notes.append("per-token cost assumes full use: every running hour generates throughput_tokens_per_second")
    notes.append(f"ALB LCUs ({ALB_LCUS:g}) and data transfer are estimates; traffic changes them")

    per_request = utilisation = None
    if cost.requests_per_month:
        per_request = total / cost.requests_per_month
        rated = [(p, aws.pools[p.pool].throughput_tokens_per_second) for p in pools]
        if all(tps for _, tps in rated) and pools:
            capacity = sum(p.instance_hours * 3600 * (tps or 0) for p, tps in rated)
            wanted = cost.requests_per_month * cost.output_tokens_per_request
            utilisation = wanted / capacity if capacity else None
            if utilisation is not None and utilisation > 1:
                notes.append(
                    f"the requests ask {utilisation:.0%} of what the running instances generate at full use"
                )

    savings: list[Saving] = []

    def option(name: str, what: str, sc: _Scenario) -> None:
        its, _, _ = _priced(config, prices, sc)
        monthly = sum(i.monthly_usd for i in its)
        if total - monthly > 0.005:
            savings.append(Saving(name, what, monthly, total - monthly))

    has_secondary = any(
        str(rc.tier) == "secondary" and rc.engine == "vllm"
        for name in aws.pools
        for p in config.pools
        if _pool_name(p) == name
        for rc in p.replicas
    )
    if has_secondary:
        option(
            "spot_secondary",
            f"the secondary tier on spot (-{cost.spot_discount:.0%} of on demand)",
            _Scenario(spot_tiers=frozenset({"secondary"})),
        )
    for c, what in (
        ("reserved_1yr", "1-year reserved instances"),
        ("savings_plan_1yr", "1-year savings plan"),
    ):
        if c != cost.commitment:
            option(
                c,
                f"{what} (-{COMMITMENT_DISCOUNT[c]:.0%} on on-demand instance hours)",
                _Scenario(commitment=c),
            )
    option(
        "scheduled_scale_down",
        "the model servers off 20:00-07:00 UTC on weekdays and all weekend "
        f"({off_hours_share():.0%} of the week running)",
        _Scenario(off_hours=True),
    )
    return Estimate(
        region=aws.region,
        prices_region=prices.region,
        prices_date=prices.date,
        prices_source=prices.source,
        commitment=cost.commitment,
        hours_per_month=cost.hours_per_month,
        items=tuple(items),
        pools=tuple(pools),
        total_usd=total,
        instances_usd=instances,
        requests_per_month=cost.requests_per_month,
        usd_per_request=per_request,
        utilisation=utilisation,
        savings=tuple(savings),
        notes=tuple(notes),
    )
