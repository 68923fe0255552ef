"""Alarms with a controlled clock: each default rule goes PENDING → FIRING → RESOLVED → OK at the
right evaluation; notifications reach a webhook (exactly the expected ones), SNS (botocore
Stubber) and the log; a real gateway fires and resolves the unhealthy-replica alarm; under
`fortress up`, a local replica killed with SIGKILL is counted as restarted and down, and alarms."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import boto3
import orjson
import pytest
import yaml
from aiohttp import web
from botocore.stub import Stubber
from helpers import (
    Proc,
    children_of,
    fortress_argv,
    free_port,
    http_get,
    wait_for,
    wait_http,
    write_up_config,
)
from prometheus_client.parser import text_string_to_metric_families

from fortress.config import AlarmRule, default_alarm_rules, parse_config
from fortress.observe.alarms import AlarmEvaluator, AlarmEvent, AlarmState, Signals
from fortress.observe.notify import LogNotifier, SnsNotifier, WebhookNotifier, build_notifiers
from fortress.observe.window import GaugeSeries, RecentTraffic
from fortress.routing.pool import Router
from fortress.routing.replica import State

OK, PENDING, FIRING, RESOLVED = AlarmState.OK, AlarmState.PENDING, AlarmState.FIRING, AlarmState.RESOLVED
WALL0 = 1_750_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def setup(
    rules: list[AlarmRule] | None = None, router: Router | None = None, notifiers: list[Any] | None = None
) -> tuple[Clock, RecentTraffic, GaugeSeries, AlarmEvaluator]:
    clock = Clock()
    recent = RecentTraffic(horizon=900, clock=clock)
    gpu = GaugeSeries()
    ev = AlarmEvaluator(
        rules if rules is not None else default_alarm_rules(),
        Signals(recent, router, gpu),
        notifiers or [],
        every=10,
        clock=clock,
        wall=lambda: WALL0 + clock.t,
    )
    return clock, recent, gpu, ev


def states(ev: AlarmEvaluator) -> dict[str, AlarmState]:
    return {a.rule.name: a.state for a in ev.alarms}


def run(
    ev: AlarmEvaluator,
    clock: Clock,
    until: int,
    traffic: Any = None,
    watch: tuple[str, ...] = (),
) -> tuple[dict[str, list[tuple[int, AlarmState]]], list[tuple[int, AlarmEvent]]]:
    """Advance second by second to ``until``: traffic(t) each second, an evaluation every 10 s.
    Returns each watched alarm's state changes (time, state) and every event."""
    changes: dict[str, list[tuple[int, AlarmState]]] = {name: [] for name in watch}
    events: list[tuple[int, AlarmEvent]] = []
    last = states(ev)
    for t in range(until + 1):
        clock.t = float(t)
        if traffic is not None:
            traffic(t)
        if t % 10 == 0:
            events += [(t, e) for e in ev.evaluate()]
            now = states(ev)
            for name in watch:
                if now[name] != last[name]:
                    changes[name].append((t, now[name]))
            last = now
    return changes, events


def test_latency_warning_and_page() -> None:
    """70 s answers for 5 minutes, then 1 s answers: page fires after 1 min, warning after 3."""
    clock, recent, _, ev = setup()

    def traffic(t: int) -> None:
        if t < 300:
            recent.add(t, 200, 70.0)
        else:
            recent.add(t, 200, 1.0)

    changes, events = run(ev, clock, 360, traffic, watch=("latency_warning", "latency_page"))
    # Average over the last 60 s at t: (70·(359-t) + (t-299)) / 60; below 60 from t = 308,
    # below 30 from t = 334 (evaluations every 10 s).
    assert changes["latency_page"] == [(0, PENDING), (60, FIRING), (310, RESOLVED), (320, OK)]
    assert changes["latency_warning"] == [(0, PENDING), (180, FIRING), (340, RESOLVED), (350, OK)]
    assert [(t, e.rule.name, e.state) for t, e in events] == [
        (60, "latency_page", FIRING),
        (180, "latency_warning", FIRING),
        (310, "latency_page", RESOLVED),
        (340, "latency_warning", RESOLVED),
    ]
    fired = events[1][1]
    assert fired.value == pytest.approx(70.0) and fired.since == WALL0 + 0 and fired.at == WALL0 + 180
    assert fired.text().startswith("[FIRING] latency_warning (warning): avg_latency 70s > 30s for 3m")
    assert states(ev)["errors_5xx"] is OK and states(ev)["gpu_scale_up"] is OK


