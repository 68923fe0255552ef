"""The aws provider against moto's EC2 Auto Scaling: desired capacities, instances that become
replicas, drains before terminations, a spot interruption replaced at once, spot refused with
on-demand taking the rest and giving it back, and a restarted gateway adopting what runs.

What moto cannot show (docs/fleet.md says so too): real launch failures for lack of spot
capacity (here the spot group's max size refuses the capacity), the two-minute notice itself
(delivered here as the admin call an EventBridge rule would make), lifecycle hooks holding an
instance in Terminating:Wait, instances that take minutes to boot, and the metrics EC2 and the
CloudWatch agent publish (the tests publish them).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto import mock_aws

from fortress.config import parse_config
from fortress.fleet.controller import Fleet, PoolController
from fortress.fleet.providers.aws import AwsProvider
from fortress.routing.pool import Router
from fortress.routing.replica import OriginKind

REGION = "us-east-1"


@pytest.fixture
def asg(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with mock_aws():
        ec2 = boto3.client("ec2", region_name=REGION)
        ami = ec2.describe_images()["Images"][0]["ImageId"]
        ec2.create_launch_template(
            LaunchTemplateName="vllm", LaunchTemplateData={"ImageId": ami, "InstanceType": "g5.xlarge"}
        )
        client = boto3.client("autoscaling", region_name=REGION)
        for name, size in (("llm-spot", 4), ("llm-od", 4)):
            client.create_auto_scaling_group(
                AutoScalingGroupName=name,
                LaunchTemplate={"LaunchTemplateName": "vllm"},
                MinSize=0,
                MaxSize=size,
                DesiredCapacity=0,
                AvailabilityZones=[f"{REGION}a"],
            )
        yield client


def config(target: dict[str, float] | None = None, **aws: Any) -> Any:
    fleet = {
        "target": target or {},
        "provider": "aws",
        "min_replicas": 0,
        "max_replicas": 4,
        "capacity": ["spot", "on-demand"],
        "aws": {
            "region": REGION,
            "groups": {"spot": "llm-spot", "on-demand": "llm-od"},
            "port": 8000,
            "poll_interval": 3600,  # the tests drive each round
            "spot_fallback_after": 30,
            "return_to_spot_after": 600,
            **aws,
        },
    }
    doc = {"pools": [{"model": "m", "name": "m", "deregistration_delay": 0, "fleet": fleet}]}
    return parse_config(json.dumps(doc), "t", env={})


class World:
    """A gateway's router and fleet over the mocked groups, on a clock the test moves."""

    def __init__(self, cfg: Any) -> None:
        self.now = 1000.0
        self.router = Router(cfg, clock=lambda: self.now)
        self.fleet = Fleet(cfg, self.router, None, clock=lambda: self.now)
        self.c: PoolController = self.fleet.controllers["m"]
        assert isinstance(self.c.provider, AwsProvider)
        self.p: AwsProvider = self.c.provider

    async def start(self) -> None:
        await self.fleet.start()

    async def round(self) -> None:
        """What the background loops do: settle jobs (drains, terminations), size the groups,
        read them, let the controller register what is in service."""
        for _ in range(3):
            if self.p._jobs:
                await asyncio.gather(*list(self.p._jobs))
            await self.p.step()
            self.c.tick()
            await asyncio.sleep(0)

    def group(self, name: str) -> dict[str, Any]:
        client = boto3.client("autoscaling", region_name=REGION)
        (g,) = client.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
        return g

    def in_service(self, name: str) -> list[str]:
        return sorted(
            i["InstanceId"] for i in self.group(name)["Instances"] if i["LifecycleState"] == "InService"
        )

    def replicas(self) -> dict[str, str]:
        return {r.name: r.url for r in self.router.all_replicas() if r.origin.kind is OriginKind.FLEET}

    async def stop(self) -> None:
        await self.fleet.stop()


