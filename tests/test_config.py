"""Config model: defaults, validation errors with key and line, env overrides, the example."""

import pytest

from fortress.config import EXAMPLE_CONFIG, ConfigError, Tier, load_config, parse_config


def test_example_is_valid_and_shaped_like_the_seed_deployment():
    cfg = parse_config(EXAMPLE_CONFIG, env={})
    pool = cfg.pools[0]
    hc = pool.health_check
    assert (hc.path, hc.interval, hc.timeout, hc.healthy_threshold, hc.unhealthy_threshold) == (
        "/health",
        10,
        5,
        2,
        2,
    )
    assert hc.expected_status == [200]
    assert pool.deregistration_delay == 30
    assert [r.tier for r in pool.replicas] == [Tier.PRIMARY, Tier.SECONDARY]
    assert cfg.routing.when_all_unhealthy == "fail_open"


def test_example_documents_the_real_defaults():
    """The example's access, audit and observe sections say what a config without them gets."""
    example = parse_config(EXAMPLE_CONFIG, env={})
    defaults = parse_config("", env={})
    for section in ("state_dir", "auth", "plans", "limits", "audit", "database", "observe"):
        assert getattr(example, section) == getattr(defaults, section), section
    assert example.plans["default"].rate == 5 and example.plans["default"].requests == {"day": 5000}


def test_error_names_key_and_line():
    text = """\
server:
  port: 8080
pools:
  - model: m
    health_check:
      interval: -1
    replicas:
      - url: ftp://x
        tier: gold
"""
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "f.yaml", env={})
    msg = str(exc.value)
    assert "pools.0.health_check.interval (line 6)" in msg
    assert "pools.0.replicas.0.url (line 8)" in msg
    assert "pools.0.replicas.0.tier (line 9)" in msg


def test_unknown_key_is_rejected():
    with pytest.raises(ConfigError, match=r"server.prot \(line 2\).*Extra inputs"):
        parse_config("server:\n  prot: 1\n", env={})


def test_env_override_wins():
    cfg = parse_config(
        "server:\n  port: 8080\n",
        env={"FORTRESS__SERVER__PORT": "9001", "FORTRESS__ROUTING__MAX_ATTEMPTS": "5"},
    )
    assert cfg.server.port == 9001
    assert cfg.routing.max_attempts == 5


def test_env_override_is_validated():
    with pytest.raises(ConfigError, match=r"server\.port"):
        parse_config("", env={"FORTRESS__SERVER__PORT": "not-a-port"})


def test_expected_status_ranges_like_alb_matcher():
    cfg = parse_config('pools:\n  - model: m\n    health_check: {expected_status: "200-202,204"}\n', env={})
    assert cfg.pools[0].health_check.expected_status == [200, 201, 202, 204]


def test_timeout_must_not_exceed_interval():
    with pytest.raises(ConfigError, match="timeout must not exceed interval"):
        parse_config("pools:\n  - model: m\n    health_check: {interval: 1, timeout: 2}\n", env={})


def test_duplicate_model_names_rejected():
    text = "pools:\n  - model: a\n    aliases: [b]\n  - model: b\n"
    with pytest.raises(ConfigError, match="'b' is used by pools 0 and 1"):
        parse_config(text, env={})


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML"):
        parse_config("a: [", env={})
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