def test_latency_warning_only_between_30_and_60() -> None:
    clock, recent, _, ev = setup()
    changes, _ = run(
        ev, clock, 200, lambda t: recent.add(t, 200, 40.0), watch=("latency_warning", "latency_page")
    )
    assert changes == {"latency_warning": [(0, PENDING), (180, FIRING)], "latency_page": []}


def test_pending_that_clears_never_fires() -> None:
    clock, recent, _, ev = setup()
    changes, events = run(
        ev, clock, 300, lambda t: recent.add(t, 200, 40.0 if t < 100 else 1.0), watch=("latency_warning",)
    )
    # The minute's average, (40·(159-t) + (t-99)) / 60, drops below 30 s at t = 115.
    assert changes["latency_warning"] == [(0, PENDING), (120, OK)]
    assert events == []


def test_errors_5xx() -> None:
    """A 502 every 5 s (12 a minute) from t=0 to t=300, successes in between."""
    clock, recent, _, ev = setup()

    def traffic(t: int) -> None:
        recent.add(t, 200, 0.5)
        if t % 5 == 0 and t <= 300:
            recent.add(t, 502, 0.5)

    changes, events = run(ev, clock, 330, traffic, watch=("errors_5xx",))
    # 11 errors in the last minute first at t=50; held 2 min → FIRING at 170; at t=310 the
    # last minute (251..310) holds 10 errors: not more than 10 → RESOLVED.
    assert changes["errors_5xx"] == [(50, PENDING), (170, FIRING), (310, RESOLVED), (320, OK)]
    assert [(t, e.rule.name, str(e.state), e.value) for t, e in events] == [
        (170, "errors_5xx", "firing", 12.0),
        (310, "errors_5xx", "resolved", 10.0),
    ]


def test_gpu_scale_up() -> None:
    clock, _, gpu, ev = setup()
    heard: list[AlarmEvent] = []
    ev.listeners.append(heard.append)  # what the autoscaler does
    changes, _ = run(
        ev, clock, 460, lambda t: gpu.add(t, 97.0 if t < 400 else 50.0) if t % 5 == 0 else None,
        watch=("gpu_scale_up",),
    )  # fmt: skip
    # Mean of the samples in the last 60 s: at t=400 one 50 % sample among eleven at 97 % → 93 %.
    assert changes["gpu_scale_up"] == [(0, PENDING), (300, FIRING), (400, RESOLVED), (410, OK)]
    assert [(e.rule.action, e.state) for e in heard] == [("scale_up", FIRING), ("scale_up", RESOLVED)]


def test_no_gpu_is_no_data_not_a_breach() -> None:
    clock, _, _, ev = setup()
    changes, events = run(ev, clock, 400, watch=("gpu_scale_up",))
    assert changes["gpu_scale_up"] == [] and events == []
    assert ev.snapshot()["alarms"][-1]["value"] is None


def router_with_two() -> Router:
    cfg = parse_config(
        "pools:\n  - model: m\n    replicas:\n      - {url: 'http://127.0.0.1:9'}\n"
        "      - {url: 'http://127.0.0.1:10', tier: secondary}\n",
        env={},
    )
    router = Router(cfg)
    for r in router.all_replicas():
        r.state = State.HEALTHY
    return router