async def test_scale_out_and_in_sets_desired_capacity_and_instances_become_replicas(asg: Any) -> None:
    w = World(config())
    await w.start()
    assert w.p.want == 0 and w.replicas() == {}
    w.c.scale(2)
    await w.round()
    assert w.group("llm-spot")["DesiredCapacity"] == 2 and w.group("llm-od")["DesiredCapacity"] == 0
    spot = w.in_service("llm-spot")
    assert len(spot) == 2
    ec2 = boto3.client("ec2", region_name=REGION)
    ips = {
        i["InstanceId"]: i["PrivateIpAddress"]
        for r in ec2.describe_instances(InstanceIds=spot)["Reservations"]
        for i in r["Instances"]
    }
    assert w.replicas() == {iid: f"http://{ip}:8000" for iid, ip in ips.items()}
    status = w.c.status()
    assert status["current"] == 2 and {i["capacity"] for i in status["instances"]} == {"spot"}
    assert {i["version"] for i in status["instances"]} == {"vllm:1"}  # its launch template and version
    # In: the controller picks one, it is drained, then terminated with the group decremented.
    w.c.scale(1)
    await w.round()
    assert w.group("llm-spot")["DesiredCapacity"] == 1
    left = w.in_service("llm-spot")
    assert len(left) == 1 and set(w.replicas()) == set(left)
    assert [(d["from"], d["to"]) for d in w.c.decisions] == [(0, 2), (2, 1)]
    await w.stop()


async def test_capacity_asked_but_not_yet_given_to_a_group_is_not_asked_again(asg: Any) -> None:
    # The controller ticks faster than a round of AWS calls: what it asked for must count as on
    # its way before any group has it, or each tick asks again.
    w = World(config())
    await w.start()
    w.c.scale(2)
    for _ in range(3):
        w.c.tick()  # no provider round in between
    assert w.p.want == 2
    assert [i.state for i in w.p.instances()] == ["provisioning", "provisioning"]
    await w.round()
    assert w.group("llm-spot")["DesiredCapacity"] == 2 and w.p.want == 2
    await w.stop()


async def test_a_spot_interruption_drains_the_instance_and_the_group_replaces_it(asg: Any) -> None:
    w = World(config())
    await w.start()
    w.c.scale(2)
    await w.round()
    before = w.in_service("llm-spot")
    victim = before[0]
    status, body = await w.fleet.handle_admin(
        "POST", "/admin/fleet/m/interruption", json.dumps({"instance_id": victim}).encode()
    ) or (0, None)
    assert status == 202 and body["draining"], body
    await w.round()
    after = w.in_service("llm-spot")
    assert victim not in after and len(after) == 2, (before, after)
    assert w.group("llm-spot")["DesiredCapacity"] == 2  # not decremented: replaced
    assert victim not in w.replicas() and set(w.replicas()) == set(after)
    assert w.c.stats()["spot_interruptions"] == 1
    unknown = await w.fleet.handle_admin("POST", "/admin/fleet/m/interruption", b'{"instance_id": "i-nope"}')
    assert unknown is not None and unknown[0] == 404
    await w.stop()


async def test_spot_refused_falls_back_to_on_demand_and_returns_when_spot_can(asg: Any) -> None:
    asg.update_auto_scaling_group(AutoScalingGroupName="llm-spot", MaxSize=1)
    w = World(config())
    await w.start()
    w.c.scale(3)
    await w.round()
    assert (w.group("llm-spot")["DesiredCapacity"], w.group("llm-od")["DesiredCapacity"]) == (1, 2)
    assert len(w.replicas()) == 3 and w.p.fallbacks == 1
    caps = sorted(i["capacity"] for i in w.c.status()["instances"])
    assert caps == ["on-demand", "on-demand", "spot"]
    # Spot has room again; nothing changes before return_to_spot_after.
    asg.update_auto_scaling_group(AutoScalingGroupName="llm-spot", MaxSize=4)
    w.now += 300
    await w.round()
    assert w.group("llm-od")["DesiredCapacity"] == 2
    w.now += 301
    await w.round()
    await w.round()
    # Spot took it all back; on-demand was drained only once spot served.
    assert (w.group("llm-spot")["DesiredCapacity"], w.group("llm-od")["DesiredCapacity"]) == (3, 0)
    assert set(w.replicas()) == set(w.in_service("llm-spot")) and len(w.replicas()) == 3
    await w.stop()


