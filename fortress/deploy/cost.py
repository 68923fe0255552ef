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
  and the stack's secrets;
* Bedrock, per pool with ``engine: bedrock`` replicas (listed in ``deploy.aws.pools`` or not):
  per token, ``requests_per_month`` x ``input_tokens_per_request`` / ``output_tokens_per_request``
  at the model's on-demand prices, for the share of the pool's requests its Bedrock replicas
  take (by ``count`` among the replicas of the first tier the pool has; a Bedrock tier behind
  self-hosted ones takes none until they fail).

Each deployed pool's ``throughput_tokens_per_second`` can be given at estimate time instead
(``throughput``: a figure, or what ``bench/throughput.py`` measured), and says where it came from.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from fortress.config import BedrockReplicaConfig, FleetConfig, Tier
from fortress.config.base import TIER_ORDER
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
    "Throughput",
    "estimate",
    "off_hours_share",
    "read_throughput",
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
    instance_type: str  # "bedrock" for a pool billed per token
    instances: float  # running on average over the month
    instance_hours: float
    monthly_usd: float  # instances and volumes; Bedrock: its tokens
    usd_per_instance_hour: float | None  # what a running hour costs as billed (spot, commitment)
    # Instances: at full use of the throughput. Bedrock: a request's cost (its input tokens
    # included) per output token, so the two compare.
    usd_per_million_tokens: float | None
    throughput_tokens_per_second: float | None = None
    throughput_source: str | None = None  # the config, a figure given, or a bench file
    bedrock_model: str | None = None
    usd_per_request: float | None = None  # Bedrock: input_tokens and output_tokens_per_request
    requests_share: float | None = None  # Bedrock: of requests_per_month, billed here


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
    bedrock_usd: float = 0.0  # tokens billed by Bedrock
    requests_per_month: int | None = None
    usd_per_request: float | None = None
    utilisation: float | None = None  # requested tokens / what the running instances can give
    savings: tuple[Saving, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``fortress cost --json``)."""
        return asdict(self)


@dataclass(frozen=True)
class Throughput:
    """Output tokens per second one instance generates, and where the figure comes from."""

    tokens_per_second: float
    source: str


def read_throughput(spec: str) -> Throughput:
    """A throughput from a number (``250``) or a JSON file ``bench/throughput.py --json`` wrote
    (its ``tokens_per_second``; the source names the file, model, concurrency and date).

    Raises ``ValueError`` for anything else (a missing file, no positive ``tokens_per_second``).
    """
    try:
        value = float(spec)
    except ValueError:
        pass
    else:
        if not value > 0 or value == float("inf"):
            raise ValueError(f"a throughput must be a positive number of tokens per second, not {spec}")
        return Throughput(value, f"given: {value:g} tokens/s")
    try:
        doc = json.loads(Path(spec).read_text())
    except OSError as exc:
        raise ValueError(f"{spec} is neither a number nor a readable file: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{spec} is not JSON: {exc}") from None
    tps = doc.get("tokens_per_second") if isinstance(doc, dict) else None
    if isinstance(tps, bool) or not isinstance(tps, int | float) or not tps > 0:
        raise ValueError(f"{spec} has no positive tokens_per_second (bench/throughput.py --json writes one)")
    what = ", ".join(
        f"{k} {doc[k]}" for k in ("model", "concurrency", "measured_at") if doc.get(k) not in (None, "")
    )
    return Throughput(float(tps), f"measured: {spec}" + (f" ({what})" if what else ""))


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
    config: FortressConfig,
    prices: PriceTable,
    sc: _Scenario,
    throughput: Mapping[str, Throughput] | None = None,
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
        given = (throughput or {}).get(name)
        tps = given.tokens_per_second if given else dp.throughput_tokens_per_second
        source = given.source if given else ("throughput_tokens_per_second in the config" if tps else None)
        per_m = per_hour / (tps * 3600) * 1e6 if per_hour is not None and tps else None
        pools.append(
            PoolCost(
                name,
                dp.instance_type,
                inst_hours / hours,
                inst_hours,
                inst_usd + kept * vol,
                per_hour,
                per_m,
                throughput_tokens_per_second=tps,
                throughput_source=source,
            )
        )

    bedrock_items, bedrock_pools = _bedrock(config, prices, notes)
    items += bedrock_items
    pools += bedrock_pools
    items += _shared(config, aws, prices, notes)
    return items, pools, notes


def _bedrock(
    config: FortressConfig, prices: PriceTable, notes: list[str]
) -> tuple[list[LineItem], list[PoolCost]]:
    """The pools with ``engine: bedrock`` replicas, billed per token for the requests they take."""
    assert config.deploy.aws is not None
    cost = config.deploy.aws.cost
    requests = cost.requests_per_month
    items: list[LineItem] = []
    pools: list[PoolCost] = []
    priced: list[str] = []
    for pool in config.pools:
        name = _pool_name(pool)
        counts: dict[Tier, int] = {}
        for rc in pool.replicas:
            counts[rc.tier] = counts.get(rc.tier, 0) + int(getattr(rc, "count", 1))
        # The router sends a pool's requests to its first tier; the others take over on failure.
        serving = next((t for t in TIER_ORDER if counts.get(t)), None)
        by_model: dict[str, tuple[str, float]] = {}  # model -> (the id as configured, share)
        for rc in pool.replicas:
            if not isinstance(rc, BedrockReplicaConfig):
                continue
            model_id = rc.options.model_id
            model = prices.bedrock_1m_tokens(model_id)[0]
            share = rc.count / counts[rc.tier] if rc.tier == serving else 0.0
            prev = by_model.get(model, (model_id, 0.0))
            by_model[model] = (prev[0], prev[1] + share)
        for model, (model_id, share) in by_model.items():
            _, usd_in, usd_out = prices.bedrock_1m_tokens(model_id)
            per_request = (
                cost.input_tokens_per_request * usd_in + cost.output_tokens_per_request * usd_out
            ) / 1e6
            n = (requests or 0) * share
            m_in = n * cost.input_tokens_per_request / 1e6
            m_out = n * cost.output_tokens_per_request / 1e6
            where = f"{name}: {model}" + (f" ({share:.0%} of the requests)" if 0 < share < 1 else "")
            for kind, mtok, usd in (("input", m_in, usd_in), ("output", m_out, usd_out)):
                items.append(LineItem("Bedrock", f"{where}, {kind}", mtok, "1M tokens", usd, mtok * usd))
            pools.append(
                PoolCost(
                    name,
                    "bedrock",
                    0.0,
                    0.0,
                    m_in * usd_in + m_out * usd_out,
                    None,
                    per_request / cost.output_tokens_per_request * 1e6,
                    bedrock_model=model,
                    usd_per_request=per_request,
                    requests_share=share,
                )
            )
            if share == 0:
                notes.append(
                    f"{name}: Bedrock ({model}) is a failover tier here: $0 until it takes requests, "
                    f"then ${per_request:.5f} each"
                )
            else:
                priced.append(name)
    if priced and requests is None:
        notes.append(
            "Bedrock bills per token: set deploy.aws.cost.requests_per_month (and input_tokens_per_request, "
            "output_tokens_per_request) to price it"
        )
    if priced and len(config.pools) > 1:
        notes.append(
            f"Bedrock pool(s) {', '.join(sorted(set(priced)))} priced as taking all requests_per_month; "
            "the config's other pools share the same requests"
        )
    return items, pools


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


def estimate(
    config: FortressConfig, prices: PriceTable, throughput: Mapping[str | None, Throughput] | None = None
) -> Estimate:
    """The monthly cost of ``config``'s ``deploy.aws`` at ``prices``, with what it could save.

    ``throughput`` replaces pools' ``throughput_tokens_per_second``: by pool name, or under
    ``None`` for every pool ``deploy.aws.pools`` names. Raises ``ValueError`` when the config has
    no ``deploy.aws`` or a throughput names no deployed pool, ``PriceError`` when it names an
    instance type, database class, node type or Bedrock model the table does not price.
    """
    aws = config.deploy.aws
    if aws is None:
        raise ValueError("the config has no `deploy.aws` section: nothing to price")
    per_pool: dict[str, Throughput] = {}
    if throughput:
        if None in throughput and not aws.pools:
            raise ValueError(
                "a throughput prices deployed instances, and deploy.aws.pools names none "
                "(Bedrock is billed per token)"
            )
        for name in throughput:
            if name is not None and name not in aws.pools:
                known = ", ".join(sorted(aws.pools)) or "none"
                raise ValueError(
                    f"a throughput for pool {name!r}, which deploy.aws.pools does not name ({known})"
                )
        per_pool = {n: throughput[None] for n in aws.pools if None in throughput}
        per_pool |= {n: tp for n, tp in throughput.items() if n is not None}
    items, pools, notes = _priced(config, prices, _Scenario(), per_pool)
    total = sum(i.monthly_usd for i in items)
    instances = sum(i.monthly_usd for i in items if i.resource.startswith("EC2 "))
    bedrock = sum(i.monthly_usd for i in items if i.resource == "Bedrock")
    cost = aws.cost
    if aws.region != prices.region:
        notes.append(
            f"the prices are {prices.region}'s, the stack's region is {aws.region}: "
            f"run `fortress cost refresh --region {aws.region}` for its own"
        )
    if any(p.bedrock_model is None for p in pools):
        notes.append(
            "per-token cost of instances assumes full use: every running hour generates "
            "throughput_tokens_per_second"
        )
    notes.append(f"ALB LCUs ({ALB_LCUS:g}) and data transfer are estimates; traffic changes them")

    per_request = utilisation = None
    if cost.requests_per_month:
        per_request = total / cost.requests_per_month
        rated = [(p, p.throughput_tokens_per_second) for p in pools if p.bedrock_model is None]
        if all(tps for _, tps in rated) and rated:
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
        bedrock_usd=bedrock,
        requests_per_month=cost.requests_per_month,
        usd_per_request=per_request,
        utilisation=utilisation,
        savings=tuple(savings),
        notes=tuple(notes),
    )