def test_unhealthy_replicas_fires_at_once() -> None:
    router = router_with_two()
    r1 = next(iter(router.all_replicas()))
    clock, _, _, ev = setup(router=router)

    def chaos(t: int) -> None:
        if t == 5:
            r1.state = State.UNHEALTHY
        if t == 25:
            r1.state = State.HEALTHY

    changes, events = run(ev, clock, 40, chaos, watch=("unhealthy_replicas",))
    assert changes["unhealthy_replicas"] == [(10, FIRING), (30, RESOLVED), (40, OK)]
    assert [(t, str(e.state), e.value) for t, e in events] == [(10, "firing", 1.0), (30, "resolved", 0.0)]


def test_layer_alarms_follow_the_layers_stats() -> None:
    # The journal's disk, the store, the limiter's fallback and the connection cap, as their
    # layers report them in stats(); counters alarm on their increase over the window.
    stats: dict[str, Any] = {
        "journal_disk_free_bytes": 50,
        "journal_disk_total_bytes": 100,
        "key_store_reachable": True,
        "shipper_error": None,
        "fail_open_admissions_total": 0,
        "connections_refused_total": 0,
        "connections_busy_total": 0,
    }
    clock = Clock()
    rules = [r for r in default_alarm_rules() if r.metric in LAYER_METRICS]
    assert {r.metric for r in rules} == LAYER_METRICS
    ev = AlarmEvaluator(
        rules,
        Signals(RecentTraffic(horizon=900, clock=clock), None, GaugeSeries(), None, lambda: dict(stats)),
        [],
        every=10,
        clock=clock,
        wall=lambda: WALL0 + clock.t,
    )

    def chaos(t: int) -> None:
        if t == 15:
            stats["journal_disk_free_bytes"] = 5  # 95 % used
            stats["fail_open_admissions_total"] = 7  # Redis went away: 7 local admissions
            stats["key_store_reachable"] = False
        if t == 45:
            stats["journal_disk_free_bytes"] = 60
            stats["connections_refused_total"] = 3
            stats["connections_busy_total"] = 2
        if t == 125:
            stats["key_store_reachable"] = True

    watch = ("journal_disk", "limiter_fail_open", "store_unreachable", "connections_refused")
    changes, events = run(ev, clock, 200, chaos, watch=watch)
    assert changes["journal_disk"] == [(20, FIRING), (50, RESOLVED), (60, OK)]
    # 7 admissions at t=15 stay inside the 60 s window until t=75 (the sample at t=20).
    assert changes["limiter_fail_open"] == [(20, FIRING), (80, RESOLVED), (90, OK)]
    assert changes["store_unreachable"] == [(20, PENDING), (80, FIRING), (130, RESOLVED), (140, OK)]
    assert changes["connections_refused"] == [(50, FIRING), (110, RESOLVED), (120, OK)]
    fired = {e.rule.name: e.value for _, e in events if str(e.state) == "firing"}
    assert fired["journal_disk"] == 95.0 and fired["limiter_fail_open"] == 7.0
    assert fired["connections_refused"] == 5.0  # closed past the reserve + answered 503 busy


LAYER_METRICS = {"journal_disk_utilization", "store_unreachable", "limiter_fail_open", "connections_refused"}