async def test_a_spot_group_short_of_its_capacity_for_too_long_falls_back() -> None:
    # No moto here: a group that keeps its desired capacity but never gets the instances (what
    # real spot shortages look like) is read from a stub.
    class Stub:
        def __init__(self) -> None:
            self.desired = {"s": 0, "o": 0}
            self.calls: list[tuple[str, int]] = []

        def describe_auto_scaling_groups(self, AutoScalingGroupNames: list[str]) -> Any:
            groups = []
            for name in AutoScalingGroupNames:
                n = self.desired[name] if name == "o" else 0  # spot never launches
                inst = [{"InstanceId": f"i-{name}{k}", "LifecycleState": "InService"} for k in range(n)]
                groups.append(
                    {
                        "AutoScalingGroupName": name,
                        "DesiredCapacity": self.desired[name],
                        "MaxSize": 9,
                        "Instances": inst,
                    }
                )
            return {"AutoScalingGroups": groups}

        def describe_instances(self, InstanceIds: list[str]) -> Any:
            return {
                "Reservations": [
                    {"Instances": [{"InstanceId": i, "PrivateIpAddress": "10.0.0.9"} for i in InstanceIds]}
                ]
            }

        def set_desired_capacity(self, AutoScalingGroupName: str, DesiredCapacity: int, **_: Any) -> None:
            self.desired[AutoScalingGroupName] = DesiredCapacity
            self.calls.append((AutoScalingGroupName, DesiredCapacity))

    stub = Stub()

    class Session:
        def client(self, *_: Any, **__: Any) -> Stub:
            return stub

    cfg = config(groups={"spot": "s", "on-demand": "o"})
    now = [1000.0]

    async def drain(name: str, limit: float | None) -> None:
        return None

    p = AwsProvider("m", cfg.pools[0].fleet, drain, clock=lambda: now[0], session=Session())
    await p.refresh()
    p.launch(2)
    await p.step()
    assert stub.desired == {"s": 2, "o": 0}
    now[0] += 29
    await p.step()
    assert stub.desired["o"] == 0  # short for 29 s: still waiting for spot
    now[0] += 2
    await p.step()
    assert stub.desired == {"s": 0, "o": 2} and p.fallbacks == 1
    # Spot's desired was lowered to what it has (nothing): no instance was terminated for it.
    assert ("s", 0) in stub.calls
    await p.close()


async def test_a_restarted_gateway_adopts_the_instances_that_run(asg: Any) -> None:
    w = World(config())
    await w.start()
    w.c.scale(2)
    await w.round()
    running = w.in_service("llm-spot")
    await w.stop()
    # A new gateway over the same groups: it launches nothing and routes to what runs.
    again = World(config())
    await again.start()
    assert again.p.want == 2
    await again.round()
    assert again.in_service("llm-spot") == running and set(again.replicas()) == set(running)
    assert again.group("llm-spot")["DesiredCapacity"] == 2
    await again.stop()


def test_an_aws_fleet_is_configured_by_its_groups() -> None:
    cfg = config()
    fleet = cfg.pools[0].fleet
    assert fleet.capacity_order == ["spot", "on-demand"]
    bad = [
        ({"provider": "aws"}, "needs an `aws:` section"),
        ({"provider": "aws", "aws": {"groups": {"spot": "a"}}, "capacity": ["on-demand"]}, "has no group"),
        ({"aws": {"groups": {"spot": "a"}}}, "for provider: aws"),
    ]
    for fleet_doc, message in bad:
        doc = {"pools": [{"model": "m", "fleet": fleet_doc}]}
        with pytest.raises(Exception, match=message):
            parse_config(json.dumps(doc), "t", env={})
    doc = {
        "pools": [
            {
                "model": "m",
                "fleet": {"provider": "aws", "aws": {"groups": {"spot": "a"}}},
                "replicas": [{"engine": "sim"}],
            }
        ]
    }
    with pytest.raises(Exception, match="no `replicas:`"):
        parse_config(json.dumps(doc), "t", env={})


