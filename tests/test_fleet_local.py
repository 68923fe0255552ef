"""The fleet with the local provider, for real: ``fortress up`` runs a pool that sleeps at zero,
wakes on a request, scales out under 40 clients, drains back to zero; operators stop and start
it; schedules keep it off. Simulators (``engine: sim``, 2 s to load) for the drill, the embedded
llama-server for the wake of a real model."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import (
    Proc,
    assert_schema,
    fortress_argv,
    free_port,
    http_get,
    http_post,
    wait_for,
    wait_http,
)
from test_llamacpp import require_embedded_llama

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}).encode()


class Gateway:
    """``fortress up -c`` on a config with one fleet pool."""

    def __init__(self, tmp: Path, pool: dict[str, Any]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        doc = {
            "state_dir": str(tmp / "state"),
            "auth": {"enabled": False},
            "audit": {"enabled": False},
            "routing": {"engine_metrics_interval": 0.5},
            "pools": [pool],
        }
        self.config = tmp / "fortress.yaml"
        self.config.write_text(yaml.safe_dump(doc))
        self.proc = Proc(
            fortress_argv("up", "-c", str(self.config), "--port", str(self.port), "-q"), tmp / "up.log"
        )
        try:
            wait_http(self.url + "/health", timeout=60)
        except AssertionError:
            self.proc.stop()
            raise AssertionError("fortress up did not start:\n" + self.proc.output()[-3000:]) from None

    def fleet(self) -> dict[str, Any]:
        status, body = http_get(self.url + "/admin/fleet", timeout=5)
        assert status == 200, body
        (pool,) = json.loads(body)["pools"]
        return pool

    def chat(self, model: str = "m", timeout: float = 60) -> tuple[int, dict[str, Any], float]:
        body = CHAT if model == "m" else CHAT.replace(b'"m"', json.dumps(model).encode())
        t0 = time.monotonic()
        status, raw = http_post(self.url + "/v1/chat/completions", body, timeout=timeout)
        return status, json.loads(raw), time.monotonic() - t0

    def admin(self, path: str, body: dict[str, Any], timeout: float = 60) -> tuple[int, dict[str, Any]]:
        status, raw = http_post(self.url + path, json.dumps(body).encode(), timeout=timeout)
        return status, json.loads(raw)

    def stop(self) -> None:
        self.proc.stop()


def sim_pool(**fleet: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "name": "m",
        "health_check": {"interval": 0.5, "timeout": 0.5},
        "deregistration_delay": 5,
        "fleet": {
            "min_replicas": 0,
            "max_replicas": 3,
            "target": {"in_flight": 4},
            "scale_out_delay": 3,
            "scale_in_delay": 5,
            "idle_to_zero": 6,
            "interval": 0.25,
            "wake_timeout": 60,
            **fleet,
        },
        "replicas": [
            {
                "engine": "sim",
                "options": {
                    "startup_delay": 2,
                    "ttft": 0.1,
                    "itl": 0.02,
                    "tokens": 20,
                    "backoff_initial": 0.2,
                },
            }
        ],
    }


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Any]:
    made: list[Gateway] = []

    def make(pool: dict[str, Any]) -> Gateway:
        gw = Gateway(tmp_path / f"gw{len(made)}", pool) if made else Gateway(tmp_path, pool)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.stop()


def test_a_pool_at_zero_wakes_on_request_scales_with_load_and_returns_to_zero(gateway: Any) -> None:
    gw = gateway(sim_pool())
    # Asleep, not broken: /ready is 200 and says why the model has no replica.
    pool = gw.fleet()
    assert (pool["state"], pool["current"], pool["desired"]) == ("asleep", 0, 0), pool
    status, body = http_get(gw.url + "/ready")
    assert status == 200 and json.loads(body)["dormant"] == {"m": "asleep"}, body
    time.sleep(1.0)  # a few evaluations with no request: still asleep
    assert gw.fleet()["current"] == 0

    # Five requests at once: one wake, shared; each waits for the replica and gets a 200.
    results: list[tuple[int, dict[str, Any], float]] = []
    woken = time.monotonic()
    threads = [threading.Thread(target=lambda: results.append(gw.chat())) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert [r[0] for r in results] == [200] * 5, results
    for _, answer, _ in results:
        assert_schema(answer, "CreateChatCompletionResponse")
    assert min(r[2] for r in results) >= 1.5  # they waited for the 2 s model load
    pool = gw.fleet()
    assert pool["wakes"] == 1 and pool["healthy"] >= 1, pool
    wakes = [d for d in pool["decisions"] if d["kind"] == "wake"]
    assert len(wakes) == 1 and wakes[0]["from"] == 0, pool["decisions"]

    # 40 clients: in flight 40 at 4 per replica wants 10, capped at max 3; within the out delay
    # (3 s) plus the model load (2 s), with room for a loaded machine. The out window may have
    # started with the five waking requests (5 at 4 per replica already asks for 2), so the
    # earliest the two new replicas can be healthy is the delay plus their load after the wake.
    t0 = time.monotonic()
    stop, clients, statuses = _load(gw, 40)
    try:
        wait_for(lambda: gw.fleet()["healthy"] == 3, timeout=60, interval=0.25, what="3 healthy replicas")
        took, since_wake = time.monotonic() - t0, time.monotonic() - woken
        pool = gw.fleet()
        assert pool["desired"] == 3 and pool["current"] == 3, pool
        assert any(d["kind"] == "target" and d["to"] == 3 for d in pool["decisions"]), pool["decisions"]
        time.sleep(1.0)  # served by all three for a moment
    finally:
        stop.set()
        for t in clients:
            t.join(90)
    assert since_wake >= 3.0 + 2.0, (took, since_wake, pool["decisions"])  # not before the out delay

    # Load gone: idle_to_zero (6 s) later the pool drains and is back to zero.
    wait_for(lambda: gw.fleet()["state"] == "asleep", timeout=60, interval=0.25, what="the pool asleep again")
    pool = gw.fleet()
    assert pool["current"] == 0 and all(i["state"] == "terminated" for i in pool["instances"]), pool
    assert any(d["kind"] == "idle" and d["to"] == 0 for d in pool["decisions"]), pool["decisions"]
    # Nothing failed in the whole run.
    assert set(statuses) == {200} and statuses[200] > 40, statuses

    # The dashboard's history kept the pool's replicas over time; its data has the decisions.
    status, raw = http_get(gw.url + "/dashboard/data")
    data = json.loads(raw)
    assert max(p["fleet"]["m"][1] for p in data["history"] if "m" in p.get("fleet", {})) == 3
    assert {d["kind"] for d in data["fleet"][0]["recent_decisions"]} >= {"wake", "target", "idle"}

    status, metrics = http_get(gw.url + "/metrics")
    text = metrics.decode()
    assert 'fortress_fleet_desired_replicas{pool="m"} 0.0' in text
    assert 'fortress_fleet_decisions_total{kind="wake",pool="m"} 1.0' in text
    assert 'fortress_fleet_wake_seconds_count{pool="m"} 1.0' in text


def test_a_wake_that_takes_too_long_is_a_503_with_retry_after_then_the_pool_serves(gateway: Any) -> None:
    pool = sim_pool(wake_timeout=1, idle_to_zero=60)
    pool["replicas"][0]["options"]["startup_delay"] = 4
    gw = gateway(pool)
    status, body, took = gw.chat()
    assert status == 503, body
    assert_schema(body, "ErrorResponse")
    assert body["error"]["code"] == "pool_wake_timeout" and "wake_timeout 1s" in body["error"]["message"]
    assert took < 4
    # The wake goes on: the pool serves once its replica is up.
    wait_for(lambda: gw.fleet()["healthy"] == 1, timeout=60, what="the replica up")
    assert gw.chat()[0] == 200


def test_operators_stop_and_start_a_pool(gateway: Any) -> None:
    import subprocess

    gw = gateway(sim_pool(min_replicas=1, idle_to_zero=None))
    wait_for(lambda: gw.fleet()["healthy"] == 1, timeout=60, what="the minimum of one replica")
    assert gw.chat()[0] == 200

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            fortress_argv("fleet", *args, "--url", gw.url),
            capture_output=True,
            text=True,
            timeout=120,
        )

    out = cli("stop", "m", "--json")
    assert out.returncode == 0, out.stderr
    stopped = json.loads(out.stdout)
    assert stopped["nothing_running"] and stopped["state"] == "stopped", stopped
    assert all(i["state"] == "terminated" and i["pid"] is None for i in stopped["instances"])
    status, body, _ = gw.chat()
    assert status == 503 and body["error"]["code"] == "pool_stopped", body
    assert gw.fleet()["current"] == 0  # the request did not wake it

    out = cli("start", "m")
    assert out.returncode == 0, out.stderr
    assert "running" in out.stdout and "m-1" in out.stdout
    assert gw.chat()[0] == 200

    # Held at two, then handed back; bad counts are refused with the reason.
    out = cli("scale", "m", "2", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["pinned"] == 2, out.stderr
    wait_for(lambda: gw.fleet()["healthy"] == 2, timeout=60, what="two replicas")
    bad = cli("scale", "m", "7")
    assert bad.returncode == 1 and "0..3" in bad.stderr, bad.stderr
    out = cli("scale", "m", "auto", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["pinned"] is None
    # The store keeps what happened: every decision, each process with its states in order.
    from fortress.fleet.instances import FleetStore

    db = FleetStore(f"sqlite:///{gw.config.parent / 'state' / 'fortress.db'}", "reader")
    wait_for(lambda: len(db.decisions("m")) >= 4, timeout=30, what="the decisions in the store")
    kinds = [(d["from"], d["to"], d["kind"]) for d in db.decisions("m")]
    assert kinds[:2] == [(1, 0, "manual"), (0, 1, "wake")], kinds
    rows = {r["id"].split("/", 1)[1]: r for r in db.history("m")}
    # The first process was ready when the fleet first looked (it starts with the gateway);
    # the second was started by `fleet start`.
    assert [h[1] for h in rows["m-1/1"]["history"]] == ["ready", "draining", "terminated"]
    second = [h[1] for h in rows["m-1/2"]["history"]]
    assert second[0] == "starting" and "ready" in second, second
    assert rows["m-1/1"]["provider"] == "local" and rows["m-1/1"]["version"]
    status, body = gw.admin("/admin/fleet/nope/scale", {"replicas": 1})
    assert status == 404 and "managed pools: m" in body["error"]["message"], body
    status, body = gw.admin("/admin/fleet/m/scale", {"replicas": "two"})
    assert status == 400 and body["error"]["param"] == "replicas", body
    status, body = gw.admin("/admin/fleet/m/stop", {"timeout": -1})
    assert status == 400 and "timeout" in body["error"]["message"], body


def test_a_pool_scheduled_off_answers_503_until_its_schedule_turns(gateway: Any) -> None:
    # Fires every minute, so it is always the schedule in force: max 0.
    gw = gateway(sim_pool(schedules=[{"name": "off", "cron": "* * * * *", "max_replicas": 0}]))
    status, body, _ = gw.chat()
    assert status == 503, body
    assert_schema(body, "ErrorResponse")
    assert body["error"]["code"] == "pool_scheduled_off" and "(off)" in body["error"]["message"]
    pool = gw.fleet()
    assert pool["state"] == "scheduled off" and pool["max"] == 0 and pool["bounds_from"] == "off"
    assert pool["next_scheduled"]["schedule"] == "off"
    status, raw = http_get(gw.url + "/ready")
    assert status == 200 and json.loads(raw)["dormant"] == {"m": "scheduled off"}


def test_the_embedded_model_wakes_on_request(gateway: Any) -> None:
    require_embedded_llama()
    gw = gateway(
        {
            "model": "smollm2",
            "name": "m",
            "health_check": {"interval": 0.5, "timeout": 0.5},
            "fleet": {"min_replicas": 0, "max_replicas": 2, "idle_to_zero": 300, "interval": 0.5},
            "replicas": [{"engine": "llamacpp"}],
        }
    )
    assert gw.fleet()["current"] == 0
    status, body, _ = gw.chat("smollm2", timeout=120)
    assert status == 200, body
    assert_schema(body, "CreateChatCompletionResponse")
    assert body["model"] == "smollm2" and body["choices"][0]["message"]["content"]
    pool = gw.fleet()
    assert pool["wakes"] == 1 and pool["current"] == 1 and pool["healthy"] == 1, pool


def _load(gw: Gateway, clients: int) -> tuple[threading.Event, list[threading.Thread], Counter[int]]:
    stop = threading.Event()
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def client() -> None:
        while not stop.is_set():
            status, _, _ = gw.chat()
            with lock:
                statuses[status] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    return stop, threads, statuses


def test_a_rolling_update_under_load_fails_nothing_and_a_bad_version_rolls_back(gateway: Any) -> None:
    import subprocess

    pool = sim_pool(min_replicas=2, max_replicas=2, idle_to_zero=None)
    pool["replicas"][0]["options"]["startup_delay"] = 1
    gw = gateway(pool)
    wait_for(lambda: gw.fleet()["healthy"] == 2, timeout=60, what="two replicas")
    first = {i["version"] for i in gw.fleet()["instances"]}
    assert len(first) == 1

    def roll(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            fortress_argv("fleet", "roll", "m", "--url", gw.url, "--timeout", "30", *extra),
            capture_output=True,
            text=True,
            timeout=300,
        )

    def running_versions() -> set[str]:
        return {i["version"] for i in gw.fleet()["instances"] if i["state"] == "ready"}

    # A new version (another output length) in the config file, rolled under load.
    doc = yaml.safe_load(gw.config.read_text())
    doc["pools"][0]["replicas"][0]["options"]["tokens"] = 12
    gw.config.write_text(yaml.safe_dump(doc))
    stop, threads, statuses = _load(gw, 8)
    try:
        out = roll("--json")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert out.returncode == 0, out.stderr + out.stdout
    result = json.loads(out.stdout)["roll"]
    assert not result["rolled_back"] and len(result["replaced"]) == 2, result
    new = result["version"]
    assert new not in first and running_versions() == {new}
    assert set(statuses) == {200} and statuses[200] > 10, statuses
    pool_now = gw.fleet()
    assert pool_now["healthy"] == 2 and pool_now["current"] == 2, pool_now

    # Blue-green with a shift: both new replicas first, then the old ones drain one at a time
    # over 2 s; no request fails either.
    doc["pools"][0]["replicas"][0]["options"]["tokens"] = 14
    gw.config.write_text(yaml.safe_dump(doc))
    stop, threads, statuses = _load(gw, 8)
    try:
        out = roll("--strategy", "blue-green", "--shift", "2", "--json")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert out.returncode == 0, out.stderr + out.stdout
    result = json.loads(out.stdout)["roll"]
    assert result["strategy"] == "blue-green" and len(result["replaced"]) == 2, result
    new = result["version"]
    assert running_versions() == {new} and set(statuses) == {200}, statuses
    wait_for(lambda: gw.fleet()["current"] == 2, timeout=30, what="two replicas after the shift")

    # A version that never becomes healthy (its model takes longer to load than it may): the
    # roll stops, the old replicas never stopped serving, every replica still runs `new`.
    doc["pools"][0]["replicas"][0]["options"].update(startup_delay=600, ready_timeout=3, max_crashes=1)
    gw.config.write_text(yaml.safe_dump(doc))
    stop, threads, statuses = _load(gw, 4)
    try:
        bad = roll()
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert bad.returncode == 1 and "rolled back" in bad.stderr, bad.stderr + bad.stdout
    assert running_versions() == {new}
    assert set(statuses) == {200}, statuses
    wait_for(lambda: gw.fleet()["current"] == 2, timeout=30, what="back to two replicas")
    # Nothing to do when every replica runs the file's version already.
    doc["pools"][0]["replicas"][0]["options"].update(startup_delay=1, ready_timeout=None, max_crashes=5)
    gw.config.write_text(yaml.safe_dump(doc))
    same = roll("--json")
    assert same.returncode == 0 and "already" in json.loads(same.stdout)["roll"]["detail"], same.stdout