def test_crashed_local_replica_counts_as_unhealthy_and_its_restart_alarms() -> None:
    # The supervisor's stats: a local slot that crashes at t=15 (out of the router while it is
    # down), is restarted at t=33 (restarts 1) and ready again at t=38.
    router = router_with_two()
    slot = {"name": "local-1", "pool": "m", "model": "m", "tier": "primary", "engine": "sim",
            "state": "running", "restarts": 0, "replica": "local-1"}  # fmt: skip
    stats: dict[str, Any] = {"replica_restarts_total": 0, "local_slots": [slot]}
    clock = Clock()
    rules = [r for r in default_alarm_rules() if r.name in ("unhealthy_replicas", "replica_restarts")]
    assert [(r.metric, r.window, r.severity) for r in rules] == [
        ("unhealthy_replicas", 60.0, "page"),
        ("replica_restarts", 600.0, "warning"),
    ]
    ev = AlarmEvaluator(
        rules,
        Signals(RecentTraffic(horizon=900, clock=clock), router, GaugeSeries(), None, lambda: dict(stats)),
        [],
        every=10,
        clock=clock,
        wall=lambda: WALL0 + clock.t,
    )

    def chaos(t: int) -> None:
        if t == 15:
            slot.update(state="backoff", replica=None, restarts=1)
            stats["replica_restarts_total"] = 1
        if t == 33:
            slot.update(state="starting")  # the new process loads: still down
        if t == 38:
            slot.update(state="running", replica="local-1")

    watch = ("unhealthy_replicas", "replica_restarts")
    changes, events = run(ev, clock, 700, chaos, watch=watch)
    assert changes["unhealthy_replicas"] == [(20, FIRING), (40, RESOLVED), (50, OK)]
    # The restart at t=15 is within the 10-minute window until t=615 (the sample at t=20).
    assert changes["replica_restarts"] == [(20, FIRING), (620, RESOLVED), (630, OK)]
    fired = {e.rule.name: e.value for _, e in events if str(e.state) == "firing"}
    assert fired == {"unhealthy_replicas": 1.0, "replica_restarts": 1.0}
    # A slot asked to stop is not down, nor one whose replica is still in the router.
    slot.update(state="stopped", replica=None)
    ev.signals.begin(701.0)
    assert ev.signals.value(rules[0], 701.0) == 0.0


@pytest.fixture
async def webhook() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/hook", received
    await runner.cleanup()


async def test_webhook_gets_exactly_the_expected_notifications(webhook) -> None:
    url, received = webhook
    router = router_with_two()
    r1 = next(iter(router.all_replicas()))
    clock, recent, _, ev = setup(router=router, notifiers=[WebhookNotifier(url)])
    for t in range(0, 400):
        clock.t = float(t)
        recent.add(t, 200, 45.0 if t < 250 else 0.5)  # latency warning: fires at 180
        if t == 100:
            r1.state = State.UNHEALTHY
        if t == 120:
            r1.state = State.HEALTHY
        if t % 10 == 0:
            await ev.dispatch(ev.evaluate())
    assert [(m["alarm"], m["state"]) for m in received] == [
        ("unhealthy_replicas", "firing"),
        ("unhealthy_replicas", "resolved"),
        ("latency_warning", "firing"),
        ("latency_warning", "resolved"),
    ]
    first = received[0]
    assert first["text"].startswith("[FIRING] unhealthy_replicas (page): unhealthy_replicas 1 > 0")
    assert (first["severity"], first["value"], first["threshold"], first["at"]) == (
        "page", 1.0, 0.0, "2025-06-15T15:08:20Z",
    )  # fmt: skip
    assert received[2]["for_seconds"] == 180 and received[2]["window_seconds"] == 60
    assert received[3]["text"].startswith("[RESOLVED] latency_warning (warning): avg_latency now")


async def test_unreachable_webhook_does_not_stop_evaluation(caplog) -> None:
    router = router_with_two()
    next(iter(router.all_replicas())).state = State.UNHEALTHY
    _, _, _, ev = setup(router=router, notifiers=[WebhookNotifier(f"http://127.0.0.1:{free_port()}/x", 1)])
    with caplog.at_level(logging.WARNING, "fortress.alarms"):
        await ev.dispatch(ev.evaluate())
    assert states(ev)["unhealthy_replicas"] is FIRING
    assert "WebhookNotifier failed" in caplog.text


