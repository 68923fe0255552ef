"""The cost model: the price table, the estimate of the seed's topologies and of fleets with spot
and schedules, the savings, and ``fortress cost`` / ``fortress cost refresh``.

Every expectation is computed from the bundled price table's own values, so a refreshed table
keeps these tests meaningful; the seed's figures ($12,000 single, $24,000 HA) are checked within
5 %.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fortress.cli.main import app
from fortress.config import load_config, parse_config
from fortress.config.deploy import DeployVolume
from fortress.deploy.cost import (
    COMMITMENT_DISCOUNT,
    Estimate,
    Throughput,
    estimate,
    read_throughput,
    volume_month,
)
from fortress.deploy.pricing import PriceError, PricingUnavailable, load_prices, refresh_prices

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PRICES = load_prices()
TABLE: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parent.parent / "fortress/deploy/prices/aws-us-east-1.json").read_text()
)
OFF_HOURS_SHARE = 65 / 168  # 07:00-20:00 on five weekdays


def _lines(est: Estimate, resource: str) -> list[Any]:
    return [i for i in est.items if i.resource == resource]


def _saving(est: Estimate, name: str) -> float:
    found = [s for s in est.savings if s.name == name]
    assert found, f"no saving {name!r} in {[s.name for s in est.savings]}"
    return found[0].saves_usd


def _fleet_config(fleet: str, deploy_pool: str = "", cost: str = "") -> Any:
    """A config with one pool ``chat`` on an aws fleet (g5.2xlarge)."""
    return parse_config(
        f"""
