"""``fortress deploy aws``: the CDK app synthesized from the example configs and a built one.

Each config is synthesized once per module (a synth takes seconds). Checked: what the template
must say (health checks, stickiness, schedules, spot price, encryption, TLS, vLLM flags, the
Bedrock topology), cfn-lint with no errors, cdk-nag's AWS Solutions checks with no unsuppressed
error, checkov (offline) with no failed check, each of its skips with a reason. Under ``CI=true``
a missing tool fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fortress.cli.main import app as cli
from fortress.config import load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _need(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        if CI:
            pytest.fail(f"{module} is not installed (pip install 'fortress[test]')")
        pytest.skip(f"{module} is not installed")


BUILT = """
pools:
  - model: llama
    health_check: {path: /health, interval: 10s, timeout: 5s, healthy_threshold: 2, unhealthy_threshold: 2}
    replicas:
      - engine: vllm
        tier: primary
        options: {model: meta-llama/Llama-3.1-8B-Instruct, max_model_len: 8192}
  - model: burst
    fleet:
      provider: aws
      min_replicas: 0
      max_replicas: 4
      aws: {groups: {spot: burst-spot, on-demand: burst-od}}
      schedules:
        - {cron: "0 8 * * 1-5", timezone: Europe/Paris, min_replicas: 2}
        - {cron: "0 20 * * 1-5", timezone: Europe/Paris, min_replicas: 0}
deploy:
  aws:
    region: eu-west-3
    stack_name: fortress-built
    domain:
      name: llm.example.com
      certificate_arn: arn:aws:acm:eu-west-3:123456789012:certificate/abc
    redis: {replicas: 1}
    archive: {glacier_after_days: 30, object_lock_days: 365}
    gateway: {deployment: blue_green}
    pools:
      llama:
        instance_type: g5.2xlarge
        stickiness: 900s
        env_secrets: {HF_TOKEN: "arn:aws:secretsmanager:eu-west-3:123456789012:secret:hf-token-AbCdEf"}
      burst:
        instance_type: g5.xlarge
        spot_max_price: 0.25
        vllm: {model: Qwen/Qwen2.5-7B-Instruct, served_model_name: burst}
        env_secrets: {HF_TOKEN: fortress/hf-token, WANDB_API_KEY: fortress/wandb}
"""

# Blue/green without a domain: HTTP listeners, every request at once, and no 5xx rule to watch.
BLUE_GREEN_HTTP = """
pools:
  - model: ext
    replicas: [{url: "http://10.0.0.5:8000"}]
observe: {alarms: {rules: []}}
deploy:
  aws:
    stack_name: fortress-bg
    gateway: {deployment: blue_green, blue_green_traffic: all_at_once}