async def test_a_roll_of_an_aws_pool_is_an_instance_refresh_rolled_back_by_the_group_when_it_fails(
    asg: Any,
) -> None:
    # moto has no instance refreshes: its client answers everything else, a stub these two calls.
    w = World(config())
    await w.start()
    w.c.scale(2)
    await w.round()
    calls: list[dict[str, Any]] = []
    outcomes = iter(["InProgress", "Successful", "InProgress", "RollbackSuccessful"])
    real = w.p._call

    def call(op: str, **kw: Any) -> Any:
        if op == "start_instance_refresh":
            calls.append(kw)
            return {"InstanceRefreshId": f"r-{len(calls)}"}
        if op == "describe_instance_refreshes":
            status = next(outcomes)
            reason = "new instances failed their health checks" if status.startswith("Rollback") else ""
            return {"InstanceRefreshes": [{"Status": status, "StatusReason": reason}]}
        return real(op, **kw)

    w.p._call = call  # type: ignore[method-assign]
    w.p.cfg = w.p.cfg.replace(poll_interval=0.01)
    status, body = await w.fleet.handle_admin("POST", "/admin/fleet/m/roll", b"{}") or (0, None)
    assert status == 200 and not body["roll"]["rolled_back"], body
    assert calls[0]["AutoScalingGroupName"] == "llm-spot"  # only the group with instances
    prefs = calls[0]["Preferences"]
    assert (prefs["MinHealthyPercentage"], prefs["MaxHealthyPercentage"], prefs["AutoRollback"]) == (
        100,
        200,
        True,
    )
    assert prefs["SkipMatching"] is True
    status, body = await w.fleet.handle_admin("POST", "/admin/fleet/m/roll", b'{"force": true}') or (0, None)
    assert status == 502 and body["roll"]["rolled_back"], body
    assert "RollbackSuccessful (new instances failed their health checks)" in body["roll"]["detail"]
    assert calls[1]["Preferences"]["SkipMatching"] is False
    assert [r["rolled_back"] for r in w.c.status()["rolls"]] == [False, True]
    await w.stop()


async def test_bad_fleet_requests_are_refused_with_the_reason(asg: Any) -> None:
    w = World(config())
    await w.start()
    cases = [
        ("/admin/fleet/m/interruption", b"{}", 400, "instance_id"),
        ("/admin/fleet/m/roll", b'{"strategy": "sideways"}', 400, "rolling or blue-green"),
        ("/admin/fleet/m/scale", b'{"timeout": "soon"}', 400, "Bad request"),
        ("/admin/fleet/m/scale", b"[1, 2]", 400, "JSON object"),
        ("/admin/fleet/m/explode", b"{}", 404, "Unknown path"),
    ]
    for path, body, status, words in cases:
        answer = await w.fleet.handle_admin("POST", path, body)
        assert answer is not None and answer[0] == status, (path, answer)
        assert words in answer[1]["error"]["message"] + str(answer[1]["error"]["param"]), answer
    wrong = await w.fleet.handle_admin("GET", "/admin/fleet/m/scale", b"")
    assert wrong is not None and wrong[0] == 405
    await w.stop()


