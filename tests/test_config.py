"""Config model: defaults, validation errors with key and line, env overrides, the example."""

import pytest
from pydantic import ValidationError

from fortress.config import (
    EXAMPLE_CONFIG,
    LOCAL_ENGINES,
    ConfigError,
    ExternalReplicaConfig,
    HealthCheck,
    LlamaCppOptions,
    LlamaCppReplicaConfig,
    LocalReplicaConfig,
    OutlierDetection,
    PoolConfig,
    Server,
    SimOptions,
    SimReplicaConfig,
    Tier,
    VllmReplicaConfig,
    build_config,
    load_config,
    parse_config,
)


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


# -- replicas: a discriminated union on `engine` --------------------------------------------


def _replicas(text: str) -> list:
    return parse_config(f"pools:\n  - model: m\n    replicas:\n{text}", "f.yaml", env={}).pools[0].replicas


def _error(text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "f.yaml", env=env or {})
    return str(exc.value)


def test_a_replica_without_engine_is_external_and_each_engine_gets_its_class():
    ext, llama, vllm, sim = _replicas(
        "      - url: http://a:8000/\n"
        "      - {engine: llamacpp, count: 2, name: cpu, tier: secondary}\n"
        "      - {engine: vllm, options: {model: Qwen/Qwen2.5-7B-Instruct}}\n"
        "      - {engine: sim}\n"
    )
    assert isinstance(ext, ExternalReplicaConfig) and ext.engine == "external"
    assert ext.url == "http://a:8000"  # trailing slash stripped
    assert isinstance(llama, LlamaCppReplicaConfig) and llama.count == 2 and llama.name == "cpu"
    assert llama.tier is Tier.SECONDARY and llama.options == LlamaCppOptions()
    assert isinstance(vllm, VllmReplicaConfig) and vllm.options.model == "Qwen/Qwen2.5-7B-Instruct"
    assert isinstance(sim, SimReplicaConfig) and isinstance(sim.options, SimOptions)
    assert all(isinstance(r, LocalReplicaConfig) for r in (llama, vllm, sim))
    assert not isinstance(ext, LocalReplicaConfig)
    assert {"llamacpp", "vllm", "sim", "bedrock"} == LOCAL_ENGINES


def test_unknown_engine_is_named_with_its_line():
    msg = _error("pools:\n  - model: m\n    replicas:\n      - url: http://a\n      - engine: llama\n")
    assert "pools.0.replicas.1.engine (line 5): unknown engine 'llama'" in msg
    assert "external, llamacpp, vllm, sim" in msg


def test_url_on_a_local_replica_is_rejected():
    msg = _error("pools:\n  - model: m\n    replicas:\n      - {engine: llamacpp, url: 'http://a:1'}\n")
    assert "pools.0.replicas.0 (line 4)" in msg
    assert "a local llamacpp replica gets its port from Fortress: remove its url" in msg


def test_external_replica_needs_an_http_url():
    assert "pools.0.replicas.0.url (line 4): Field required" in _error(
        "pools:\n  - model: m\n    replicas:\n      - {tier: primary}\n"
    )
    with pytest.raises(ValidationError, match="must start with http"):
        ExternalReplicaConfig(url="127.0.0.1:8000")


def test_option_errors_name_the_key_and_its_line():
    text = """\
pools:
  - model: m
    replicas:
      - engine: llamacpp
        options:
          threads: many
          ctx: 4096
      - engine: vllm
        options:
          model: m
          gpu-memory-utilization: 1.5
      - engine: vllm
      - engine: sim
        options: {error_rate: 2, metrics_flavor: tgi, backoff_initial: 5, backoff_max: 1}
"""
    msg = _error(text)
    assert "pools.0.replicas.0.options.threads (line 6): Input should be a valid integer" in msg
    assert "pools.0.replicas.0.options.ctx (line 7): Extra inputs are not permitted" in msg
    assert "pools.0.replicas.1.options.gpu_memory_utilization (line 11)" in msg
    assert "pools.0.replicas.2.options (line 12): Value error, a vllm replica needs options.model" in msg
    assert "pools.0.replicas.3.options.error_rate (line 14)" in msg
    assert "pools.0.replicas.3.options.metrics_flavor (line 14)" in msg


def test_option_keys_may_use_dashes_and_strings_are_parsed():
    (rc,) = _replicas(
        "      - engine: llamacpp\n"
        "        options: {ctx-size: 8192, extra-args: '--flash-attn on', env: {OMP_NUM_THREADS: 4},\n"
        "                  ready-timeout: 5m, stop_timeout: 2s, backoff_max: 10}\n"
    )
    o = rc.options
    assert isinstance(o, LlamaCppOptions)
    assert o.ctx_size == 8192 and o.extra_args == ["--flash-attn", "on"]
    assert o.env == {"OMP_NUM_THREADS": "4"} and o.ready_timeout == 300 and o.stop_timeout == 2
    with pytest.raises(ValidationError, match="backoff_max must be at least backoff_initial"):
        SimOptions(backoff_initial=2, backoff_max=1)