async def test_sns_publish_with_stubber() -> None:
    client = boto3.client("sns", region_name="eu-west-1", aws_access_key_id="x", aws_secret_access_key="x")
    router = router_with_two()
    next(iter(router.all_replicas())).state = State.UNHEALTHY
    arn = "arn:aws:sns:eu-west-1:123456789012:fortress-pager"
    clock, _, _, ev = setup(router=router, notifiers=[SnsNotifier(arn, client=client)])
    clock.t = 0
    message = orjson.dumps(AlarmEvent(ev.alarms[0].rule, FIRING, 1.0, WALL0, WALL0).payload()).decode()
    with Stubber(client) as stub:
        stub.add_response(
            "publish",
            {"MessageId": "m-1"},
            {
                "TopicArn": arn,
                "Subject": "[FIRING] unhealthy_replicas (page)",
                "Message": message,
                "MessageAttributes": {
                    "severity": {"DataType": "String", "StringValue": "page"},
                    "state": {"DataType": "String", "StringValue": "firing"},
                    "alarm": {"DataType": "String", "StringValue": "unhealthy_replicas"},
                },
            },
        )  # fmt: skip
        await ev.dispatch(ev.evaluate())
        stub.assert_no_pending_responses()


async def test_log_notifier_and_builder(caplog) -> None:
    cfg = parse_config(
        "observe: {alarms: {notify: {webhooks: ['http://127.0.0.1:1/a'], "
        "sns_topic_arn: 'arn:aws:sns:us-east-2:1:t'}}}",
        env={},
    ).observe.alarms.notify
    kinds = [type(n).__name__ for n in build_notifiers(cfg)]
    assert kinds == ["LogNotifier", "WebhookNotifier", "SnsNotifier"]
    rule = default_alarm_rules()[0]
    with caplog.at_level(logging.INFO, "fortress.alarms"):
        await LogNotifier().send(AlarmEvent(rule, FIRING, 2.0, WALL0, WALL0))
    assert caplog.records[-1].levelno == logging.WARNING
    assert "[FIRING] unhealthy_replicas (page): unhealthy_replicas 2 > 0" in caplog.text