pools:
  - model: chat
    fleet:
      provider: aws
      aws: {{groups: {{spot: chat-spot, on-demand: chat-od}}}}
{fleet}
deploy:
  aws:
    pools:
      chat:
        instance_type: g5.2xlarge
        vllm: {{model: Qwen/Qwen2.5-7B-Instruct}}
        volume: {{size_gb: 200}}
{deploy_pool}
    cost:
      data_transfer_gb: 100
{cost}
""",
        env={},
    )


# -- the price table ---------------------------------------------------------------------------------


def test_the_bundled_table_names_its_region_date_and_source_and_has_the_seed_prices() -> None:
    assert PRICES.region == "us-east-1"
    assert PRICES.date and "price list" in PRICES.source.lower()
    assert PRICES.ec2_hour("g5.48xlarge") == 16.288  # the seed's figure
    for t in ("g5.xlarge", "g5.2xlarge", "g5.12xlarge", "g6e.2xlarge", "g4dn.xlarge", "p4d.24xlarge"):
        assert PRICES.ec2_hour(t) > 0
    assert PRICES.price("ebs_gp3", "gb_month") == 0.08
    assert PRICES.price("fargate", "vcpu_hour") == 0.04048
    assert PRICES.rds_hour("db.t4g.medium") > 0 and PRICES.elasticache_hour("cache.t4g.small") > 0


def test_an_unknown_instance_type_names_the_known_ones_and_the_refresh() -> None:
    with pytest.raises(PriceError) as exc:
        PRICES.ec2_hour("x9.huge")
    assert "x9.huge" in str(exc.value) and "g5.48xlarge" in str(exc.value)
    assert "fortress cost refresh" in str(exc.value)


def test_a_file_that_is_not_a_price_table_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "p.json"
    bad.write_text('{"region": "us-east-1"}')
    with pytest.raises(PriceError, match="not a price table"):
        load_prices(bad)
    with pytest.raises(PriceError, match="cannot read"):
        load_prices(tmp_path / "missing.json")


def test_gp3_volume_pays_iops_and_throughput_above_what_is_included() -> None:
    cfg = load_config(EXAMPLES / "aws-always-on.yaml")
    assert cfg.deploy.aws is not None
    vol = cfg.deploy.aws.pools["qwen2.5-72b"].volume
    gp3 = TABLE["ebs_gp3"]
    expected = (
        500 * gp3["gb_month"]
        + (16000 - gp3["iops_included"]) * gp3["iops_month"]
        + (1000 - gp3["mbps_included"]) * gp3["mbps_month"]
    )
    assert volume_month(vol, PRICES) == pytest.approx(expected)


# -- the seed's topologies ----------------------------------------------------------------------------


def test_single_always_on_costs_about_12000_a_month() -> None:
    est = estimate(load_config(EXAMPLES / "aws-always-on.yaml"), PRICES)
    od = TABLE["ec2_hour"]["g5.48xlarge"]
    (ec2,) = _lines(est, "EC2 g5.48xlarge")
    assert ec2.quantity == 730 and ec2.monthly_usd == pytest.approx(730 * od)
    (ebs,) = _lines(est, "EBS gp3")
    assert ebs.quantity == 1
    assert est.instances_usd == pytest.approx(730 * od)
    assert est.total_usd == pytest.approx(sum(i.monthly_usd for i in est.items))
    assert abs(est.total_usd - 12_000) <= 0.05 * 12_000, est.total_usd
    (pool,) = est.pools
    assert pool.usd_per_million_tokens == pytest.approx(od / (400 * 3600) * 1e6)
    assert not _lines(est, "RDS PostgreSQL")  # no postgres in the single example


def test_ha_runs_primary_and_secondary_and_keeps_the_cold_spare_volume() -> None:
    est = estimate(load_config(EXAMPLES / "aws-always-on-ha.yaml"), PRICES)
    od = TABLE["ec2_hour"]["g5.48xlarge"]
    by_tier = {i.what.split(":")[0].split()[-1]: i for i in _lines(est, "EC2 g5.48xlarge")}
    assert by_tier["primary"].monthly_usd == pytest.approx(730 * od)
    assert by_tier["secondary"].monthly_usd == pytest.approx(730 * od)
    assert by_tier["standby"].quantity == 0 and by_tier["standby"].monthly_usd == 0
    (ebs,) = _lines(est, "EBS gp3")
    assert ebs.quantity == 3  # the cold spare keeps its model cache
    (rds,) = _lines(est, "RDS PostgreSQL")
    assert rds.monthly_usd == pytest.approx(730 * 2 * TABLE["rds_postgres_hour"]["db.t4g.medium"])
    assert abs(est.total_usd - 24_000) <= 0.05 * 24_000, est.total_usd


def test_ha_savings_are_computed_from_the_config() -> None:
    est = estimate(load_config(EXAMPLES / "aws-always-on-ha.yaml"), PRICES)
    od = TABLE["ec2_hour"]["g5.48xlarge"]
    two = 2 * 730 * od
    assert _saving(est, "spot_secondary") == pytest.approx(730 * od * 0.70)
    assert _saving(est, "reserved_1yr") == pytest.approx(two * 0.40)
    assert _saving(est, "savings_plan_1yr") == pytest.approx(two * 0.30)
    assert _saving(est, "scheduled_scale_down") == pytest.approx(two * (1 - OFF_HOURS_SHARE))
    single = estimate(load_config(EXAMPLES / "aws-always-on.yaml"), PRICES)
    assert "spot_secondary" not in {s.name for s in single.savings}  # nothing to put on spot


def test_a_commitment_discounts_the_instances_and_is_not_offered_again() -> None:
    text = (
        (EXAMPLES / "aws-always-on.yaml")
        .read_text()
        .replace("data_transfer_gb: 2000", "data_transfer_gb: 2000\n      commitment: reserved_1yr")
    )
    est = estimate(parse_config(text, env={}), PRICES)
    (ec2,) = _lines(est, "EC2 g5.48xlarge")
    assert ec2.monthly_usd == pytest.approx(730 * TABLE["ec2_hour"]["g5.48xlarge"] * 0.60)
    assert COMMITMENT_DISCOUNT["reserved_1yr"] == 0.40
    names = {s.name for s in est.savings}
    assert "reserved_1yr" not in names and "savings_plan_1yr" not in names  # -30 % saves nothing on -40 %


# -- fleets: baseline, schedules, spot ------------------------------------------------------------------


def test_a_fleet_runs_its_min_replicas_all_month_on_demand() -> None:
    est = estimate(
        _fleet_config("      min_replicas: 2\n      max_replicas: 4\n      capacity: [on-demand]"), PRICES
    )
    (ec2,) = _lines(est, "EC2 g5.2xlarge")
    assert ec2.quantity == pytest.approx(2 * 730)
    assert ec2.monthly_usd == pytest.approx(2 * 730 * TABLE["ec2_hour"]["g5.2xlarge"])
    (ebs,) = _lines(est, "EBS gp3")
    assert ebs.quantity == pytest.approx(2)
    assert any("between 2 and 4" in n for n in est.notes)  # the ceiling is said, not priced


def test_spot_first_is_priced_at_the_spot_discount_and_capped_by_the_max_price() -> None:
    od = TABLE["ec2_hour"]["g5.2xlarge"]
    fleet = "      min_replicas: 1\n      max_replicas: 2"
    est = estimate(_fleet_config(fleet), PRICES)
    (ec2,) = _lines(est, "EC2 g5.2xlarge")
    assert ec2.unit_usd == pytest.approx(od * (1 - 0.70))
    capped = estimate(_fleet_config(fleet, "        spot_max_price: 0.25"), PRICES)
    (ec2,) = _lines(capped, "EC2 g5.2xlarge")
    assert ec2.unit_usd == pytest.approx(min(0.25, od * 0.30))
    assert ec2.unit_usd == 0.25  # below 30 % of on demand: the cap applies
    on_demand = estimate(_fleet_config(fleet + "\n      capacity: [on-demand, spot]"), PRICES)
    assert on_demand.total_usd - est.total_usd == pytest.approx(730 * od * 0.70)
    # a commitment discounts on-demand hours only, never spot
    reserved = estimate(_fleet_config(fleet, cost="      commitment: reserved_1yr"), PRICES)
    assert reserved.total_usd == pytest.approx(est.total_usd)


def test_schedules_reduce_the_hours_by_the_time_they_hold_the_pool_at_zero() -> None:
    od = TABLE["ec2_hour"]["g5.2xlarge"]
    always = "      min_replicas: 1\n      max_replicas: 2\n      capacity: [on-demand]"
    scheduled = (
        always
        + """
      schedules:
        - {name: night, cron: "0 20 * * 1-5", min_replicas: 0, max_replicas: 0}
        - {name: day, cron: "0 7 * * 1-5", min_replicas: 1}"""
    )
    full = estimate(_fleet_config(always), PRICES)
    part = estimate(_fleet_config(scheduled), PRICES)
    (ec2,) = _lines(part, "EC2 g5.2xlarge")
    assert ec2.quantity == pytest.approx(730 * OFF_HOURS_SHARE)
    vol = volume_month(DeployVolume(size_gb=200), PRICES)
    saved_volumes = vol * (1 - OFF_HOURS_SHARE)  # scaled-in instances take their volumes along
    assert full.total_usd - part.total_usd == pytest.approx(730 * od * (1 - OFF_HOURS_SHARE) + saved_volumes)
    # A daytime scale-up of the minimum (the seed chatbot's 15:00 up, 06:00 down) adds hours.
    busy = always + (
        '\n      schedules:\n        - {cron: "0 15 * * *", min_replicas: 2}\n'
        '        - {cron: "0 6 * * *", min_replicas: 1}'
    )
    more = estimate(_fleet_config(busy), PRICES)
    (ec2,) = _lines(more, "EC2 g5.2xlarge")
    assert ec2.quantity == pytest.approx(730 * (1 + 15 / 24))  # 2 from 15:00 to 06:00


def test_a_fleet_that_sleeps_when_idle_has_no_baseline() -> None:
    est = estimate(
        _fleet_config("      min_replicas: 0\n      max_replicas: 2\n      idle_to_zero: 10m"), PRICES
    )
    (ec2,) = _lines(est, "EC2 g5.2xlarge")
    assert ec2.quantity == 0
    # without idle_to_zero, min 0 keeps one replica
    est = estimate(_fleet_config("      min_replicas: 0\n      max_replicas: 2"), PRICES)
    (ec2,) = _lines(est, "EC2 g5.2xlarge")
    assert ec2.quantity == pytest.approx(730)


def test_shared_resources_follow_their_keys() -> None:
    cfg = _fleet_config(
        "      min_replicas: 1",
        cost="      nat_gb: 1000\n      requests_per_month: 1000000\n      output_tokens_per_request: 100",
    )
    base = estimate(cfg, PRICES)
    (fargate,) = _lines(base, "Fargate")
    f = TABLE["fargate"]
    assert fargate.monthly_usd == pytest.approx(2 * 730 * (0.5 * f["vcpu_hour"] + 1 * f["gb_hour"]))
    nat = {i.unit: i.monthly_usd for i in _lines(base, "NAT gateway")}
    assert nat["GB"] == pytest.approx(1000 * TABLE["nat_gateway"]["gb"])
    assert nat["hour"] == pytest.approx(730 * TABLE["nat_gateway"]["hour"])
    (transfer,) = _lines(base, "Data transfer")
    assert transfer.monthly_usd == pytest.approx(100 * TABLE["data_transfer_out_gb"])
    assert base.usd_per_request == pytest.approx(base.total_usd / 1_000_000)
    assert base.utilisation is None  # no throughput given: nothing to compare with
    text = cfg.model_dump(mode="json", exclude_none=True)
    text["deploy"]["aws"]["redis"] = {"node_type": "cache.t4g.small", "replicas": 2}
    text["deploy"]["aws"]["pools"]["chat"]["throughput_tokens_per_second"] = 50
    est = estimate(parse_config(json.dumps(text), env={}), PRICES)
    (redis,) = _lines(est, "ElastiCache Redis")
    assert redis.quantity == 3 * 730
    assert redis.monthly_usd == pytest.approx(3 * 730 * TABLE["elasticache_hour"]["cache.t4g.small"])
    assert est.utilisation == pytest.approx(1_000_000 * 100 / (730 * 3600 * 50))


# -- the CLI ----------------------------------------------------------------------------------------


def test_cost_json_matches_the_estimate() -> None:
    result = CliRunner().invoke(app, ["cost", "-c", str(EXAMPLES / "aws-always-on-ha.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    est = estimate(load_config(EXAMPLES / "aws-always-on-ha.yaml"), PRICES)
    assert data["total_usd"] == pytest.approx(est.total_usd)
    assert data["prices_region"] == "us-east-1" and data["prices_date"] == PRICES.date
    assert {s["name"] for s in data["savings"]} >= {"spot_secondary", "reserved_1yr", "scheduled_scale_down"}


def test_cost_table_prints_lines_total_and_the_price_source() -> None:
    result = CliRunner().invoke(app, ["cost", "-c", str(EXAMPLES / "aws-always-on.yaml")])
    assert result.exit_code == 0, result.output
    est = estimate(load_config(EXAMPLES / "aws-always-on.yaml"), PRICES)
    assert f"${est.total_usd:,.0f}" in result.stdout
    assert "EC2 g5.48xlarge" in result.stdout and "EBS gp3" in result.stdout
    assert f"prices: us-east-1, {PRICES.date}" in result.stdout


def test_cost_without_deploy_section_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "fortress.yaml"
    path.write_text("pools: []\n")
    result = CliRunner().invoke(app, ["cost", "-c", str(path)])
    assert result.exit_code == 2
    assert "no `deploy.aws` section" in result.output
    assert "Traceback" not in result.output


def test_cost_with_an_unknown_instance_type_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "fortress.yaml"
    path.write_text((EXAMPLES / "aws-always-on.yaml").read_text().replace("g5.48xlarge", "x9.huge"))
    result = CliRunner().invoke(app, ["cost", "-c", str(path)])
    assert result.exit_code == 2
    assert "x9.huge" in result.output and "fortress cost refresh" in result.output
    assert "Traceback" not in result.output


@pytest.fixture
def no_aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", raising=False)
    monkeypatch.delenv("AWS_WEB_IDENTITY_TOKEN_FILE", raising=False)


@pytest.mark.usefixtures("no_aws_credentials")
def test_refresh_without_credentials_exits_2_without_a_traceback(tmp_path: Path) -> None:
    out = tmp_path / "prices.json"
    result = CliRunner().invoke(
        app, ["cost", "refresh", "-o", str(out), "-c", str(EXAMPLES / "aws-always-on.yaml")]
    )
    assert result.exit_code == 2, result.output
    assert "no AWS credentials" in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not out.exists()


# -- refresh against a stub Price List API (moto has none) --------------------------------------------


def _product(usd: float) -> str:
    return json.dumps(
        {
            "terms": {
                "OnDemand": {
                    "T1": {"priceDimensions": {"D1": {"unit": "Hrs", "pricePerUnit": {"USD": f"{usd:.4f}"}}}}
                }
            }
        }
    )


class _StubPricing:
    """get_products answering from a {(service, instanceType, regionCode): $/h} map, one page each."""

    def __init__(self, prices: dict[tuple[str, str, str], float]) -> None:
        self.prices = prices
        self.calls: list[dict[str, Any]] = []

    def get_products(self, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(kwargs)
        f = {t["Field"]: t["Value"] for t in kwargs["Filters"]}
        usd = self.prices.get((kwargs["ServiceCode"], f["instanceType"], f["regionCode"]))
        # A page without a price first (a reserved-only product), then the real one.
        if "NextToken" not in kwargs:
            return {"PriceList": [json.dumps({"terms": {}})], "NextToken": "p2"}
        return {"PriceList": [_product(usd)] if usd is not None else []}


class _StubSession:
    def __init__(self, client: _StubPricing, credentials: object | None = object()) -> None:
        self._client, self._credentials = client, credentials
        self.region: str | None = None

    def get_credentials(self) -> object | None:
        return self._credentials

    def client(self, service: str, region_name: str) -> _StubPricing:
        assert service == "pricing"
        self.region = region_name
        return self._client


def test_refresh_writes_the_prices_the_api_gives() -> None:
    known = {("AmazonEC2", t, "eu-west-1"): 2 * v for t, v in TABLE["ec2_hour"].items()}
    known[("AmazonEC2", "g6.4xlarge", "eu-west-1")] = 1.5
    known |= {("AmazonRDS", c, "eu-west-1"): v for c, v in TABLE["rds_postgres_hour"].items()}
    known |= {("AmazonElastiCache", n, "eu-west-1"): v for n, v in TABLE["elasticache_hour"].items()}
    del known[("AmazonEC2", "p4d.24xlarge", "eu-west-1")]  # not offered there
    stub = _StubPricing(known)
    session = _StubSession(stub)
    raw = refresh_prices(
        PRICES, region="eu-west-1", instance_types=["g6.4xlarge"], session=session, today="2030-01-02"
    )
    assert session.region == "us-east-1"  # the Price List API's own endpoint
    assert raw["region"] == "eu-west-1" and raw["date"] == "2030-01-02"
    assert "Price List API" in raw["source"]
    assert raw["ec2_hour"]["g5.48xlarge"] == pytest.approx(2 * TABLE["ec2_hour"]["g5.48xlarge"], abs=1e-4)
    assert raw["ec2_hour"]["g6.4xlarge"] == 1.5
    assert "p4d.24xlarge" not in raw["ec2_hour"]  # no stale us-east-1 price left in an eu table
    linux = [c for c in stub.calls if c["ServiceCode"] == "AmazonEC2"]
    assert all(
        {"Type": "TERM_MATCH", "Field": "operatingSystem", "Value": "Linux"} in c["Filters"] for c in linux
    )
    with pytest.raises(PriceError, match=r"p4d\.24xlarge"):
        refresh_prices(PRICES, region="eu-west-1", instance_types=["p4d.24xlarge"], session=session)


def test_refresh_without_credentials_raises_pricing_unavailable() -> None:
    with pytest.raises(PricingUnavailable, match="no AWS credentials"):
        refresh_prices(PRICES, session=_StubSession(_StubPricing({}), credentials=None))


def test_a_refreshed_table_is_usable_with_prices(tmp_path: Path) -> None:
    raw = json.loads(json.dumps(TABLE))
    raw["ec2_hour"]["g5.48xlarge"] = 10.0
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(raw))
    result = CliRunner().invoke(
        app, ["cost", "-c", str(EXAMPLES / "aws-always-on.yaml"), "--prices", str(path), "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["instances_usd"] == pytest.approx(7300.0)


def test_the_other_aws_examples_price_their_fleets() -> None:
    od = TABLE["ec2_hour"]["g4dn.xlarge"]
    chat = estimate(load_config(EXAMPLES / "aws-spot-scheduled.yaml"), PRICES)
    (ec2,) = _lines(chat, "EC2 g4dn.xlarge")
    assert ec2.quantity == pytest.approx(730 * 15 / 24)  # down 06:00-15:00 UTC every day
    assert ec2.unit_usd == pytest.approx(min(0.25, od * 0.30))
    platform = estimate(load_config(EXAMPLES / "aws-platform.yaml"), PRICES)
    assert platform.usd_per_request == pytest.approx(platform.total_usd / 1_000_000)
    assert platform.utilisation == pytest.approx(1_000_000 * 200 / (730 * 3600 * 250))
    assert {"RDS PostgreSQL", "ElastiCache Redis"} <= {i.resource for i in platform.items}


# -- Bedrock: billed per token ---------------------------------------------------------------------------

SONNET = "anthropic.claude-3-sonnet-20240229-v1:0"


def _bedrock_config(replicas: str = "", cost: str = "", deploy: str = "") -> Any:
    """The seed's Bedrock system: a pool of two adapters for Claude 3 Sonnet, the gateway on
    Fargate (2 tasks x 0.5 vCPU / 1 GB), no pool in ``deploy.aws.pools``."""
    replicas = (
        replicas or f"      - engine: bedrock\n        count: 2\n        options: {{model_id: {SONNET}}}"
    )
    return parse_config(
        f"""