# -- pools: names, outlier detection, balancer ---------------------------------------------


def test_outlier_detection_defaults_and_validation():
    pool = parse_config("pools:\n  - model: m\n", env={}).pools[0]
    assert pool.outlier == OutlierDetection()
    o = pool.outlier
    assert (o.consecutive_5xx, o.consecutive_gateway_failure) == (5, 5)
    assert (o.max_ejection_percent, o.panic_threshold) == (50, 0)
    assert (o.base_ejection_time, o.max_ejection_time) == (30, 300)
    assert pool.balancer == "least_outstanding" and pool.name is None
    text = "pools:\n  - model: m\n    outlier: {base_ejection_time: 10s, max_ejection_time: 2m}\n"
    o = parse_config(text, env={}).pools[0].outlier
    assert (o.base_ejection_time, o.max_ejection_time) == (10, 120)
    msg = _error("pools:\n  - model: m\n    outlier: {base_ejection_time: 60, max_ejection_time: 30}\n")
    assert (
        "pools.0.outlier (line 3): Value error, max_ejection_time must be at least base_ejection_time" in msg
    )
    msg = _error(
        "pools:\n  - model: m\n    outlier:\n      max_ejection_percent: 101\n      panic_threshold: -1\n"
    )
    assert "pools.0.outlier.max_ejection_percent (line 4)" in msg
    assert "pools.0.outlier.panic_threshold (line 5)" in msg
    assert "pools.0.balancer" in _error("pools:\n  - model: m\n    balancer: random\n")


def test_duplicate_pool_and_replica_names_are_rejected():
    msg = _error("pools:\n  - {model: a, name: p}\n  - {model: b, name: p}\n")
    assert "pool name 'p' is used by pools 0 and 1" in msg
    msg = _error(
        "pools:\n  - model: a\n    replicas: [{url: 'http://x', name: r}]\n"
        "  - model: b\n    replicas: [{engine: sim, name: r}]\n"
    )
    assert "replica name 'r' is used by pools.0.replicas.0 and pools.1.replicas.0" in msg
    assert "pools.0.name" in _error("pools:\n  - {model: a, name: 'has space'}\n")


def test_engine_metrics_interval_belongs_to_routing():
    cfg = parse_config("routing: {engine_metrics_interval: 30s}\n", env={})
    assert cfg.routing.engine_metrics_interval == 30
    assert "observe.engine_metrics_interval" in _error("observe: {engine_metrics_interval: 5}\n")


def test_health_check_has_no_eject_backoff_any_more():
    msg = _error("pools:\n  - model: m\n    health_check: {eject_backoff: 1}\n")
    assert "pools.0.health_check.eject_backoff (line 3): Extra inputs are not permitted" in msg


# -- building configs in code ----------------------------------------------------------------


def test_replace_returns_a_validated_copy():
    cfg = parse_config("", env={})
    moved = cfg.replace(server=cfg.server.replace(port=9000))
    assert moved.server.port == 9000 and cfg.server.port == 8080  # the original is unchanged
    with pytest.raises(ValidationError, match="port"):
        cfg.server.replace(port=70000)
    with pytest.raises(ValidationError, match="timeout must not exceed interval"):
        HealthCheck().replace(timeout=60)
    pools = [PoolConfig(model="a"), PoolConfig(model="a")]
    with pytest.raises(ValidationError, match="'a' is used by pools 0 and 1"):
        cfg.replace(pools=pools)


def test_build_config_validates_objects_and_applies_env_overrides():
    data = {
        "server": Server(port=9000),
        "pools": [PoolConfig(model="m", replicas=[SimReplicaConfig(count=2)])],
    }
    env = {"FORTRESS__SERVER__HOST": "0.0.0.0", "FORTRESS__POOLS__0__REPLICAS__0__COUNT": "3"}
    cfg = build_config(data, env=env)
    assert (cfg.server.host, cfg.server.port) == ("0.0.0.0", 9000)
    assert cfg.pools[0].replicas[0].count == 3 and isinstance(cfg.pools[0].replicas[0], SimReplicaConfig)
    assert data["server"] == Server(port=9000)  # the input is left as it was
    with pytest.raises(ConfigError, match=r"invalid configuration in \(built\):\n  server\.port: "):
        build_config({}, env={"FORTRESS__SERVER__PORT": "-1"})
    assert build_config({}, env={}) == parse_config("", env={})