async def test_gateway_fires_and_resolves_on_a_dead_replica(cluster, webhook) -> None:
    """End to end: a real gateway evaluates every 0.2 s and posts to the webhook."""
    url, received = webhook
    (a, _), (b, proc_b) = cluster.sim("m"), cluster.sim("m")
    port_b = int(b.rsplit(":", 1)[1])
    gw, _ = cluster.gateway(
        "pools:\n  - model: m\n    health_check: {interval: 0.3, timeout: 0.2, healthy_threshold: 1}\n"
        f"    replicas:\n      - {{url: '{a}'}}\n      - {{url: '{b}', tier: secondary}}\n"
        f"observe:\n  alarms:\n    evaluate_every: 0.2\n    notify: {{webhooks: ['{url}']}}\n"
    )
    await asyncio.sleep(0.5)
    assert received == []
    proc_b.kill(signal.SIGKILL)
    await _wait(
        lambda: [(m["alarm"], m["state"]) for m in received] == [("unhealthy_replicas", "firing")], 10
    )
    cluster.sim("m", port=port_b)  # the replica comes back on the same address
    await _wait(lambda: len(received) == 2, 15)
    assert [(m["alarm"], m["state"]) for m in received] == [
        ("unhealthy_replicas", "firing"),
        ("unhealthy_replicas", "resolved"),
    ]
    # `fortress alarms` lists them from GET /alarms.
    proc = await asyncio.create_subprocess_exec(
        *fortress_argv("alarms", "--url", gw, "--json"), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    data = json.loads(out)
    assert {a["name"]: a["state"] for a in data["alarms"]}["unhealthy_replicas"] in ("resolved", "ok")
    assert data["alarms"][0]["last_fired"] is not None


async def _wait(pred: Any, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        if pred():
            return
        await asyncio.sleep(0.05)
    wait_for(pred, 0.01, what="webhook notifications")


def test_killed_local_replica_counts_a_restart_and_fires_its_alarms(tmp_path: Path) -> None:
    """`fortress up` with one local sim replica: SIGKILL its process; the supervisor restarts it,
    /metrics counts the restart, the restart alarm fires, the unhealthy-replica alarm saw the
    replica down, and the dashboard's history holds the dip and the restart."""
    path = write_up_config(tmp_path, "sim-model", {"engine": "sim", "count": 1},
                           health_check={"interval": 0.5, "timeout": 0.5})  # fmt: skip
    doc = yaml.safe_load(path.read_text())
    doc["observe"] = {"access_log": {"enabled": False}, "alarms": {"evaluate_every": 0.2}}
    path.write_text(yaml.safe_dump(doc))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = Proc(fortress_argv("up", "-c", str(path), "--port", str(port), "-q"), tmp_path / "up.log")
    try:
        try:
            wait_http(url + "/ready", timeout=60)
            wait_for(lambda: len(children_of(proc.pid)) == 1, timeout=10, what="the replica process")
        except AssertionError:
            raise AssertionError("fortress up did not start:\n" + proc.output()[-3000:]) from None
        labels = {"replica": "sim-model-1", "pool": "sim-model", "model": "sim-model",
                  "tier": "primary", "engine": "sim"}  # fmt: skip

        def metric(name: str) -> float | None:
            _, body = http_get(url + "/metrics", timeout=10)
            for fam in text_string_to_metric_families(body.decode()):
                for s in fam.samples:
                    if s.name == name and s.labels == labels:
                        return s.value
            return None

        def alarms() -> dict[str, dict[str, Any]]:
            return {a["name"]: a for a in json.loads(http_get(url + "/alarms", timeout=10)[1])["alarms"]}

        def history() -> list[dict[str, Any]]:
            return json.loads(http_get(url + "/dashboard/data", timeout=10)[1])["history"]

        assert metric("fortress_replica_restarts_total") == 0.0
        assert metric("fortress_replica_process_down") == 0.0
        wait_for(lambda: alarms()["replica_restarts"]["value"] == 0.0, timeout=10, what="a first evaluation")
        assert alarms()["replica_restarts"]["state"] == "ok"
        assert alarms()["unhealthy_replicas"]["last_fired"] is None
        wait_for(
            lambda: any(p["health"]["primary"]["healthy"] == 1 for p in history()),
            timeout=30,
            what="a healthy point in the history",
        )
        t_kill = time.time()
        os.kill(children_of(proc.pid)[0], signal.SIGKILL)
        wait_for(
            lambda: metric("fortress_replica_restarts_total") == 1.0,
            timeout=30,
            what="the restart counted in /metrics",
        )
        wait_for(
            lambda: alarms()["replica_restarts"]["state"] == "firing",
            timeout=30,
            what="replica_restarts firing",
        )
        a = alarms()
        assert a["replica_restarts"]["value"] == 1.0 and a["replica_restarts"]["severity"] == "warning"
        # Between the crash and the restart the replica is out of the router; it still counted
        # as unhealthy (evaluated every 0.2 s, the backoff alone is 1 s).
        assert a["unhealthy_replicas"]["last_fired"] is not None
        assert a["unhealthy_replicas"]["last_fired"] >= t_kill - 1
        wait_for(lambda: len(children_of(proc.pid)) == 1, timeout=30, what="the replica to run again")
        wait_for(lambda: metric("fortress_replica_process_down") == 0.0, timeout=30, what="the process up")
        firing = [
            s.value
            for fam in text_string_to_metric_families(http_get(url + "/metrics", timeout=10)[1].decode())
            for s in fam.samples
            if s.name == "fortress_alarm_firing" and s.labels.get("alarm") == "replica_restarts"
        ]
        assert firing == [1.0]

        # The dashboard's history (a point every 5 s) holds the dip and the restart.
        wait_for(
            lambda: any(p["restarts"] == 1 for p in history()), timeout=30, what="the restart in the history"
        )
        points = history()
        assert any(p["health"]["primary"]["unhealthy"] >= 1 for p in points), points
        assert any(p["health"]["primary"]["healthy"] == 1 for p in points if p["t"] < t_kill), points
    finally:
        proc.stop()