async def test_a_spot_group_whose_api_refuses_the_capacity_falls_back_at_once() -> None:
    class Refusing:
        def __init__(self) -> None:
            self.desired = {"s": 0, "o": 0}

        def describe_auto_scaling_groups(self, AutoScalingGroupNames: list[str]) -> Any:
            groups = []
            for name in AutoScalingGroupNames:
                n = self.desired[name]
                inst = [{"InstanceId": f"i-{name}{k}", "LifecycleState": "InService"} for k in range(n)]
                groups.append(
                    {"AutoScalingGroupName": name, "DesiredCapacity": n, "MaxSize": 9, "Instances": inst}
                )
            return {"AutoScalingGroups": groups}

        def describe_instances(self, InstanceIds: list[str]) -> Any:
            return {"Reservations": [{"Instances": [{"InstanceId": i} for i in InstanceIds]}]}

        def set_desired_capacity(self, AutoScalingGroupName: str, DesiredCapacity: int, **_: Any) -> None:
            if AutoScalingGroupName == "s":
                raise RuntimeError("InsufficientInstanceCapacity: no spot capacity in this zone")
            self.desired[AutoScalingGroupName] = DesiredCapacity

    stub = Refusing()

    class Session:
        def client(self, *_: Any, **__: Any) -> Refusing:
            return stub

    async def drain(name: str, limit: float | None) -> None:
        return None

    cfg = config(groups={"spot": "s", "on-demand": "o"})
    p = AwsProvider("m", cfg.pools[0].fleet, drain, session=Session())
    await p.refresh()
    p.launch(2)
    await p.step()
    await p.step()
    assert stub.desired == {"s": 0, "o": 2} and p.fallbacks == 1
    assert p.last_error is not None and "InsufficientInstanceCapacity" in p.last_error
    await p.close()


def _put(name: str, namespace: str, metric: str, value: float) -> None:
    from datetime import UTC, datetime

    boto3.client("cloudwatch", region_name=REGION).put_metric_data(
        Namespace=namespace,
        MetricData=[
            {
                "MetricName": metric,
                "Dimensions": [{"Name": "AutoScalingGroupName", "Value": name}],
                "Timestamp": datetime.now(UTC),
                "Value": value,
                "Unit": "Percent",
            }
        ],
    )


async def test_cpu_and_gpu_targets_read_cloudwatch_per_group_weighted_by_instances(asg: Any) -> None:
    w = World(config(target={"cpu": 70, "gpu": 60}, metrics_interval=60))
    await w.start()
    w.c.scale(3)
    await w.round()
    assert w.p.cpu_percent() is None and w.p.gpu_percent() is None  # nothing published yet
    _put("llm-spot", "AWS/EC2", "CPUUtilization", 90.0)
    _put("llm-od", "AWS/EC2", "CPUUtilization", 10.0)  # no instance in service: no say
    _put("llm-spot", "CWAgent", "nvidia_smi_utilization_gpu", 97.0)
    w.now += 61  # one metrics_interval later
    await w.round()
    assert w.p.cpu_percent() == 90.0 and w.p.gpu_percent() == 97.0
    # The controller's signals carry them, and the targets ask for more:
    # cpu ceil(3 * 90 / 70) = 4, gpu ceil(3 * 97 / 60) = 5.
    signals = w.c.read_signals()
    assert signals.metrics["cpu"] == 90.0 and signals.metrics["gpu"] == 97.0, signals
    # (No health checks run here: as if the three had passed theirs.)
    rec, words = w.c.autoscaler.recommend(dataclasses.replace(signals, ready=3))
    assert rec == 5 and "gpu 97" in words, (rec, words)
    # Weighted by instances in service: 3 spot at 90, 1 on-demand at 10 -> 70.
    w.p.groups["on-demand"].in_service = 1
    w.p.groups["spot"].in_service = 3
    assert w.p._read_utilisation()["cpu"] == (3 * 90.0 + 10.0) / 4
    # A reading older than five intervals is no signal: the target has no say.
    w.now += 5 * 60 + 1
    assert w.p.cpu_percent() is None and w.p.gpu_percent() is None
    await w.stop()


async def test_cloudwatch_down_is_no_signal_and_an_error_not_a_crash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Flaky:
        down = True

        def get_metric_data(self, **_: Any) -> Any:
            if self.down:
                raise RuntimeError("Throttling: Rate exceeded")
            return {"MetricDataResults": [{"Id": "cpu0", "Timestamps": [1], "Values": [42.0]}]}

    async def drain(name: str, limit: float | None) -> None:
        return None

    now = [0.0]
    p = AwsProvider("m", config().pools[0].fleet, drain, clock=lambda: now[0])
    p.read_cpu = True
    p.groups["spot"].in_service = 2
    p._cw = cw = Flaky()
    caplog.set_level("DEBUG", logger="fortress.fleet")
    for _ in range(3):  # three intervals of an outage: one warning, not three
        await p._utilisation()
        now[0] += p.cfg.metrics_interval
    assert p.cpu_percent() is None
    assert p.metrics_error is not None and "cannot read CloudWatch: Throttling" in p.metrics_error
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "Throttling" in warnings[0].getMessage(), warnings
    cw.down = False
    await p._utilisation()
    assert p.cpu_percent() == 42.0 and p.metrics_error is None
    assert any(r.levelname == "INFO" and "CloudWatch answers again" in r.getMessage() for r in caplog.records)