"""


def _synth(config: Any, tmp: Path) -> tuple[Any, Path, list[str]]:
    _need("aws_cdk")
    _need("cdk_nag")
    from aws_cdk.assertions import Template

    from fortress.deploy.aws import synth

    result = synth(config, tmp)
    template = Template.from_json(json.loads(result.template.read_text()))
    return template, result.template, result.nag_errors


@pytest.fixture(scope="module")
def always_on(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, list[str]]:
    return _synth(load_config(ROOT / "examples/aws-always-on.yaml"), tmp_path_factory.mktemp("one"))


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, list[str]]:
    return _synth(load_config(ROOT / "examples/aws-always-on-ha.yaml"), tmp_path_factory.mktemp("ha"))


@pytest.fixture(scope="module")
def spot(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, list[str]]:
    return _synth(load_config(ROOT / "examples/aws-spot-scheduled.yaml"), tmp_path_factory.mktemp("spot"))


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, list[str]]:
    return _synth(load_config(ROOT / "examples/aws-platform.yaml"), tmp_path_factory.mktemp("platform"))


@pytest.fixture(scope="module")
def bedrock(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, list[str]]:
    return _synth(load_config(ROOT / "examples/aws-bedrock.yaml"), tmp_path_factory.mktemp("bedrock"))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, list[str]]:
    return _synth(parse_config(BUILT), tmp_path_factory.mktemp("built"))


@pytest.fixture(scope="module")
def blue_green_http(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, list[str]]:
    return _synth(parse_config(BLUE_GREEN_HTTP), tmp_path_factory.mktemp("bg"))


# Every example, the built config (a domain, Redis, object lock, a fleet beside a tier, blue/green,
# secrets for the model servers) and blue/green without a domain.
ALL = ["always_on", "ha", "spot", "platform", "bedrock", "built", "blue_green_http"]


def test_every_example_is_synthesized_here() -> None:
    examples = {p.name for p in (ROOT / "examples").glob("aws-*.yaml")}
    assert examples == {
        "aws-always-on.yaml",
        "aws-always-on-ha.yaml",
        "aws-spot-scheduled.yaml",
        "aws-platform.yaml",
        "aws-bedrock.yaml",
    }


def _resources(t: Any, kind: str) -> dict[str, Any]:
    return t.find_resources(kind)


def test_target_group_health_check_and_deregistration(always_on: Any) -> None:
    from aws_cdk.assertions import Match

    t, _, _ = always_on
    t.has_resource_properties(
        "AWS::ElasticLoadBalancingV2::TargetGroup",
        {
            "Port": 8000,
            "HealthCheckPath": "/health",
            "HealthCheckIntervalSeconds": 10,
            "HealthCheckTimeoutSeconds": 5,
            "HealthyThresholdCount": 2,
            "UnhealthyThresholdCount": 2,
            "Matcher": {"HttpCode": "200"},
            "TargetGroupAttributes": Match.array_with(
                [{"Key": "deregistration_delay.timeout_seconds", "Value": "30"}]
            ),
        },
    )
    # The gateway's own target group: /health every 10 s, 5 s timeout, 2/2, 200.
    t.has_resource_properties(
        "AWS::ElasticLoadBalancingV2::TargetGroup",
        {
            "Port": 8080,
            "HealthCheckIntervalSeconds": 10,
            "HealthCheckTimeoutSeconds": 5,
            "Matcher": {"HttpCode": "200"},
        },
    )


def test_vllm_group_user_data_volume_imds(always_on: Any) -> None:
    t, _, _ = always_on
    (lt,) = _resources(t, "AWS::EC2::LaunchTemplate").values()
    data = lt["Properties"]["LaunchTemplateData"]
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    volumes = {b["DeviceName"]: b["Ebs"] for b in data["BlockDeviceMappings"]}
    assert volumes["/dev/sdf"] == {
        "DeleteOnTermination": True,
        "Encrypted": True,
        "Iops": 16000,
        "Throughput": 1000,
        "VolumeSize": 500,
        "VolumeType": "gp3",
    }
    assert all(v["Encrypted"] for v in volumes.values())
    script = json.dumps(data["UserData"])
    for flag in (
        "--tensor-parallel-size 8",
        "--max-model-len 32768",
        "--gpu-memory-utilization 0.95",
        "--enable-chunked-prefill",
        "--max-num-batched-tokens 32768",
        "--served-model-name qwen2.5-72b",
        "--port 8000",
        "Restart=always",
        "RestartSec=10",
        "/opt/models",
    ):
        assert flag in script, flag
    (group,) = _resources(t, "AWS::AutoScaling::AutoScalingGroup").values()
    p = group["Properties"]
    assert (p["HealthCheckType"], p["HealthCheckGracePeriod"]) == ("ELB", 600)
    assert (p["MinSize"], p["MaxSize"], p["DesiredCapacity"]) == ("1", "1", "1")


def test_ha_tiers_in_zones_a_b_c_and_standby_cold(ha: Any) -> None:
    t, _, _ = ha
    groups = _resources(t, "AWS::AutoScaling::AutoScalingGroup")
    subnets = _resources(t, "AWS::EC2::Subnet")
    zones = []
    for g in groups.values():
        (ref,) = g["Properties"]["VPCZoneIdentifier"]
        zones.append(
            (subnets[ref["Ref"]]["Properties"]["AvailabilityZone"], g["Properties"]["DesiredCapacity"])
        )
    assert sorted(zones) == [("us-east-1a", "1"), ("us-east-1b", "1"), ("us-east-1c", "0")]
    t.resource_count_is("AWS::ElasticLoadBalancingV2::TargetGroup", 4)  # three tiers and the gateway
    t.has_resource_properties(
        "AWS::RDS::DBInstance", {"StorageEncrypted": True, "MultiAZ": True, "DeletionProtection": True}
    )
    t.resource_count_is("AWS::Budgets::Budget", 1)


def test_stickiness_when_the_pool_asks(built: Any, always_on: Any) -> None:
    from aws_cdk.assertions import Match

    t, _, _ = built
    t.has_resource_properties(
        "AWS::ElasticLoadBalancingV2::TargetGroup",
        {
            "TargetGroupAttributes": Match.array_with(
                [
                    {"Key": "stickiness.enabled", "Value": "true"},
                    {"Key": "stickiness.type", "Value": "app_cookie"},
                    {"Key": "stickiness.app_cookie.cookie_name", "Value": "LlmServiceStickiness"},
                    {"Key": "stickiness.app_cookie.duration_seconds", "Value": "900"},
                ]
            )
        },
    )
    assert "app_cookie" not in json.dumps(
        _resources(always_on[0], "AWS::ElasticLoadBalancingV2::TargetGroup")
    )


def test_fleet_groups_schedules_and_spot_price(built: Any) -> None:
    t, _, _ = built
    t.has_resource_properties(
        "AWS::AutoScaling::ScheduledAction",
        {"Recurrence": "0 8 * * 1-5", "TimeZone": "Europe/Paris", "MinSize": 2},
    )
    t.has_resource_properties(
        "AWS::AutoScaling::ScheduledAction", {"Recurrence": "0 20 * * 1-5", "TimeZone": "Europe/Paris"}
    )
    t.has_resource_properties(
        "AWS::AutoScaling::AutoScalingGroup",
        {"AutoScalingGroupName": "burst-spot", "MinSize": "0", "MaxSize": "4"},
    )
    t.has_resource_properties("AWS::AutoScaling::AutoScalingGroup", {"AutoScalingGroupName": "burst-od"})
    spot = [
        lt
        for lt in _resources(t, "AWS::EC2::LaunchTemplate").values()
        if "InstanceMarketOptions" in lt["Properties"]["LaunchTemplateData"]
    ]
    assert len(spot) == 1
    options = spot[0]["Properties"]["LaunchTemplateData"]["InstanceMarketOptions"]
    assert options["MarketType"] == "spot" and options["SpotOptions"]["MaxPrice"] == "0.25"


def test_tls_listener_and_redirect(built: Any, always_on: Any) -> None:
    t, _, _ = built
    t.has_resource_properties(
        "AWS::ElasticLoadBalancingV2::Listener",
        {"Port": 443, "Protocol": "HTTPS", "SslPolicy": "ELBSecurityPolicy-TLS13-1-2-2021-06"},
    )
    t.has_resource_properties(
        "AWS::ElasticLoadBalancingV2::Listener",
        {
            "Port": 80,
            "DefaultActions": [
                {
                    "Type": "redirect",
                    "RedirectConfig": {"Port": "443", "Protocol": "HTTPS", "StatusCode": "HTTP_301"},
                }
            ],
        },
    )
    t.has_resource_properties(
        "AWS::ElastiCache::ReplicationGroup",
        {"AtRestEncryptionEnabled": True, "TransitEncryptionEnabled": True},
    )
    # Without a domain there is no certificate: HTTP only.
    listeners = _resources(always_on[0], "AWS::ElasticLoadBalancingV2::Listener").values()
    assert {lst["Properties"]["Protocol"] for lst in listeners} == {"HTTP"}


@pytest.mark.parametrize("name", ALL)
def test_buckets_private_encrypted(name: str, request: pytest.FixtureRequest) -> None:
    t, _, _ = request.getfixturevalue(name)
    buckets = _resources(t, "AWS::S3::Bucket")
    assert len(buckets) == 2
    for b in buckets.values():
        p = b["Properties"]
        assert p["PublicAccessBlockConfiguration"] == {
            "BlockPublicAcls": True,
            "BlockPublicPolicy": True,
            "IgnorePublicAcls": True,
            "RestrictPublicBuckets": True,
        }
        assert p["BucketEncryption"]["ServerSideEncryptionConfiguration"]
        assert p["VersioningConfiguration"] == {"Status": "Enabled"}


def test_archive_lifecycle_and_object_lock(built: Any) -> None:
    from aws_cdk.assertions import Match

    t, _, _ = built
    t.has_resource_properties(
        "AWS::S3::Bucket",
        {
            "ObjectLockEnabled": True,
            "ObjectLockConfiguration": {
                "ObjectLockEnabled": "Enabled",
                "Rule": {"DefaultRetention": {"Mode": "COMPLIANCE", "Days": 365}},
            },
            "LifecycleConfiguration": {
                "Rules": [
                    Match.object_like({"Transitions": [{"StorageClass": "GLACIER", "TransitionInDays": 30}]})
                ]
            },
        },
    )


@pytest.mark.parametrize("name", ALL)
def test_cdk_nag_no_unsuppressed_error(name: str, request: pytest.FixtureRequest) -> None:
    _, _, nag_errors = request.getfixturevalue(name)
    assert nag_errors == []


@pytest.mark.parametrize("name", ALL)
def test_cfn_lint_no_errors(name: str, request: pytest.FixtureRequest) -> None:
    _need("cfnlint")
    _, path, _ = request.getfixturevalue(name)
    from cfnlint.api import ManualArgs, lint_file

    matches = lint_file(path, config=ManualArgs(regions=["us-east-1", "eu-west-3"]))
    errors = [str(m) for m in matches if m.rule.id.startswith("E")]
    assert not errors, "\n".join(errors)
    # The linter ran: a broken template is reported.
    broken = path.with_name("broken.template.json")
    broken.write_text(
        json.dumps({"Resources": {"B": {"Type": "AWS::S3::Bucket", "Properties": {"Nope": 1}}}})
    )
    assert any(m.rule.id.startswith("E") for m in lint_file(broken, config=ManualArgs(regions=["us-east-1"])))


def test_cli_synth_and_dry_run(tmp_path: Path) -> None:
    _need("aws_cdk")
    runner = CliRunner()
    cfg = ROOT / "examples/aws-always-on.yaml"
    res = runner.invoke(
        cli, ["deploy", "aws", "deploy", "-c", str(cfg), "-o", str(tmp_path / "cdk.out"), "--dry-run"]
    )
    assert res.exit_code == 0, res.output
    assert res.output.startswith("npx --yes aws-cdk@2 deploy --app ")
    assert f"--output {tmp_path / 'cdk.out'} fortress-qwen" in res.output
    res = runner.invoke(
        cli, ["deploy", "aws", "destroy", "-c", str(cfg), "-o", str(tmp_path / "x"), "--dry-run"]
    )
    assert res.output.rstrip().endswith("fortress-qwen --force")


def test_cli_without_deploy_section_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "fortress.yaml"
    cfg.write_text("server: {port: 8080}\n")
    res = CliRunner().invoke(cli, ["deploy", "aws", "synth", "-c", str(cfg), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2
    assert "no deploy.aws section" in res.output


def test_gateway_config_routes_tiers_to_the_internal_alb(ha: Any) -> None:
    t, _, _ = ha
    (param,) = _resources(t, "AWS::SSM::Parameter").values()
    text = json.dumps(param["Properties"]["Value"])
    assert "engine: external" in text and "tier: standby" in text and ":8003" in text
    assert "deploy:" not in text and "engine: vllm" not in text


# -- checkov ---------------------------------------------------------------------------------------


def _checkov() -> str:
    """checkov's command: its own environment (`make test` builds it: checkov pins boto3 to an old
    release, so it stays out of Fortress's), $FORTRESS_CHECKOV, or one on the PATH."""
    for candidate in (
        os.environ.get("FORTRESS_CHECKOV"),
        str(ROOT / ".venv" / "checkov" / "bin" / "checkov"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    found = shutil.which("checkov")
    if found:
        return found
    if CI:
        pytest.fail("checkov is not installed (make test installs it in .venv/checkov)")
    pytest.skip("checkov is not installed")


@pytest.mark.parametrize("name", ALL)
def test_checkov_no_failed_check(name: str, request: pytest.FixtureRequest) -> None:
    _, path, _ = request.getfixturevalue(name)
    # Offline: no download of external checks or guidelines.
    argv = [_checkov(), "-f", str(path), "--framework", "cloudformation", "--skip-download", "--compact"]
    run = subprocess.run([*argv, "-o", "json"], capture_output=True, text=True, timeout=300)
    assert run.returncode in (0, 1), run.stderr[-2000:]
    report = json.loads(run.stdout)
    results, summary = report["results"], report["summary"]
    failed = [f"{c['check_id']} {c['resource']}: {c['check_name']}" for c in results.get("failed_checks", [])]
    assert not failed and summary["failed"] == 0, "\n".join(failed)
    assert summary["passed"] > 50 and summary["parsing_errors"] == 0, summary  # it really checked
    # Every skip is one the template declares, with its reason.
    for c in results.get("skipped_checks", []):
        assert (c["check_result"].get("suppress_comment") or "").strip(), f"{c['check_id']} {c['resource']}"


@pytest.mark.parametrize("name", ALL)
def test_checkov_skips_each_have_a_reason(name: str, request: pytest.FixtureRequest) -> None:
    _, path, _ = request.getfixturevalue(name)
    resources = json.loads(path.read_text())["Resources"]
    skips = [
        (rid, skip)
        for rid, r in resources.items()
        for skip in r.get("Metadata", {}).get("checkov", {}).get("skip", [])
    ]
    assert skips  # the public ALB's port 80 at least
    for rid, skip in skips:
        assert skip["id"].startswith("CKV_"), (rid, skip)
        assert len(skip.get("comment", "").strip()) > 20, (rid, skip)


def test_log_groups_encrypted_with_the_stack_key(always_on: Any) -> None:
    t, _, _ = always_on
    groups = _resources(t, "AWS::Logs::LogGroup")
    assert len(groups) == 2  # flow logs, the gateway
    for g in groups.values():
        assert g["Properties"]["KmsKeyId"] == {"Fn::GetAtt": [_key_id(t, "Fortress log groups"), "Arn"]}


def _key_id(t: Any, description: str) -> str:
    (rid,) = [
        k for k, v in _resources(t, "AWS::KMS::Key").items() if v["Properties"]["Description"] == description
    ]
    return rid


# -- the Bedrock topology ------------------------------------------------------------------------


def _command(t: Any) -> str:
    (task,) = _resources(t, "AWS::ECS::TaskDefinition").values()
    (container,) = task["Properties"]["ContainerDefinitions"]
    (command,) = container["Command"]
    return str(command)


def test_bedrock_gateway_starts_the_adapters_with_up(bedrock: Any, always_on: Any) -> None:
    t, _, _ = bedrock
    assert _command(t).endswith("exec fortress up -q -c /var/lib/fortress/fortress.yaml")
    assert _command(always_on[0]).endswith("exec fortress serve -c /var/lib/fortress/fortress.yaml")
    (param,) = _resources(t, "AWS::SSM::Parameter").values()
    text = json.dumps(param["Properties"]["Value"])
    assert "engine: bedrock" in text and "anthropic.claude-3-sonnet-20240229-v1:0" in text
    (task,) = _resources(t, "AWS::ECS::TaskDefinition").values()
    assert (task["Properties"]["Cpu"], task["Properties"]["Memory"]) == ("512", "1024")
    t.has_resource_properties(
        "AWS::ApplicationAutoScaling::ScalableTarget", {"MinCapacity": 2, "MaxCapacity": 10}
    )


def test_bedrock_task_role_invokes_exactly_the_configured_model(bedrock: Any, always_on: Any) -> None:
    t, _, _ = bedrock
    statements = [
        s
        for p in _resources(t, "AWS::IAM::Policy").values()
        for s in p["Properties"]["PolicyDocument"]["Statement"]
        if any(str(a).startswith("bedrock:") for a in _list(s["Action"]))
    ]
    assert len(statements) == 1
    (stmt,) = statements
    assert sorted(_list(stmt["Action"])) == ["bedrock:InvokeModel", "bedrock:InvokeModelWithResponseStream"]
    arn = json.dumps(stmt["Resource"])
    assert ":bedrock:us-east-1::foundation-model/anthropic.claude-3-sonnet-20240229-v1:0" in arn
    assert "*" not in arn
    assert "bedrock:" not in json.dumps(_resources(always_on[0], "AWS::IAM::Policy"))


def _list(v: Any) -> list[Any]:
    return v if isinstance(v, list) else [v]


def test_bedrock_runtime_endpoint_and_no_model_servers(bedrock: Any, always_on: Any) -> None:
    t, _, _ = bedrock
    endpoints = [
        e["Properties"]
        for e in _resources(t, "AWS::EC2::VPCEndpoint").values()
        if e["Properties"].get("VpcEndpointType") == "Interface"
    ]
    assert [(e["ServiceName"], e["PrivateDnsEnabled"]) for e in endpoints] == [
        ("com.amazonaws.us-east-1.bedrock-runtime", True)
    ]
    # Nothing for model pools: no Auto Scaling group, launch template, instance role or internal ALB.
    for kind in ("AWS::AutoScaling::AutoScalingGroup", "AWS::EC2::LaunchTemplate"):
        t.resource_count_is(kind, 0)
    t.resource_count_is("AWS::ElasticLoadBalancingV2::LoadBalancer", 1)  # the public one
    assert "ec2.amazonaws.com" not in json.dumps(_resources(t, "AWS::IAM::Role"))
    assert not [
        e
        for e in _resources(always_on[0], "AWS::EC2::VPCEndpoint").values()
        if e["Properties"].get("VpcEndpointType") == "Interface"
    ]


def test_bedrock_arns_for_models_profiles_and_arns() -> None:
    _need("aws_cdk")
    from fortress.deploy.aws.gateway import bedrock_arns

    assert bedrock_arns("anthropic.claude-3-haiku-20240307-v1:0", "eu-west-3", "aws", "123456789012") == [
        "arn:aws:bedrock:eu-west-3::foundation-model/anthropic.claude-3-haiku-20240307-v1:0"
    ]
    assert bedrock_arns(
        "us.anthropic.claude-3-5-haiku-20241022-v1:0", "us-east-1", "aws", "123456789012"
    ) == [
        "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-5-haiku-20241022-v1:0",
        "arn:aws:bedrock:*::foundation-model/anthropic.claude-3-5-haiku-20241022-v1:0",
    ]
    arn = "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc"
    assert bedrock_arns(arn, "us-east-1", "aws", "123456789012") == [arn]


def test_a_bedrock_tier_behind_deployed_vllm_is_kept(tmp_path: Path) -> None:
    cfg = parse_config(
        """
pools:
  - model: llama
    replicas:
      - {engine: vllm, tier: primary, options: {model: meta-llama/Llama-3.1-8B-Instruct}}
      - {engine: bedrock, tier: secondary, options: {model_id: us.meta.llama3-1-8b-instruct-v1:0}}
deploy:
  aws:
    pools: {llama: {instance_type: g5.2xlarge}}
"""
    )
    t, _, nag_errors = _synth(cfg, tmp_path)
    assert nag_errors == []
    (param,) = _resources(t, "AWS::SSM::Parameter").values()
    text = json.dumps(param["Properties"]["Value"])
    assert "engine: external" in text and "engine: bedrock" in text and "engine: vllm" not in text
    assert "fortress up -q" in _command(t)
    assert "inference-profile/us.meta.llama3-1-8b-instruct-v1:0" in json.dumps(
        _resources(t, "AWS::IAM::Policy")
    )


def test_a_local_engine_no_pool_deploys_is_refused(tmp_path: Path) -> None:
    _need("aws_cdk")
    from fortress.deploy.aws import DeployError, synth

    cfg = parse_config(
        """
pools:
  - model: llama
    replicas: [{engine: vllm, options: {model: meta-llama/Llama-3.1-8B-Instruct}}]
deploy: {aws: {pools: {}}}
"""
    )
    with pytest.raises(DeployError, match=r"pools\[0\] \(llama\): engine vllm.*deploy.aws.pools"):
        synth(cfg, tmp_path, nag=False)


# -- blue/green deployments of the gateway --------------------------------------------------------


def _one(t: Any, kind: str) -> dict[str, Any]:
    (resource,) = _resources(t, kind).values()
    return resource["Properties"]


def _listener_id(t: Any, port: int) -> str:
    (rid,) = [
        k
        for k, v in _resources(t, "AWS::ElasticLoadBalancingV2::Listener").items()
        if v["Properties"]["Port"] == port
    ]
    return rid


def test_blue_green_service_and_deployment_group(built: Any) -> None:
    t, _, _ = built
    service = _one(t, "AWS::ECS::Service")
    assert service["DeploymentController"] == {"Type": "CODE_DEPLOY"}
    # ECS's circuit breaker belongs to its own rolling deployments, not to CodeDeploy's.
    assert "DeploymentCircuitBreaker" not in service["DeploymentConfiguration"]
    t.resource_count_is("AWS::CodeDeploy::Application", 1)
    assert _one(t, "AWS::CodeDeploy::Application") == {"ComputePlatform": "ECS"}
    group = _one(t, "AWS::CodeDeploy::DeploymentGroup")
    assert group["DeploymentStyle"] == {
        "DeploymentOption": "WITH_TRAFFIC_CONTROL",
        "DeploymentType": "BLUE_GREEN",
    }
    assert group["DeploymentConfigName"] == "CodeDeployDefault.ECSCanary10Percent5Minutes"
    assert group["ECSServices"][0]["ServiceName"]["Fn::GetAtt"][1] == "Name"
    (pair,) = group["LoadBalancerInfo"]["TargetGroupPairInfoList"]
    # Blue (the production listener's) and green (the test listener's): two gateway target groups.
    names = [tg["Name"]["Fn::GetAtt"][0] for tg in pair["TargetGroups"]]
    gateway_groups = {
        k
        for k, v in _resources(t, "AWS::ElasticLoadBalancingV2::TargetGroup").items()
        if v["Properties"]["Port"] == 8080
    }
    assert len(names) == 2 and set(names) == gateway_groups
    assert pair["ProdTrafficRoute"] == {"ListenerArns": [{"Ref": _listener_id(t, 443)}]}
    assert pair["TestTrafficRoute"] == {"ListenerArns": [{"Ref": _listener_id(t, 8443)}]}
    test = _resources(t, "AWS::ElasticLoadBalancingV2::Listener")[_listener_id(t, 8443)]["Properties"]
    assert test["Protocol"] == "HTTPS" and test["SslPolicy"] == "ELBSecurityPolicy-TLS13-1-2-2021-06"
    # Rolled back on failure, on a stop, and while the gateway's 5xx alarm fires.
    assert group["AutoRollbackConfiguration"] == {
        "Enabled": True,
        "Events": ["DEPLOYMENT_FAILURE", "DEPLOYMENT_STOP_ON_REQUEST", "DEPLOYMENT_STOP_ON_ALARM"],
    }
    ((alarm_id,),) = [[a["Name"]["Ref"]] for a in group["AlarmConfiguration"]["Alarms"]]
    assert (
        _resources(t, "AWS::CloudWatch::Alarm")[alarm_id]["Properties"]["AlarmName"] == "fortress-errors_5xx"
    )
    assert group["BlueGreenDeploymentConfiguration"]["TerminateBlueInstancesOnDeploymentSuccess"] == {
        "Action": "TERMINATE",
        "TerminationWaitTimeInMinutes": 5,
    }


def test_cdk_deploy_of_a_new_revision_starts_a_codedeploy_deployment(built: Any) -> None:
    t, _, _ = built
    (task_id,) = _resources(t, "AWS::ECS::TaskDefinition")
    # The service names the family alone: CloudFormation never swaps its revision itself.
    assert isinstance(_one(t, "AWS::ECS::Service")["TaskDefinition"], str)
    deploy = _one(t, "Custom::AWS")
    create, update = _joined(deploy["Create"]), _joined(deploy["Update"])
    assert '"action":"getDeploymentGroup"' in create and "createDeployment" not in create
    assert '"action":"createDeployment"' in update and "AppSpecContent" in update
    # The AppSpec names the new revision: the task definition's ARN (its Ref).
    assert f'TaskDefinition\\": \\"{{"Ref": "{task_id}"}}' in update
    assert "ContainerName" in update and "8080" in update
    (policy,) = [
        p["Properties"]["PolicyDocument"]
        for p in _resources(t, "AWS::IAM::Policy").values()
        if "codedeploy:CreateDeployment" in json.dumps(p)
    ]
    actions = sorted(a for s in policy["Statement"] for a in _list(s["Action"]))
    assert actions == [
        "codedeploy:CreateDeployment",
        "codedeploy:GetApplicationRevision",
        "codedeploy:GetDeploymentConfig",
        "codedeploy:GetDeploymentGroup",
        "codedeploy:RegisterApplicationRevision",
    ]
    assert "*" not in json.dumps([s["Resource"] for s in policy["Statement"]])


def _joined(value: Any) -> str:
    """An ``Fn::Join`` of strings and references as one string, each reference as its JSON."""
    return "".join(p if isinstance(p, str) else json.dumps(p) for p in value["Fn::Join"][1])


def test_blue_green_without_domain(blue_green_http: Any) -> None:
    t, _, _ = blue_green_http
    group = _one(t, "AWS::CodeDeploy::DeploymentGroup")
    assert group["DeploymentConfigName"] == "CodeDeployDefault.ECSAllAtOnce"
    # No 5xx rule in the config: no alarm to watch, rollback on failure and stop only.
    assert "AlarmConfiguration" not in group
    assert group["AutoRollbackConfiguration"]["Events"] == [
        "DEPLOYMENT_FAILURE",
        "DEPLOYMENT_STOP_ON_REQUEST",
    ]
    (pair,) = group["LoadBalancerInfo"]["TargetGroupPairInfoList"]
    assert pair["ProdTrafficRoute"] == {"ListenerArns": [{"Ref": _listener_id(t, 80)}]}
    assert pair["TestTrafficRoute"] == {"ListenerArns": [{"Ref": _listener_id(t, 8080)}]}
    # The test listener is closed to the world: the public ALB admits port 80 alone.
    (lb_sg,) = [
        v["Properties"]
        for v in _resources(t, "AWS::EC2::SecurityGroup").values()
        if v["Properties"]["GroupDescription"] == "Fortress public ALB"
    ]
    assert [(r["FromPort"], r["CidrIp"]) for r in lb_sg["SecurityGroupIngress"]] == [(80, "0.0.0.0/0")]


def test_rolling_keeps_ecs_circuit_breaker(always_on: Any) -> None:
    t, _, _ = always_on
    service = _one(t, "AWS::ECS::Service")
    assert service.get("DeploymentController", {"Type": "ECS"}) == {"Type": "ECS"}
    assert service["DeploymentConfiguration"]["DeploymentCircuitBreaker"] == {
        "Enable": True,
        "Rollback": True,
    }
    for kind in ("AWS::CodeDeploy::Application", "AWS::CodeDeploy::DeploymentGroup", "Custom::AWS"):
        t.resource_count_is(kind, 0)
    t.resource_count_is("AWS::ElasticLoadBalancingV2::Listener", 1 + 1)  # public :80, the tier's


def test_blue_green_config() -> None:
    from fortress.config import ConfigError

    gw = parse_config("deploy: {aws: {gateway: {deployment: blue_green}}}").deploy.aws
    assert gw is not None and gw.gateway.blue_green_traffic == "canary_10_5m"
    with pytest.raises(ConfigError, match=r"blue_green_traffic applies only to deployment: blue_green"):
        parse_config("deploy: {aws: {gateway: {blue_green_traffic: all_at_once}}}")
    with pytest.raises(ConfigError, match=r"blue_green_traffic"):
        parse_config("deploy: {aws: {gateway: {deployment: blue_green, blue_green_traffic: fast}}}")


# -- secrets of the model servers -----------------------------------------------------------------


def _user_data(t: Any) -> dict[str, str]:
    """Each launch template's user data as one string (its tokens as JSON), by template id."""
    return {
        k: json.dumps(v["Properties"]["LaunchTemplateData"]["UserData"])
        for k, v in _resources(t, "AWS::EC2::LaunchTemplate").items()
    }


def test_env_secrets_fetched_at_boot_into_a_root_only_file(built: Any, always_on: Any) -> None:
    t, _, _ = built
    scripts = list(_user_data(t).values())
    assert len(scripts) == 3  # llama's primary, burst's spot and on-demand
    llama = [s for s in scripts if "hf-token-AbCdEf" in s]
    assert len(llama) == 1
    (script,) = llama
    assert "secretsmanager get-secret-value" in script
    assert "arn:aws:secretsmanager:eu-west-3:123456789012:secret:hf-token-AbCdEf eu-west-3" in script
    assert "EnvironmentFile=/etc/fortress/vllm-secrets.env" in script
    assert "umask 077" in script and "install -d -m 0700" in script
    assert "HF_TOKEN" in script and "WANDB" not in script
    # Names resolve in the stack's region; each pool's user data names its own secrets only.
    burst = [s for s in scripts if "fortress/wandb" in s]
    assert len(burst) == 2 and all("fortress/hf-token eu-west-3" in s for s in burst)
    # No value: the user data holds the command that reads it, never what it reads.
    assert all("SecretString" in s and "--output text" in s for s in [*llama, *burst])
    assert "EnvironmentFile" not in json.dumps(_user_data(always_on[0]))


def test_env_secrets_role_reads_exactly_those_secrets(built: Any, always_on: Any) -> None:
    t, _, _ = built
    statements = [
        (p["Properties"]["Roles"], s)
        for p in _resources(t, "AWS::IAM::Policy").values()
        for s in p["Properties"]["PolicyDocument"]["Statement"]
        if "secretsmanager:GetSecretValue" in _list(s["Action"]) and "ReadModelServerSecrets" == s.get("Sid")
    ]
    assert len(statements) == 2  # one role per pool with secrets
    by_role = {json.dumps(roles): stmt for roles, stmt in statements}
    resources = sorted(json.dumps(stmt["Resource"]) for stmt in by_role.values())
    for stmt in by_role.values():
        assert stmt["Action"] == "secretsmanager:GetSecretValue"
    assert '"arn:aws:secretsmanager:eu-west-3:123456789012:secret:hf-token-AbCdEf"' in resources
    burst = next(r for r in resources if "wandb" in r)
    assert "secret:fortress/hf-token-??????" in burst and "secret:fortress/wandb-??????" in burst
    assert "hf-token-AbCdEf" not in burst
    # Each launch template's instance profile holds the role that reads its pool's secrets.
    profiles = _resources(t, "AWS::IAM::InstanceProfile")
    for script_id, script in _user_data(t).items():
        data = _resources(t, "AWS::EC2::LaunchTemplate")[script_id]["Properties"]["LaunchTemplateData"]
        (role,) = profiles[data["IamInstanceProfile"]["Arn"]["Fn::GetAtt"][0]]["Properties"]["Roles"]
        readable = json.dumps(by_role[json.dumps([role])]["Resource"])
        assert ("wandb" in readable) == ("fortress/wandb" in script)
    # Without env_secrets the instance role reads no secret.
    instance_roles = [
        k
        for k, v in _resources(always_on[0], "AWS::IAM::Role").items()
        if "ec2.amazonaws.com" in json.dumps(v)
    ]
    assert instance_roles and not [
        p
        for p in _resources(always_on[0], "AWS::IAM::Policy").values()
        if "secretsmanager" in json.dumps(p)
        and any(r["Ref"] in instance_roles for r in p["Properties"]["Roles"])
    ]


def test_env_secret_arns_for_names_and_arns() -> None:
    _need("aws_cdk")
    from fortress.deploy.aws.model_pools import secret_arn, secret_region

    arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:hf-AbCdEf"
    assert secret_arn(arn, "aws", "us-east-1", "123456789012") == arn
    assert secret_region(arn, "us-east-1") == "eu-west-1"
    assert secret_arn("hf/token", "aws", "us-east-1", "123456789012") == (
        "arn:aws:secretsmanager:us-east-1:123456789012:secret:hf/token-??????"
    )
    assert secret_region("hf/token", "us-east-1") == "us-east-1"
