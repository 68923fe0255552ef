"""``server.workers``: several gateway processes on one port, as real processes.

Each test starts a real ``fortress serve --workers 2`` (a master and two forked workers) in
front of ``fortress sim`` replicas, and checks what must hold across workers: a usage plan is
exact (the shared memory table, or Redis), both workers serve, a worker killed with ``kill -9``
is replaced and no answered request's audit record is lost, SIGTERM drains, and ``/metrics``
sums every worker.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from conftest import Cluster
from helpers import Proc, alive, children_of, fortress_argv, free_port, http_get, wait_for, write_up_config

from fortress.access.plans import Plan
from fortress.access.shared_limits import SharedLimiter, SharedLimitTable
from fortress.config import UsagePlan, build_config, parse_config
from fortress.observe.shared import add, decode, encode, to_families, to_metrics
from fortress.workers import WorkersError, resolve_workers, worker_config

AUDIT_HEADERS = {"x-llm-source": "tests", "x-llm-user": "alice", "x-llm-request-type": "chat"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
KEY_RE = re.compile(r"fk_[a-z0-9]{8}_[A-Za-z0-9]{32}")


def config_text(tmp: Path, sim_url: str, *, auth: bool = True, extra: str = "") -> str:
    return (
        f"state_dir: {tmp / 'state'}\n"
        + ("auth: {cache_refresh: 1}\n" if auth else "auth: {enabled: false}\n")
        + "audit: {group_commit_ms: 2, anchor_every: 0.5, ship_interval: 0.05}\n"
        "plans:\n"
        "  ten: {rate: null, burst: null, requests: {day: 10}}\n"
        "  wide: {rate: null, burst: null, requests: {}}\n"
        f"{extra}"
        "pools:\n"
        "  - model: m\n"
        "    health_check: {interval: 1, timeout: 0.5, healthy_threshold: 1}\n"
        f"    replicas: [{{url: '{sim_url}'}}]\n"
    )


class Gateway:
    """``fortress serve -c CONFIG --workers 2`` on a free port."""

    def __init__(self, tmp: Path, config: Path, workers: int = 2) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = Proc(
            fortress_argv("serve", "-c", str(config), "--port", str(self.port), "--workers", str(workers)),
            tmp / f"gw-{self.port}.log",
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.p.poll() is None, self.proc.output()[-3000:]
            try:
                if http_get(self.url + "/ready", timeout=1)[0] == 200 and len(self.workers()) == workers:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail("the gateway did not get ready:\n" + self.proc.output()[-3000:])

    def workers(self) -> list[int]:
        return sorted(children_of(self.proc.pid))

    def terminate(self, timeout: float = 40) -> int:
        self.proc.p.send_signal(signal.SIGTERM)
        return self.proc.p.wait(timeout)


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[list[Gateway]]:
    started: list[Gateway] = []
    yield started
    for g in started:
        pids = g.workers()
        g.proc.stop()
        for pid in pids:  # workers outlive a killed master only until they have drained
            wait_for(lambda pid=pid: not alive(pid), timeout=30, what=f"worker {pid} to exit")


def keys_create(config: Path, plan: str) -> str:
    out = subprocess.run(
        fortress_argv("keys", "create", "--name", f"k-{plan}", "--plan", plan, "-c", str(config)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr + out.stdout
    m = KEY_RE.search(out.stdout)
    assert m is not None, out.stdout
    return m.group(0)


def post(
    url: str, headers: dict[str, str], body: dict[str, Any] = CHAT, timeout: float = 10
) -> tuple[int, bytes]:
    """One request on a connection of its own (the kernel spreads connections over workers)."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps(body),
            {"content-type": "application/json", **AUDIT_HEADERS, **headers},
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def db_rows(db: Path, query: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(db, timeout=10)
    try:
        return con.execute(query).fetchall()
    finally:
        con.close()


def metric(text: str, name: str) -> float:
    """The sum of every sample of ``name`` in a Prometheus exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def burst_of(url: str, n: int, headers: dict[str, str]) -> list[int]:
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda i: post(url, {**headers, "x-request-id": f"r-{i}"})[0], range(n)))


def _exact_plan(cluster: Cluster, tmp_path: Path, gateways: list[Gateway], extra: str = "") -> None:
    sim, _ = cluster.sim("m")
    config = tmp_path / "fortress.yaml"
    config.write_text(config_text(tmp_path, sim, extra=extra))
    key = keys_create(config, "ten")
    gw = Gateway(tmp_path, config)
    gateways.append(gw)
    statuses = burst_of(gw.url, 30, {"authorization": f"Bearer {key}"})
    assert statuses.count(200) == 10, statuses
    assert statuses.count(429) == 20, statuses
    assert gw.terminate() == 0
    # Both workers served: each answered request is on its worker's own chain.
    db = tmp_path / "state" / "fortress.db"
    rows = dict(db_rows(db, "SELECT gateway_id, count(*) FROM audit_records GROUP BY gateway_id"))
    machine = (tmp_path / "state" / "gateway_id").read_text().strip()
    assert set(rows) == {f"{machine}-w0", f"{machine}-w1"}, rows
    assert sum(rows.values()) == 30
    verify = subprocess.run(
        fortress_argv("audit", "verify", "-c", str(config)), capture_output=True, text=True, timeout=60
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_plan_of_ten_admits_ten_across_two_workers(
    cluster: Cluster, tmp_path: Path, gateways: list[Gateway]
) -> None:
    _exact_plan(cluster, tmp_path, gateways)


def test_a_plan_of_ten_admits_ten_across_two_workers_with_redis(
    cluster: Cluster, tmp_path: Path, gateways: list[Gateway], redis_url: str
) -> None:
    prefix = f"w{os.getpid()}-{time.monotonic_ns()}:"
    _exact_plan(
        cluster,
        tmp_path,
        gateways,
        f"limits: {{backend: redis, redis_url: '{redis_url}', key_prefix: '{prefix}'}}\n",
    )


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_max_concurrent_holds_across_two_workers(
    backend: str, cluster: Cluster, tmp_path: Path, gateways: list[Gateway], request: pytest.FixtureRequest
) -> None:
    sim, _ = cluster.sim("m", "--ttft", "1.5")
    extra = "  pair: {rate: null, burst: null, requests: {}, max_concurrent: 2}\n"
    if backend == "redis":
        url = request.getfixturevalue("redis_url")
        extra += f"limits: {{backend: redis, redis_url: '{url}', key_prefix: 'c{time.monotonic_ns()}:'}}\n"
    config = tmp_path / "fortress.yaml"
    config.write_text(config_text(tmp_path, sim, extra=extra))
    key = keys_create(config, "pair")
    gw = Gateway(tmp_path, config)
    gateways.append(gw)
    statuses = burst_of(gw.url, 8, {"authorization": f"Bearer {key}"})  # all at once: 8 threads
    assert sorted(statuses) == [200, 200] + [429] * 6, statuses


class Client(threading.Thread):
    """Requests in a loop on a fresh connection each; remembers the ids answered in full."""

    def __init__(self, url: str, name: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.name_ = name
        self.completed: list[str] = []
        self.failed = 0
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            rid = f"{self.name_}-{i}"
            stream = i % 2 == 1
            i += 1
            try:
                status, data = post(self.url, {"x-request-id": rid}, {**CHAT, "stream": stream}, timeout=5)
            except (OSError, http.client.HTTPException):
                self.failed += 1
                time.sleep(0.01)
                continue
            if status == 200 and (not stream or b"data: [DONE]" in data):
                self.completed.append(rid)


def test_a_killed_worker_is_replaced_and_no_answered_request_loses_its_record(
    cluster: Cluster, tmp_path: Path, gateways: list[Gateway]
) -> None:
    sim, _ = cluster.sim("m")
    config = tmp_path / "fortress.yaml"
    config.write_text(config_text(tmp_path, sim, auth=False))
    gw = Gateway(tmp_path, config)
    gateways.append(gw)
    before = gw.workers()
    clients = [Client(gw.url, f"c{k}") for k in range(6)]
    for c in clients:
        c.start()

    def done() -> int:
        return sum(len(c.completed) for c in clients)

    wait_for(lambda: done() >= 100, timeout=60, what="traffic")
    victim = before[0]
    os.kill(victim, signal.SIGKILL)  # mid-traffic: records committed, some not yet shipped

    def respawned() -> bool:
        # One reading of the children: two readings could see the victim still alive in the
        # first (two workers) and already gone in the second (not the victim), with no new one.
        now = gw.workers()
        return len(now) == 2 and victim not in now

    wait_for(respawned, timeout=30, what="a new worker")
    now = gw.workers()
    replaced = [p for p in now if p not in before]
    assert len(replaced) == 1, f"before {before}, victim {victim}, now {now}"
    at_restart = done()
    wait_for(lambda: done() >= at_restart + 100, timeout=60, what="traffic after the restart")
    for c in clients:
        c.stop.set()
    for c in clients:
        c.join(15)
    assert gw.terminate() == 0, gw.proc.output()[-3000:]
    log = gw.proc.output()
    assert re.search(r"worker \d killed by SIGKILL after [\d.]+ s; restarting it in 0\.5 s", log), log[-3000:]

    completed = [rid for c in clients for rid in c.completed]
    db = tmp_path / "state" / "fortress.db"
    recorded = dict(db_rows(db, "SELECT request_id, count(*) FROM audit_records GROUP BY request_id"))
    missing = [rid for rid in completed if rid not in recorded]
    assert not missing, f"{len(missing)} answered requests have no audit record: {missing[:5]}"
    assert all(recorded[rid] == 1 for rid in completed), "a request was recorded twice"
    verify = subprocess.run(
        fortress_argv("audit", "verify", "-c", str(config)), capture_output=True, text=True, timeout=60
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_sigterm_drains_every_worker(cluster: Cluster, tmp_path: Path, gateways: list[Gateway]) -> None:
    sim, _ = cluster.sim("m", "--ttft", "0.2", "--itl", "0.1", "--tokens", "20")
    config = tmp_path / "fortress.yaml"
    config.write_text(config_text(tmp_path, sim, auth=False))
    gw = Gateway(tmp_path, config)
    gateways.append(gw)
    workers = gw.workers()
    results: list[tuple[int, bytes]] = []

    def slow(i: int) -> None:
        body = {**CHAT, "stream": True, "max_tokens": 20}
        results.append(post(gw.url, {"x-request-id": f"slow-{i}"}, body, timeout=30))

    threads = [threading.Thread(target=slow, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.8)  # every stream has started (first token at 0.2 s, then one each 0.1 s)
    started = time.monotonic()
    # As systemd stops a unit (KillMode=control-group): every process gets SIGTERM, the workers
    # once from it and once from their master. They drain all the same.
    gw.proc.p.send_signal(signal.SIGTERM)
    for pid in workers:
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.3)
    # While they drain, the port refuses new connections at once (a load balancer moves on).
    assert all(gw.proc.p.poll() is None and alive(pid) for pid in workers)
    with pytest.raises(ConnectionRefusedError):
        post(gw.url, {}, timeout=2)
    assert gw.proc.p.wait(40) == 0, gw.proc.output()[-3000:]
    for t in threads:
        t.join(10)
    assert len(results) == 6
    assert all(status == 200 and b"data: [DONE]" in data for status, data in results), results
    assert time.monotonic() - started < 30
    assert not any(alive(pid) for pid in workers)
    log = gw.proc.output()
    assert "SIGTERM: stopping the workers (each drains)" in log
    assert "worker 0 exited 0" in log and "worker 1 exited 0" in log


def test_workers_stop_when_their_master_is_killed(
    cluster: Cluster, tmp_path: Path, gateways: list[Gateway]
) -> None:
    sim, _ = cluster.sim("m")
    config = tmp_path / "fortress.yaml"
    config.write_text(config_text(tmp_path, sim, auth=False))
    gw = Gateway(tmp_path, config)
    workers = gw.workers()
    os.kill(gw.proc.pid, signal.SIGKILL)
    gw.proc.p.wait(10)
    wait_for(lambda: not any(alive(pid) for pid in workers), timeout=30, what="the workers to exit")
    gw.proc.stop()


def test_metrics_sum_every_worker(cluster: Cluster, tmp_path: Path, gateways: list[Gateway]) -> None:
    sim, _ = cluster.sim("m")
    config = tmp_path / "fortress.yaml"
    config.write_text(config_text(tmp_path, sim, auth=False))
    gw = Gateway(tmp_path, config)
    gateways.append(gw)
    statuses = burst_of(gw.url, 40, {})
    assert statuses.count(200) == 40
    db = tmp_path / "state" / "fortress.db"
    # Both workers answered some (their records are on two chains).
    wait_for(
        lambda: db_rows(db, "SELECT count(DISTINCT gateway_id), count(*) FROM audit_records")[0] == (2, 40),
        timeout=20,
        what="40 records from two workers",
    )

    def scrape() -> str:
        return http_get(gw.url + "/metrics", timeout=5)[1].decode()

    def every_worker_says(name: str, value: float) -> bool:
        # Connections spread over the workers: six scrapes all agreeing is every worker's view.
        return all(metric(scrape(), name) == value for _ in range(6))

    # Each worker publishes once a second: every worker's answer soon holds all 40.
    wait_for(lambda: every_worker_says("fortress_requests_total", 40), timeout=10, what="40 in /metrics")
    text = scrape()
    assert metric(text, "fortress_request_duration_seconds_count") == 40
    assert metric(text, "fortress_workers") == 2
    assert metric(text, "fortress_audit_journal_records_total") == 40
    # Each worker has its own replica table: changing one through the admin API is refused.
    req = urllib.request.Request(
        gw.url + "/admin/replicas", data=json.dumps({"url": sim, "model": "m"}).encode(), method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=5)
    assert refused.value.code == 409
    assert json.loads(refused.value.read())["error"]["code"] == "not_supported_with_workers"
    assert http_get(gw.url + "/admin/replicas")[0] == 200
    # A worker killed keeps its counts: its successor carries them on.
    victim = gw.workers()[1]
    os.kill(victim, signal.SIGKILL)

    def respawned() -> bool:
        now = gw.workers()  # one reading: the victim may still be listed just after the kill
        return len(now) == 2 and victim not in now and http_get(gw.url + "/ready", timeout=2)[0] == 200

    wait_for(respawned, timeout=30)
    assert burst_of(gw.url, 10, {}).count(200) == 10
    wait_for(lambda: every_worker_says("fortress_requests_total", 50), timeout=10, what="50 in /metrics")
    assert every_worker_says("fortress_worker_restarts_total", 1)


# -- how many workers ----------------------------------------------------------------------


def test_auto_and_explicit_workers_with_parts_that_run_once_per_machine(
    caplog: pytest.LogCaptureFixture,
) -> None:
    remote = build_config({"pools": [{"model": "m", "replicas": [{"url": "http://10.0.0.1:8000"}]}]}, env={})
    local = build_config(
        {"pools": [{"model": "m", "replicas": [{"engine": "sim", "options": {"model": "m"}}]}]}, env={}
    )
    cores = len(os.sched_getaffinity(0))
    assert resolve_workers(remote, "serve") == cores
    assert resolve_workers(remote, "up") == 1
    with caplog.at_level(logging.INFO, logger="fortress.workers"):
        assert resolve_workers(local, "serve") == 1
    if cores > 1:
        assert (
            "1 gateway worker, not" in caplog.text and "supervised by one process per machine" in caplog.text
        )
    explicit = local.replace(server=local.server.replace(workers=3))
    with pytest.raises(WorkersError, match=r"server.workers is 3, but local replicas \(m \(sim\)\)"):
        resolve_workers(explicit, "up")
    assert resolve_workers(remote.replace(server=remote.server.replace(workers=3)), "serve") == 3


def test_the_environment_beats_auto_and_the_file(tmp_path: Path) -> None:
    assert os.environ["FORTRESS__SERVER__WORKERS"] == "1"  # the suite's own (conftest)
    assert parse_config("").server.workers == 1
    assert parse_config("server: {workers: 4}\n").server.workers == 1
    assert parse_config("server: {workers: 4}\n", env={}).server.workers == 4
    assert parse_config("", env={"FORTRESS__SERVER__WORKERS": "auto"}).server.workers == "auto"
    assert parse_config("", env={}).server.workers == "auto"


def test_up_refuses_workers_with_local_replicas(tmp_path: Path) -> None:
    config = write_up_config(tmp_path, "m", {"engine": "sim", "options": {"model": "m"}})
    out = subprocess.run(
        fortress_argv("up", "-c", str(config), "--workers", "2", "--quiet"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "server.workers is 2, but local replicas" in out.stderr
    assert "Set server.workers to 1 or auto" in out.stderr


def test_each_worker_has_its_own_gateway_id_and_journal(tmp_path: Path) -> None:
    cfg = build_config({"state_dir": str(tmp_path / "s")}, env={})
    w1 = worker_config(cfg, 1)
    assert w1.state_dir == str(tmp_path / "s" / "workers" / "w1")
    assert w1.audit.journal_dir == str(tmp_path / "s" / "journal-w1")
    assert w1.database.url == f"sqlite:///{(tmp_path / 's').resolve() / 'fortress.db'}"
    assert w1.auth.secret == (tmp_path / "s" / "secret").read_text().strip()
    assert worker_config(cfg, 1) == w1  # stable: a restarted worker gets the same


# -- the shared limiter, across real processes ---------------------------------------------


def test_the_shared_limiter_is_exact_across_processes_and_frees_a_dead_workers_slots() -> None:
    plan = Plan.compile("p", UsagePlan(rate=None, burst=None, requests={"day": 500}, max_concurrent=3))
    table = SharedLimitTable.create(4, capacity=64)
    r, w = os.pipe()
    pids = []
    for i in range(4):
        pid = os.fork()
        if pid == 0:  # a worker: admit and settle as fast as it can
            try:
                lim = SharedLimiter(table, i)
                asyncio.run(lim.start())
                admitted = 0
                for _ in range(300):
                    d = lim.admit_now("key_a", plan, 0, 0)
                    if d.ticket is not None:
                        admitted += 1
                        lim.settle(d.ticket, 0, 0)
                os.write(w, f"{admitted}\n".encode())
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    os.close(w)
    counts = [int(x) for x in os.read(r, 1000).split()]
    os.close(r)
    assert len(counts) == 4 and sum(counts) == 500, counts
    lim = SharedLimiter(table, 0)
    usage = asyncio.run(lim.usage("key_a", plan))
    assert usage["requests"]["day"] == 500

    # Worker 1 dies holding 3 requests of key_b: its successor frees them when it starts.
    wide = Plan.compile("w", UsagePlan(rate=None, burst=None, requests={}, max_concurrent=3))
    one = SharedLimiter(table, 1)
    held = [one.admit_now("key_b", wide, 0, 0) for _ in range(3)]
    assert all(d.ticket is not None for d in held)
    assert lim.admit_now("key_b", wide, 0, 0).ticket is None  # 3 in flight on worker 1
    asyncio.run(SharedLimiter(table, 1).start())
    assert lim.admit_now("key_b", wide, 0, 0).ticket is not None


def test_the_shared_limiter_refills_its_kept_state_and_clears_only_the_dead_workers_counts() -> None:
    """Each worker keeps one state object per key between calls; every call refills it from
    the slot, so what another worker did in between counts. A worker's in-flight counts sit
    beside the others' in the slot's row: clearing a dead worker's leaves theirs alone."""
    plan = Plan.compile("p", UsagePlan(rate=None, burst=None, requests={"day": 4}, max_concurrent=5))
    table = SharedLimitTable.create(3, capacity=16)
    w0, w1, w2 = (SharedLimiter(table, i) for i in range(3))
    held = [
        w0.admit_now("key_s", plan, 0, 0),
        w1.admit_now("key_s", plan, 0, 0),
        w1.admit_now("key_s", plan, 0, 0),
    ]
    assert all(d.ticket is not None for d in held)
    slot = w0._slot("key_s")
    assert table.inflight(slot) == (1, 2, 0)
    # w0's kept state says 1 request used; the slot says 3: the next decision sees 4, then none.
    assert w0.admit_now("key_s", plan, 0, 0).ticket is not None
    assert w2.admit_now("key_s", plan, 0, 0).ticket is None  # the day's 4 are used, on any worker
    assert table.inflight(slot) == (2, 2, 0)
    table.clear_worker(1)  # worker 1 died: its 2 requests in flight go, worker 0's stay
    assert table.inflight(slot) == (2, 0, 0)
    w0.settle(held[0].ticket, 0, 0)
    assert table.inflight(slot) == (1, 0, 0)
    usage = asyncio.run(w2.usage("key_s", plan))
    assert usage["requests"]["day"] == 4


def test_snapshots_merge_counters_summed_shares_summed_and_views_kept() -> None:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    def worker(requests: float, in_flight: float, state: float, shipper_ok: float) -> list[Any]:
        c = CounterMetricFamily("fortress_requests", "r", labels=["model"])
        c.add_metric(["m"], requests)
        f = GaugeMetricFamily("fortress_replica_in_flight", "f", labels=["replica"])
        f.add_metric(["m-1"], in_flight)
        v = GaugeMetricFamily("fortress_replica_state", "v", labels=["replica", "state"])
        v.add_metric(["m-1", "healthy"], state)
        ok = GaugeMetricFamily("fortress_audit_shipper_ok", "o")
        ok.add_metric([], shipper_ok)
        return [c, f, v, ok]

    mine = to_families(worker(3, 1, 1, 1))
    other, incarnation = decode(encode(to_families(worker(4, 2, 0, 0)), 2))
    assert incarnation == 2
    add(mine, other)
    values = {(m.name, s.name): s.value for m in to_metrics(mine) for s in m.samples}
    assert values[("fortress_requests", "fortress_requests_total")] == 7
    assert values[("fortress_replica_in_flight", "fortress_replica_in_flight")] == 3
    assert values[("fortress_replica_state", "fortress_replica_state")] == 1  # this worker's view
    assert values[("fortress_audit_shipper_ok", "fortress_audit_shipper_ok")] == 0  # the lowest


def test_a_busy_port_and_a_worker_that_cannot_start_fail_the_start(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run(
            fortress_argv(
                "serve",
                "--replica",
                "http://127.0.0.1:9",
                "--port",
                str(port),
                "--workers",
                "2",
                "-c",
                "/dev/null",
            ),
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "FORTRESS__STATE_DIR": str(tmp_path / "a")},
        )
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in out.stderr
    # Every worker fails at start (its journal cannot be made): the master stops, as one process would.
    (tmp_path / "file").write_text("")
    config = tmp_path / "fortress.yaml"
    config.write_text(
        f"state_dir: {tmp_path / 'b'}\nauth: {{enabled: false}}\n"
        f"audit: {{journal_dir: {tmp_path / 'file' / 'j'}}}\n"
        "pools: [{model: m, replicas: [{url: 'http://127.0.0.1:9'}]}]\n"
    )
    out = subprocess.run(
        fortress_argv("serve", "-c", str(config), "--port", str(free_port()), "--workers", "2"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(r"worker \d exited 1 before it served: stopping every worker", out.stderr), out.stderr


def test_websocket_connections_of_every_worker_are_listed(
    cluster: Cluster, tmp_path: Path, gateways: list[Gateway]
) -> None:
    """Each worker names its registry rows apart (host:port/w<i>): a worker's first connection
    clears only its own name's stale rows, not the other worker's live ones."""
    from websockets.asyncio.client import connect

    sim, _ = cluster.sim("m")
    config = tmp_path / "fortress.yaml"
    config.write_text(config_text(tmp_path, sim, auth=False))
    gw = Gateway(tmp_path, config)
    gateways.append(gw)
    ws_url = gw.url.replace("http://", "ws://") + "/v1/ws"

    def listing() -> list[dict[str, Any]]:
        return list(json.loads(http_get(gw.url + "/admin/connections", timeout=5)[1])["connections"])

    async def hold(n: int) -> set[str]:
        conns = [await connect(ws_url, additional_headers=AUDIT_HEADERS) for _ in range(n)]
        try:
            # Rows are written in the background: wait until every worker's are in the store.
            wait_until = time.monotonic() + 15
            rows = listing()
            while len(rows) < n and time.monotonic() < wait_until:
                await asyncio.sleep(0.2)
                rows = listing()
            assert len(rows) == n, rows
            return {str(r["gateway"]) for r in rows}
        finally:
            for c in conns:
                await c.close()

    gateways_named = asyncio.run(hold(12))
    host = socket.gethostname()
    # Twelve connections over two workers (the kernel's spread): both names hold some.
    assert gateways_named == {f"{host}:{gw.port}/w0", f"{host}:{gw.port}/w1"}, gateways_named


def test_a_worker_killed_holding_a_limits_lock_is_taken_over() -> None:
    """The slot locks are semaphores (no system call when free), which the kernel does not
    release for a killed holder: the next worker takes the lock over once it has waited
    ``STALE`` and found the recorded holder gone; the key's limits go on working."""
    from fortress.access import shared_limits

    plan = Plan.compile("p", UsagePlan(rate=None, burst=None, requests={"day": 5}))
    table = SharedLimitTable.create(2, capacity=64)
    lim = SharedLimiter(table, 0)
    slot = lim._slot("key_k")
    pid = os.fork()
    if pid == 0:  # a worker killed in the middle of an admission, the key's lock held
        table.lock(1 + slot)
        os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)
    t0 = time.monotonic()
    decisions = [lim.admit_now("key_k", plan, 0, 0) for _ in range(7)]
    waited = time.monotonic() - t0
    assert shared_limits.STALE <= waited < shared_limits.STALE + 2, waited
    assert table.takeovers == 1
    assert [d.ticket is not None for d in decisions] == [True] * 5 + [False] * 2
