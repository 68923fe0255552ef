"""The AWS price table the cost model reads: bundled, dated, and refreshable.

The bundled table (``prices/aws-us-east-1.json``) is a snapshot of AWS's public on-demand list
prices in us-east-1 (Linux, shared tenancy) and Bedrock's on-demand prices per 1M input and
output tokens; it names its region, date and source, and the cost
model prints them beside every estimate. ``refresh_prices`` fetches current instance prices
through the AWS Price List API (``fortress cost refresh``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = [
    "BUNDLED",
    "PriceError",
    "PriceTable",
    "PricingUnavailable",
    "bedrock_model",
    "load_prices",
    "refresh_prices",
]

BUNDLED = "aws-us-east-1.json"

# The sections every table has; a file missing one is not a price table.
_SECTIONS = (
    "region",
    "date",
    "source",
    "ec2_hour",
    "ebs_gp3",
    "alb",
    "nat_gateway",
    "data_transfer_out_gb",
    "fargate",
    "rds_postgres_hour",
    "rds_gp3_gb_month",
    "elasticache_hour",
    "s3",
    "cloudwatch_alarm_month",
    "secret_month",
)


# A cross-region inference profile's id is the model's with a geography in front; it bills at the
# model's on-demand prices in the source region.
_PROFILE_PREFIXES = ("us-gov.", "us.", "eu.", "apac.", "jp.", "au.", "ca.", "global.")


def bedrock_model(model_id: str) -> str:
    """The foundation model behind a Bedrock id: ``us.anthropic.claude-3-5-haiku-20241022-v1:0``
    and ``arn:aws:bedrock:...:inference-profile/us.anthropic...`` or ``...:foundation-model/...``
    give ``anthropic.claude-3-5-haiku-20241022-v1:0``; a plain model id is itself."""
    model = model_id.rsplit("/", 1)[-1] if model_id.startswith("arn:") else model_id
    for prefix in _PROFILE_PREFIXES:
        if model.startswith(prefix):
            return model[len(prefix) :]
    return model


class PriceError(ValueError):
    """A price the table does not have (an instance type, a database class), or a bad table."""


class PricingUnavailable(RuntimeError):
    """The AWS Price List API cannot be asked: no credentials, no access, no answer."""


@dataclass(frozen=True)
class PriceTable:
    """A typed view of one price table (USD). ``raw`` is the JSON document as loaded."""

    region: str
    date: str
    source: str
    raw: Mapping[str, Any] = field(repr=False)

    def _lookup(self, section: str, key: str, what: str) -> float:
        table: Mapping[str, float] = self.raw[section]
        if key not in table:
            known = ", ".join(sorted(table))
            raise PriceError(
                f"{what} {key!r} is not in the price table ({self.region}, {self.date}); known: {known}. "
                f"Run `fortress cost refresh` to fetch current prices (then `fortress cost --prices FILE`)"
            )
        return float(table[key])

    def ec2_hour(self, instance_type: str) -> float:
        """On-demand $/hour of an EC2 instance type (Linux); PriceError when not in the table."""
        return self._lookup("ec2_hour", instance_type, "instance type")

    def rds_hour(self, instance_class: str) -> float:
        """Single-AZ $/hour of an RDS PostgreSQL instance class (Multi-AZ is twice this)."""
        return self._lookup("rds_postgres_hour", instance_class, "RDS instance class")

    def elasticache_hour(self, node_type: str) -> float:
        """$/hour of one ElastiCache (Redis) node."""
        return self._lookup("elasticache_hour", node_type, "ElastiCache node type")

    def price(self, section: str, key: str | None = None) -> float:
        """A flat price: ``price("data_transfer_out_gb")`` or ``price("alb", "hour")``."""
        value = self.raw[section] if key is None else self.raw[section][key]
        return float(value)

    def bedrock_1m_tokens(self, model_id: str) -> tuple[str, float, float]:
        """(the model, $ per 1M input tokens, $ per 1M output tokens) of a Bedrock model id,
        inference profile id (``us.anthropic...``) or ARN; PriceError when not in the table."""
        table: Mapping[str, Mapping[str, float]] = self.raw.get("bedrock_1m_tokens", {})
        model = bedrock_model(model_id)
        if model not in table:
            known = ", ".join(sorted(table)) or "none"
            raise PriceError(
                f"Bedrock model {model_id!r} is not in the price table ({self.region}, {self.date}); "
                f"known: {known}. Add its on-demand prices per 1M tokens to a copy of the table "
                f"(`bedrock_1m_tokens`) and use `fortress cost --prices FILE`"
            )
        return model, float(table[model]["input"]), float(table[model]["output"])

    @property
    def instance_types(self) -> list[str]:
        """The EC2 instance types the table prices."""
        return sorted(self.raw["ec2_hour"])


def load_prices(path: str | Path | None = None) -> PriceTable:
    """The price table at ``path`` (a JSON file ``refresh`` wrote), or the bundled one."""
    try:
        if path is None:
            text = resources.files("fortress.deploy").joinpath("prices", BUNDLED).read_text()
            where = f"the bundled {BUNDLED}"
        else:
            text = Path(path).read_text()
            where = str(path)
        raw = json.loads(text)
    except OSError as exc:
        raise PriceError(f"cannot read the price table {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise PriceError(f"{path} is not JSON: {exc}") from None
    missing = [s for s in _SECTIONS if not isinstance(raw, dict) or s not in raw]
    if missing:
        raise PriceError(f"{where} is not a price table: no {', '.join(missing)}")
    return PriceTable(region=str(raw["region"]), date=str(raw["date"]), source=str(raw["source"]), raw=raw)


# -- refresh ---------------------------------------------------------------------------------------

# The Price List API answers in these regions only; us-east-1 serves every region's prices.
_PRICING_REGION = "us-east-1"


def _on_demand_hour(product_json: str) -> float | None:
    """The hourly on-demand USD price in one Price List product document."""
    doc = json.loads(product_json)
    for term in doc.get("terms", {}).get("OnDemand", {}).values():
        for dim in term.get("priceDimensions", {}).values():
            usd = dim.get("pricePerUnit", {}).get("USD")
            if usd is not None and dim.get("unit", "Hrs").lower().startswith("hr") and float(usd) > 0:
                return float(usd)
    return None


def _ask(client: Any, service: str, filters: dict[str, str]) -> float | None:
    """The first positive on-demand hourly price the Price List API gives for ``filters``."""
    terms = [{"Type": "TERM_MATCH", "Field": k, "Value": v} for k, v in filters.items()]
    token: str | None = None
    while True:
        kwargs: dict[str, Any] = {"ServiceCode": service, "Filters": terms, "MaxResults": 100}
        if token:
            kwargs["NextToken"] = token
        page = client.get_products(**kwargs)
        for item in page.get("PriceList", []):
            hour = _on_demand_hour(item)
            if hour is not None:
                return hour
        token = page.get("NextToken")
        if not token:
            return None


def refresh_prices(
    base: PriceTable,
    *,
    region: str = "us-east-1",
    instance_types: Iterable[str] = (),
    session: Any = None,
    today: str | None = None,
) -> dict[str, Any]:
    """A new price table for ``region``: the hourly on-demand prices of the EC2 instance types
    (``base``'s and ``instance_types``), RDS PostgreSQL classes and ElastiCache node types,
    fetched with the Price List API (``pricing`` client in us-east-1, ``get_products``); the
    other prices (EBS, ALB, NAT, transfer, Fargate, S3, CloudWatch, Secrets Manager, Bedrock) are
    carried over from ``base`` and the table's ``source`` says so.

    ``session`` is a boto3 ``Session`` (default: a new one from the usual credential chain).
    Raises ``PricingUnavailable`` without credentials or when AWS refuses; ``PriceError`` when
    an instance type has no price in ``region``. The tests drive this with a stub session (moto
    has no Price List API): they do not show the filters' exact matching by AWS.
    """
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError

    session = session if session is not None else boto3.Session()
    if session.get_credentials() is None:
        raise PricingUnavailable(
            "no AWS credentials: the Price List API needs them (set AWS_PROFILE, or "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; the pricing:GetProducts permission is enough)"
        )
    client = session.client("pricing", region_name=_PRICING_REGION)
    raw: dict[str, Any] = json.loads(json.dumps(base.raw))  # a deep copy
    common = {"regionCode": region}
    ec2 = {
        **common,
        "operatingSystem": "Linux",
        "tenancy": "Shared",
        "preInstalledSw": "NA",
        "capacitystatus": "Used",
        "licenseModel": "No License required",
    }
    asks: list[tuple[str, str, str, dict[str, str]]] = [
        ("ec2_hour", t, "AmazonEC2", {**ec2, "instanceType": t})
        for t in sorted(set(base.raw["ec2_hour"]) | set(instance_types))
    ]
    asks += [
        (
            "rds_postgres_hour",
            c,
            "AmazonRDS",
            {**common, "instanceType": c, "databaseEngine": "PostgreSQL", "deploymentOption": "Single-AZ"},
        )
        for c in sorted(base.raw["rds_postgres_hour"])
    ]
    asks += [
        ("elasticache_hour", n, "AmazonElastiCache", {**common, "instanceType": n, "cacheEngine": "Redis"})
        for n in sorted(base.raw["elasticache_hour"])
    ]
    missing: list[str] = []
    try:
        for section, key, service, filters in asks:
            hour = _ask(client, service, filters)
            if hour is None:
                missing.append(key)
                raw[section].pop(key, None)  # a stale price for another region would mislead
            else:
                raw[section][key] = hour
    except (BotoCoreError, ClientError) as exc:
        raise PricingUnavailable(f"the AWS Price List API refused: {exc}") from None
    wanted_missing = [t for t in instance_types if t in missing]
    if wanted_missing:
        raise PriceError(f"no on-demand Linux price in {region} for: {', '.join(wanted_missing)}")
    date = today or datetime.now(UTC).date().isoformat()
    raw["region"] = region
    raw["date"] = date
    raw["source"] = (
        f"AWS Price List API (get_products), {region}, Linux on-demand, fetched {date}: EC2, RDS "
        f"PostgreSQL and ElastiCache hourly prices; other prices from the table of {base.date} "
        f"({base.region})"
    )
    return raw
