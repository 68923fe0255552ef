"""The deploy: section: what it accepts, what it refuses with the reason, and its tie to pools."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from fortress.config import ConfigError, DeployPool, load_config, parse_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

VLLM = {"engine": "vllm", "options": {"model": "Qwen/Qwen2.5-7B-Instruct"}}


def doc(pools: list[dict[str, Any]] | None = None, **aws: Any) -> str:
    return yaml.safe_dump(
        {
            "pools": pools if pools is not None else [{"model": "m", "replicas": [VLLM]}],
            "deploy": {"aws": {"pools": {"m": {"instance_type": "g5.xlarge"}}, **aws}},
        }
    )


def refused(text: str) -> str:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "fortress.yaml", env={})
    return str(err.value)


@pytest.mark.parametrize("name", ["aws-always-on.yaml", "aws-always-on-ha.yaml"])
def test_the_seed_examples_load(name: str) -> None:
    cfg = load_config(str(EXAMPLES / name))
    assert cfg.deploy.aws is not None
    (pool,) = cfg.deploy.aws.pools.values()
    assert pool.instance_type == "g5.48xlarge" and pool.volume.iops == 16000
    assert pool.health_check_grace == 600
    tiers = [r.tier.value for r in cfg.pools[0].replicas]
    assert tiers == (["primary"] if "ha" not in name else ["primary", "secondary", "standby"])


def test_defaults_are_the_seed_s() -> None:
    cfg = parse_config(doc(), "t", env={})
    assert cfg.deploy.aws is not None
    p = cfg.deploy.aws.pools["m"]
    assert (p.volume.size_gb, p.volume.iops, p.volume.throughput) == (500, 3000, 125)
    assert p.stickiness is None and p.stickiness_cookie == "LlmServiceStickiness"
    gw = cfg.deploy.aws.gateway
    assert (gw.min_tasks, gw.max_tasks, gw.cpu, gw.memory) == (2, 10, 512, 1024)
    # Durations take units.
    assert DeployPool.model_validate({"instance_type": "g5.xlarge", "stickiness": "15m"}).stickiness == 900


def test_a_config_without_deploy_has_none() -> None:
    cfg = parse_config(yaml.safe_dump({"pools": [{"model": "m", "replicas": [VLLM]}]}), "t", env={})
    assert cfg.deploy.aws is None


def test_a_deployed_pool_must_exist_and_have_something_to_run() -> None:
    assert "no pool is named 'other'" in refused(
        yaml.safe_dump(
            {
                "pools": [{"model": "m", "replicas": [VLLM]}],
                "deploy": {"aws": {"pools": {"other": {"instance_type": "g5.xlarge"}}}},
            }
        )
    )
    external = [{"model": "m", "replicas": [{"url": "http://10.0.0.1:8000"}]}]
    assert "neither engine: vllm replicas nor an aws fleet" in refused(doc(external))
    # A pool with an aws fleet has no replicas: its vLLM settings are given in deploy.
    fleet = {
        "model": "m",
        "fleet": {"provider": "aws", "max_replicas": 2, "aws": {"groups": {"spot": "g-spot"}}},
    }
    assert "give `vllm:`" in refused(doc([fleet]))
    ok = parse_config(
        yaml.safe_dump(
            {
                "pools": [fleet],
                "deploy": {"aws": {"pools": {"m": {"instance_type": "g5.xlarge", "vllm": VLLM["options"]}}}},
            }
        ),
        "t",
        env={},
    )
    assert ok.deploy.aws is not None and ok.deploy.aws.pools["m"].vllm is not None
    assert "taken from the pool's replicas" in refused(
        yaml.safe_dump(
            {
                "pools": [{"model": "m", "replicas": [VLLM]}],
                "deploy": {"aws": {"pools": {"m": {"instance_type": "g5.xlarge", "vllm": VLLM["options"]}}}},
            }
        )
    )


@pytest.mark.parametrize(
    ("aws", "words"),
    [
        ({"region": "mars-1"}, "region"),
        ({"account": "12345"}, "account"),
        ({"vpc": {"id": "vpc-nothex!"}}, "vpc.id"),
        ({"gateway": {"min_tasks": 5, "max_tasks": 2}}, "min_tasks is above max_tasks"),
        ({"gateway": {"cpu": 300}}, "gateway.cpu"),
        ({"archive": {"glacier_after_days": 90, "expire_after_days": 30}}, "expire_after_days"),
        ({"domain": {"name": "api.example.com", "certificate_arn": "nope"}}, "certificate_arn"),
        ({"budget": {"monthly_usd": 0, "emails": ["a@example.com"]}}, "monthly_usd"),
        ({"cost": {"commitment": "forever"}}, "commitment"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_bad_values_are_refused_with_the_key(aws: dict[str, Any], words: str) -> None:
    assert words in refused(doc(**aws))


@pytest.mark.parametrize(
    ("pool", "words"),
    [
        ({"instance_type": "huge"}, "instance_type"),
        ({"instance_type": "g5.xlarge", "image": "ubuntu"}, "image"),
        ({"instance_type": "g5.xlarge", "volume": {"iops": 20000}}, "iops"),
        ({"instance_type": "g5.xlarge", "volume": {"throughput": 50}}, "throughput"),
        ({"instance_type": "g5.xlarge", "spot_max_price": -1}, "spot_max_price"),
    ],
)
def test_bad_pool_values_are_refused_with_the_key(pool: dict[str, Any], words: str) -> None:
    text = yaml.safe_dump(
        {"pools": [{"model": "m", "replicas": [VLLM]}], "deploy": {"aws": {"pools": {"m": pool}}}}
    )
    assert words in refused(text)


def test_alb_stickiness_on_an_aws_fleet_pool_points_to_the_session_balancer() -> None:
    fleet = {
        "model": "m",
        "fleet": {"provider": "aws", "max_replicas": 2, "aws": {"groups": {"spot": "g-spot"}}},
    }
    pool = {"instance_type": "g5.xlarge", "vllm": VLLM["options"], "stickiness": 900}
    text = yaml.safe_dump({"pools": [fleet], "deploy": {"aws": {"pools": {"m": pool}}}})
    assert "balancer: session" in refused(text)
    # The seed's chatbot example keeps its 900 s sessions that way.
    cfg = load_config(str(EXAMPLES / "aws-spot-scheduled.yaml"))
    pc = cfg.pools[0]
    assert pc.balancer == "session" and pc.session.source == "cookie" and pc.session.ttl == 900


def test_env_secrets_accept_arns_and_names() -> None:
    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:hf-token-AbCdEf"
    pool = DeployPool.model_validate(
        {"instance_type": "g5.xlarge", "env_secrets": {"HF_TOKEN": arn, "WANDB_API_KEY": "team/wandb"}}
    )
    assert pool.env_secrets == {"HF_TOKEN": arn, "WANDB_API_KEY": "team/wandb"}
    assert DeployPool.model_validate({"instance_type": "g5.xlarge"}).env_secrets == {}


@pytest.mark.parametrize(
    ("secrets", "words"),
    [
        ({"hf_token": "hf"}, "'hf_token' is not an environment variable name"),
        ({"1TOKEN": "hf"}, "'1TOKEN' is not an environment variable name"),
        ({"HF-TOKEN": "hf"}, "'HF-TOKEN' is not an environment variable name"),
        (
            {"HF_TOKEN": "arn:aws:s3:::bucket"},
            "env_secrets.HF_TOKEN: 'arn:aws:s3:::bucket' is not a Secrets Manager",
        ),
        ({"HF_TOKEN": "arn:aws:secretsmanager:us-east-1:12:secret:x"}, "is not a Secrets Manager secret ARN"),
        ({"HF_TOKEN": "my token"}, "'my token' is neither a secret ARN nor a secret name"),
        ({"HF_TOKEN": ""}, "is neither a secret ARN nor a secret name"),
    ],
)
def test_bad_env_secrets_are_refused_with_the_reason(secrets: dict[str, str], words: str) -> None:
    text = yaml.safe_dump(
        {
            "pools": [{"model": "m", "replicas": [VLLM]}],
            "deploy": {"aws": {"pools": {"m": {"instance_type": "g5.xlarge", "env_secrets": secrets}}}},
        }
    )
    assert words in refused(text)


def test_blue_green_is_accepted_with_its_traffic_shift() -> None:
    cfg = parse_config(
        doc(gateway={"deployment": "blue_green", "blue_green_traffic": "linear_10_1m"}), "t", env={}
    )
    assert cfg.deploy.aws is not None
    assert cfg.deploy.aws.gateway.deployment == "blue_green"
    assert cfg.deploy.aws.gateway.blue_green_traffic == "linear_10_1m"
    assert "applies only to deployment: blue_green" in refused(
        doc(gateway={"blue_green_traffic": "all_at_once"})
    )