pools:
  - model: claude
    replicas:
{replicas}
deploy:
  aws:
    pools: {{}}
{deploy}
    cost:
      data_transfer_gb: 2
      nat_gb: 2
{cost}
""",
        env={},
    )


def _seed_traffic(tokens_in: int, tokens_out: int) -> str:
    return (
        f"      requests_per_month: 100000\n      input_tokens_per_request: {tokens_in}\n"
        f"      output_tokens_per_request: {tokens_out}"
    )


def test_the_table_prices_bedrock_models_per_million_tokens() -> None:
    table = TABLE["bedrock_1m_tokens"]
    assert table[SONNET] == {"input": 3.0, "output": 15.0}
    assert table["anthropic.claude-3-haiku-20240307-v1:0"] == {"input": 0.25, "output": 1.25}
    for model in (
        "anthropic.claude-3-5-sonnet-20240620-v1:0",
        "anthropic.claude-3-5-haiku-20241022-v1:0",
        "amazon.titan-text-express-v1",
        "amazon.nova-lite-v1:0",
        "amazon.nova-pro-v1:0",
        "meta.llama3-70b-instruct-v1:0",
    ):
        assert 0 < table[model]["input"] <= table[model]["output"], model
    # inference profiles and ARNs name the model they bill as
    profile = "us.anthropic.claude-3-5-haiku-20241022-v1:0"
    assert PRICES.bedrock_1m_tokens(profile) == ("anthropic.claude-3-5-haiku-20241022-v1:0", 0.8, 4.0)
    arn = f"arn:aws:bedrock:us-east-1:123456789012:inference-profile/{profile}"
    assert PRICES.bedrock_1m_tokens(arn)[0] == "anthropic.claude-3-5-haiku-20241022-v1:0"
    fm = f"arn:aws:bedrock:us-east-1::foundation-model/{SONNET}"
    assert PRICES.bedrock_1m_tokens(fm) == (SONNET, 3.0, 15.0)


@pytest.mark.parametrize(("tokens_in", "tokens_out"), [(100, 100), (150, 50), (500, 200)])
def test_a_bedrock_pool_is_billed_per_token_for_its_requests(tokens_in: int, tokens_out: int) -> None:
    est = estimate(_bedrock_config(cost=_seed_traffic(tokens_in, tokens_out)), PRICES)
    p = TABLE["bedrock_1m_tokens"][SONNET]
    lines = {i.what.rsplit(", ", 1)[1]: i for i in _lines(est, "Bedrock")}
    assert lines["input"].quantity == pytest.approx(100_000 * tokens_in / 1e6)
    assert lines["input"].monthly_usd == pytest.approx(100_000 * tokens_in / 1e6 * p["input"])
    assert lines["output"].monthly_usd == pytest.approx(100_000 * tokens_out / 1e6 * p["output"])
    per_request = (tokens_in * p["input"] + tokens_out * p["output"]) / 1e6
    (pool,) = est.pools
    assert pool.bedrock_model == SONNET and pool.requests_share == 1.0
    assert pool.usd_per_request == pytest.approx(per_request)
    assert pool.usd_per_million_tokens == pytest.approx(per_request / tokens_out * 1e6)
    assert est.bedrock_usd == pytest.approx(100_000 * per_request)
    assert est.instances_usd == 0 and not [i for i in est.items if i.resource.startswith("EC2")]
    assert est.utilisation is None  # no instances to fill
    assert est.usd_per_request == pytest.approx(est.total_usd / 100_000)


def test_the_seeds_bedrock_system_against_its_137_a_month() -> None:
    """The seed: ~$137 a month at 100k requests x 200 tokens (not split into input and output).
    The figures here are what the docs report; they follow from the table."""
    even = estimate(_bedrock_config(cost=_seed_traffic(100, 100)), PRICES)
    infra = even.total_usd - even.bedrock_usd
    f = TABLE["fargate"]
    fargate = 2 * 730 * (0.5 * f["vcpu_hour"] + 1 * f["gb_hour"])
    nat = 730 * TABLE["nat_gateway"]["hour"]
    assert {i.resource for i in even.items} >= {"Fargate", "ALB", "NAT gateway", "Bedrock"}
    assert even.bedrock_usd == pytest.approx(180.0)
    assert infra == pytest.approx(99.58, abs=0.01)
    assert even.total_usd == pytest.approx(279.58, abs=0.01)  # about twice the seed's figure
    # Cheapest split: all 200 tokens billed as input ($60). With a NAT gateway, still above $137.
    assert 100_000 * 200 / 1e6 * 3.0 + infra > 137
    # Without the NAT gateway (a VPC endpoint for Bedrock instead, not priced here)
    no_nat = estimate(
        _bedrock_config(cost=_seed_traffic(100, 100), deploy="    vpc: {nat_gateways: 0}"), PRICES
    )
    assert not _lines(no_nat, "NAT gateway")
    assert no_nat.total_usd == pytest.approx(even.total_usd - nat - 2 * TABLE["nat_gateway"]["gb"])
    assert no_nat.total_usd - no_nat.bedrock_usd == pytest.approx(66.64, abs=0.01)
    assert _lines(even, "Fargate")[0].monthly_usd == pytest.approx(fargate)


def test_an_unknown_bedrock_model_exits_2_naming_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(PriceError, match=r"anthropic\.claude-9"):
        PRICES.bedrock_1m_tokens("anthropic.claude-9")
    path = tmp_path / "fortress.yaml"
    text = _bedrock_config().model_dump(mode="json", exclude_none=True)
    text["pools"][0]["replicas"][0]["options"]["model_id"] = "vendor.unknown-model-v1:0"
    path.write_text(json.dumps(text))
    result = CliRunner().invoke(app, ["cost", "-c", str(path)])
    assert result.exit_code == 2, result.output
    assert "vendor.unknown-model-v1:0" in result.output and SONNET in result.output
    assert "Traceback" not in result.output


def test_bedrock_takes_the_share_its_tier_and_count_give() -> None:
    # beside two simulator replicas in the primary tier: half of the requests
    beside = (
        f"      - engine: bedrock\n        count: 2\n        options: {{model_id: {SONNET}}}\n"
        "      - engine: sim\n        count: 2"
    )
    half = estimate(_bedrock_config(beside, _seed_traffic(100, 100)), PRICES)
    assert half.bedrock_usd == pytest.approx(90.0)
    assert half.pools[0].requests_share == 0.5
    # a failover tier behind a self-hosted primary: nothing until it takes requests
    behind = (
        "      - engine: sim\n"
        f"      - engine: bedrock\n        tier: secondary\n        options: {{model_id: us.{SONNET}}}"
    )
    spare = estimate(_bedrock_config(behind, _seed_traffic(100, 100)), PRICES)
    assert spare.bedrock_usd == 0
    assert any("failover tier" in n and "$0.00180 each" in n for n in spare.notes)
    # no requests_per_month: per request still known, the month not
    unknown = estimate(_bedrock_config(), PRICES)
    assert unknown.bedrock_usd == 0 and unknown.pools[0].usd_per_request == pytest.approx(
        (500 * 3 + 200 * 15) / 1e6
    )
    assert any("requests_per_month" in n for n in unknown.notes)


def test_cost_prints_bedrock_per_request_and_json_carries_it(tmp_path: Path) -> None:
    path = tmp_path / "fortress.yaml"
    path.write_text(json.dumps(_bedrock_config(cost=_seed_traffic(100, 100)).model_dump(mode="json")))
    result = CliRunner().invoke(app, ["cost", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert "Bedrock" in result.stdout and "$0.00180 per request" in result.stdout
    assert "$18.00 per 1M output tokens" in result.stdout
    data = json.loads(CliRunner().invoke(app, ["cost", "-c", str(path), "--json"]).stdout)
    assert data["bedrock_usd"] == pytest.approx(180.0)
    assert data["pools"][0]["bedrock_model"] == SONNET


# -- throughput given at estimate time --------------------------------------------------------------------


def test_read_throughput_takes_a_number_or_a_bench_file(tmp_path: Path) -> None:
    assert read_throughput("250").tokens_per_second == 250
    bench = tmp_path / "tp.json"
    bench.write_text(
        json.dumps({"tokens_per_second": 12.5, "model": "m", "concurrency": 2, "measured_at": "2026-01-02"})
    )
    tp = read_throughput(str(bench))
    assert tp.tokens_per_second == 12.5 and str(bench) in tp.source and "concurrency 2" in tp.source
    for bad in ("0", "-3", str(tmp_path / "missing.json")):
        with pytest.raises(ValueError):
            read_throughput(bad)
    bench.write_text('{"requests": 3}')
    with pytest.raises(ValueError, match="tokens_per_second"):
        read_throughput(str(bench))


def test_a_given_throughput_replaces_the_configs_and_says_so() -> None:
    cfg = load_config(EXAMPLES / "aws-always-on.yaml")
    od = TABLE["ec2_hour"]["g5.48xlarge"]
    given = estimate(cfg, PRICES, {None: Throughput(800.0, "given: 800 tokens/s")})
    (pool,) = given.pools
    assert pool.usd_per_million_tokens == pytest.approx(od / (800 * 3600) * 1e6)
    assert pool.throughput_source == "given: 800 tokens/s"
    (default,) = estimate(cfg, PRICES).pools
    assert default.throughput_tokens_per_second == 400 and "config" in str(default.throughput_source)
    with pytest.raises(ValueError, match="nope"):
        estimate(cfg, PRICES, {"nope": Throughput(1.0, "x")})
    result = CliRunner().invoke(
        app, ["cost", "-c", str(EXAMPLES / "aws-always-on.yaml"), "--throughput", "qwen2.5-72b=800"]
    )
    assert result.exit_code == 0, result.output
    assert "800 tokens/s (given: 800 tokens/s)" in result.stdout
    for bad in ("other=800", "fast"):
        result = CliRunner().invoke(
            app, ["cost", "-c", str(EXAMPLES / "aws-always-on.yaml"), "--throughput", bad]
        )
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output


def test_the_bedrock_example_at_the_seeds_traffic() -> None:
    """examples/aws-bedrock.yaml (two Claude 3 Sonnet adapters, the gateway on Fargate, no
    deployed pool) at the seed's 100k requests of 100 input + 100 output tokens."""
    doc = load_config(EXAMPLES / "aws-bedrock.yaml").model_dump(mode="json", exclude_none=True)
    doc["deploy"]["aws"]["cost"] |= {
        "requests_per_month": 100_000,
        "input_tokens_per_request": 100,
        "output_tokens_per_request": 100,
    }
    est = estimate(parse_config(json.dumps(doc), env={}), PRICES)
    assert not doc["deploy"]["aws"]["pools"] and est.instances_usd == 0
    (pool,) = est.pools
    assert pool.bedrock_model == SONNET and pool.usd_per_request == pytest.approx(0.0018)
    assert est.bedrock_usd == pytest.approx(180.0)  # 10M input x $3 + 10M output x $15
    assert est.total_usd == pytest.approx(sum(i.monthly_usd for i in est.items))
    assert est.total_usd > 137  # the seed's ~$137: the tokens alone cost more (see docs/deploy.md)