def test_fortress_serve_runs_a_config_whose_only_pool_is_an_aws_fleet(tmp_path: Any) -> None:
    """A deployed gateway's config may have no replicas at all, only an aws fleet: `fortress
    serve` starts on it, and its fleet sizes the group (moto's server stands in for AWS)."""
    import yaml
    from helpers import Proc, fortress_argv, free_port, http_get, wait_http
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    creds = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION}
    kw = {"region_name": REGION, "endpoint_url": endpoint, "aws_access_key_id": "testing",
          "aws_secret_access_key": "testing"}  # fmt: skip
    gw: Proc | None = None
    try:
        ec2 = boto3.client("ec2", **kw)
        ami = ec2.describe_images()["Images"][0]["ImageId"]
        ec2.create_launch_template(LaunchTemplateName="vllm", LaunchTemplateData={"ImageId": ami})
        client = boto3.client("autoscaling", **kw)
        for name in ("g-spot", "g-od"):
            client.create_auto_scaling_group(
                AutoScalingGroupName=name,
                LaunchTemplate={"LaunchTemplateName": "vllm"},
                MinSize=0,
                MaxSize=2,
                DesiredCapacity=0,
                AvailabilityZones=[f"{REGION}a"],
            )
        config = {
            "state_dir": str(tmp_path / "state"),
            "auth": {"enabled": False},
            "audit": {"enabled": False},
            "pools": [
                {
                    "model": "m",
                    "fleet": {
                        "provider": "aws",
                        "min_replicas": 1,
                        "max_replicas": 2,
                        "interval": 0.5,
                        "aws": {
                            "region": REGION,
                            "endpoint_url": endpoint,
                            "groups": {"spot": "g-spot", "on-demand": "g-od"},
                            "poll_interval": 0.5,
                        },
                    },
                }
            ],
        }
        path = tmp_path / "fortress.yaml"
        path.write_text(yaml.safe_dump(config))
        gw_port = free_port()
        gw = Proc(fortress_argv("serve", "-c", str(path), "--port", str(gw_port)), tmp_path / "gw.log", creds)
        url = f"http://127.0.0.1:{gw_port}"
        wait_http(url + "/health", timeout=30)
        # The fleet's minimum reaches the preferred group, and its instance becomes a replica.
        pool: dict[str, Any] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            status, body = http_get(url + "/admin/fleet")
            assert status == 200, body
            (pool,) = json.loads(body)["pools"]
            if pool["current"] == 1 and [i for i in pool["instances"] if i["id"].startswith("i-")]:
                break
            time.sleep(0.25)
        (group,) = client.describe_auto_scaling_groups(AutoScalingGroupNames=["g-spot"])["AutoScalingGroups"]
        assert group["DesiredCapacity"] == 1, json.dumps(pool["decisions"])
        (instance,) = pool["instances"]
        assert instance["capacity"] == "spot" and instance["id"] == group["Instances"][0]["InstanceId"], pool
        # AWS unreachable for a while (ten polls): one warning in the log, not one per poll.
        server.stop()
        time.sleep(5)
        lines = [line for line in gw.output().splitlines() if "cannot read" in line]
        assert len(lines) == 1 and "WARNING" in lines[0], lines
        status, body = http_get(url + "/admin/fleet")
        assert status == 200 and json.loads(body)["pools"][0]["provider_stats"]["last_error"], body
    finally:
        if gw is not None:
            gw.stop()
        server.stop()
