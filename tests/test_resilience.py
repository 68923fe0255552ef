"""Failover, ALB health semantics, retries, timeouts, disconnects, draining, model identity.

Replicas here are `fortress sim` processes: these are chaos and timing tests, where a replica
must crash, hang or answer slowly on demand.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable

import aiohttp
import pytest
from helpers import Proc, fortress_argv, free_port, replica_table, sim_argv, wait_for, wait_http

FAST = (
    "health_check: {interval: 0.5, timeout: 0.25}\n"
    "    outlier: {base_ejection_time: 0.2, max_ejection_time: 1}"
)
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
# An ejection that outlasts the test: health checks cannot bring the replica back mid-assertion.
LONG_EJECTION = (
    "base_ejection_time: 0.2, max_ejection_time: 1",
    "base_ejection_time: 60, max_ejection_time: 60",
)


def pool(urls: list[tuple[str, str]], extra: str = "", model: str = "m") -> str:
    reps = "\n".join(f"      - {{url: '{u}', tier: {t}}}" for u, t in urls)
    return f"pools:\n  - model: {model}\n    {FAST}\n{extra}    replicas:\n{reps}\n"


async def post(session: aiohttp.ClientSession, gw: str, body: dict, **kw) -> tuple[int, dict, dict]:
    async with session.post(gw + "/v1/chat/completions", json=body, **kw) as r:
        return r.status, await r.json(content_type=None), dict(r.headers)


async def sim_control(url: str, **changes) -> None:
    async with aiohttp.ClientSession() as s, s.post(url + "/sim/control", json=changes) as r:
        assert r.status == 200, await r.text()


async def sim_stats(url: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(url + "/sim/stats") as r:
        return await r.json()


async def until(pred: Callable[[], bool], seconds: float, what: str) -> None:
    """Poll ``pred`` on the event loop (the clients keep running) until it holds, for ``seconds``."""
    deadline = time.monotonic() + seconds
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        await asyncio.sleep(0.05)


async def until_state(gw: str, url: str, state: str, seconds: float = 30) -> dict:
    """Poll the gateway's replica table (in a thread: the clients keep running) for ``state``."""
    deadline = time.monotonic() + seconds
    while (row := (await asyncio.to_thread(replica_table, gw))[url])["state"] != state:
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} not {state} after {seconds}s: {row}")
        await asyncio.sleep(0.05)
    return row


async def cancelled(url: str, n: int) -> None:
    """Wait until the replica has seen ``n`` clients go away, then check that it is exactly ``n``."""
    deadline = time.monotonic() + 30
    while (seen := (await sim_stats(url))["cancelled"]) < n:
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert seen == n, f"{url}: {seen} cancelled requests, expected {n}"


async def test_failover_drill(cluster, tmp_path) -> None:
    """2 primaries + 1 secondary, 50 concurrent clients; SIGKILL both primaries in turn, restart them.

    Every step waits for what the previous one caused (a state in the replica table, requests
    served), and the assertions are about which replica served requests sent after a known
    event, so they hold however slowly a loaded machine runs the drill.
    """
    ports = [free_port() for _ in range(3)]
    opts = ("--ttft", "0.02", "--itl", "0.005", "--tokens", "8")
    (p1, proc1), (p2, proc2), (s1, _) = (cluster.sim("m", *opts, port=p) for p in ports)
    # A check timeout as long as the interval: a busy event loop must not fail a live replica.
    config = pool([(p1, "primary"), (p2, "primary"), (s1, "secondary")])
    gw, _ = cluster.gateway(config.replace("timeout: 0.25", "timeout: 0.5"))
    wait_for(
        lambda: all(r["state"] == "healthy" for r in replica_table(gw).values()),
        30,
        what="all replicas healthy",
    )
    # (sent, answered, status, replica url): `sent` orders a request after the events before it.
    log: list[tuple[float, float, int, str]] = []
    names = {r["name"]: u for u, r in replica_table(gw).items()}
    stop = False

    async def client(session: aiohttp.ClientSession) -> None:
        while not stop:
            sent = time.monotonic()
            try:
                status, _, headers = await post(session, gw, CHAT)
                replica = names.get(headers.get("x-fortress-replica", ""), "?")
                log.append((sent, time.monotonic(), status, replica))
            except aiohttp.ClientError as exc:
                log.append((sent, time.monotonic(), -1, repr(exc)))

    def served(since: float, *urls: str) -> int:
        return sum(1 for sent, _, status, u in log if sent >= since and status == 200 and u in urls)

    restarted: list[Proc] = []
    t_start = time.monotonic()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = [asyncio.create_task(client(session)) for _ in range(50)]
        try:
            await until(lambda: served(t_start, p1) >= 50 and served(t_start, p2) >= 50, 60, "both primaries")
            proc1.kill(signal.SIGKILL)  # returns once the process is gone
            t_kill1 = time.monotonic()
            await until_state(gw, p1, "unhealthy")
            await until(lambda: served(t_kill1, p2) >= 100, 60, "the other primary carrying on")
            proc2.kill(signal.SIGKILL)
            t_kill2 = time.monotonic()
            await until(lambda: served(t_kill2, s1) >= 100, 60, "the secondary taking over")
            await until_state(gw, p2, "unhealthy")
            t_restart = time.monotonic()
            for port in ports[:2]:
                restarted.append(Proc(sim_argv(port, "m", *opts), tmp_path / f"re-{port}.log"))
            await until(lambda: served(t_restart, p1, p2) >= 1, 60, "traffic back on the primaries")
            back = [await until_state(gw, url, "healthy") for url in (p1, p2)]
            t_back = time.monotonic()
            await until(lambda: served(t_back, p1) >= 50 and served(t_back, p2) >= 50, 60, "both back")
        finally:
            stop = True
            await asyncio.gather(*tasks)
            for p in restarted:
                p.stop()

    failures = [entry for entry in log if entry[2] != 200]
    assert not failures, f"{len(failures)} failed requests, first: {failures[:3]}"
    # Requests sent while a primary was dead went elsewhere, and none of them failed (retries).
    assert not [e for e in log if t_kill1 <= e[0] < t_restart and e[3] == p1]
    # With both primaries dead, the secondary served every request.
    assert {e[3] for e in log if t_kill2 <= e[0] < t_restart} == {s1}
    # Back to the primaries only through the healthy threshold: 2 passing checks in a row.
    assert [row["reason"] for row in back] == ["passed 2 checks"] * 2
    # Once they are healthy again, the secondary gets nothing.
    assert not [e for e in log if e[0] >= t_back and e[3] == s1]


async def test_retry_on_5xx_ejects_and_never_fails_the_client(cluster) -> None:
    bad, _ = cluster.sim("m", "--error-rate", "1")
    good, _ = cluster.sim("m")
    gw, _ = cluster.gateway(pool([(bad, "primary"), (good, "primary")]).replace(*LONG_EJECTION))
    # Both take traffic before the first request (a replica still `initial` gets none).
    wait_for(
        lambda: all(r["state"] == "healthy" for r in replica_table(gw).values()), 30, what="both healthy"
    )
    results = []
    async with aiohttp.ClientSession() as s:
        # The balancer picks at random between two idle replicas: send until the bad one has
        # been picked five times (ejected), however the picks fall; every answer is a 200.
        while replica_table(gw)[bad]["state"] == "healthy" and len(results) < 300:
            results.append(await post(s, gw, CHAT))
    assert all(status == 200 for status, _, _ in results)
    table = replica_table(gw)
    # Outlier detection: out after 5 consecutive 500s (each one retried on the good replica).
    assert table[bad]["state"] == "unhealthy" and table[bad]["failures"] == 5
    assert table[bad]["reason"] == "ejected: 5 consecutive 5xx (last: status 500)"


async def test_all_attempts_failing_answers_502_in_openai_format(cluster) -> None:
    bad, _ = cluster.sim("m", "--error-rate", "1")
    gw, _ = cluster.gateway(pool([(bad, "primary")]))
    async with aiohttp.ClientSession() as s:
        status, body, _ = await post(s, gw, CHAT)
    assert status == 502
    assert body["error"]["type"] == "upstream_error" and "answered 500" in body["error"]["message"]


async def test_no_healthy_replica_is_503_with_retry_after(cluster) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    gw, _ = cluster.gateway(
        pool([(dead, "primary")], "    \n") + "routing: {when_all_unhealthy: reject, retry_after: 7}\n",
        ready=False,
    )
    async with aiohttp.ClientSession() as s:
        status, body, headers = await post(s, gw, CHAT)
        assert status == 503 and headers["Retry-After"] == "7"
        assert body["error"]["code"] == "no_healthy_replica"
        async with s.get(gw + "/ready") as r:
            assert r.status == 503 and (await r.json())["models_without_healthy_replica"] == ["m"]


async def test_fail_open_tries_unhealthy_replicas(cluster) -> None:
    url, _ = cluster.sim("m")
    gw, _ = cluster.gateway(pool([(url, "primary")]))
    await sim_control(url, health="down")
    wait_for(lambda: replica_table(gw)[url]["state"] == "unhealthy", 30, what="unhealthy")
    async with aiohttp.ClientSession() as s:
        status, _, _ = await post(s, gw, CHAT)
    assert status == 200  # fail_open (the default): the model still answers


async def test_slow_health_check_times_out_then_recovers(cluster) -> None:
    slow, _ = cluster.sim("m")
    other, _ = cluster.sim("m")
    gw, _ = cluster.gateway(pool([(slow, "primary"), (other, "primary")]))
    await sim_control(slow, health_delay=1.0)  # longer than the 0.25 s check timeout
    t0 = time.monotonic()
    wait_for(lambda: replica_table(gw)[slow]["state"] == "unhealthy", 30, what="unhealthy")
    # Two failed checks, 0.5 s apart, each taking the 0.25 s timeout: it cannot be sooner.
    assert time.monotonic() - t0 >= 0.5
    assert "timeout" in replica_table(gw)[slow]["last_check_detail"]
    async with aiohttp.ClientSession() as s:
        served = {(await post(s, gw, CHAT))[2]["x-fortress-replica"] for _ in range(10)}
    assert served == {replica_table(gw)[other]["name"]}
    await sim_control(slow, health_delay=0)
    wait_for(lambda: replica_table(gw)[slow]["state"] == "healthy", 30, what="healthy again")


async def test_new_replica_starts_initial_and_gets_traffic_after_one_check(cluster) -> None:
    first, _ = cluster.sim("m")
    gw, _ = cluster.gateway(pool([(first, "primary")]))
    new, _ = cluster.sim("m")
    async with aiohttp.ClientSession() as s:
        async with s.post(gw + "/admin/replicas", json={"url": new, "tier": "primary", "model": "m"}) as r:
            assert r.status == 201
            added = await r.json()
        assert added["state"] == "initial"
        wait_for(lambda: replica_table(gw)[new]["state"] == "healthy", 30, what="healthy")
        served = {(await post(s, gw, CHAT))[2]["x-fortress-replica"] for _ in range(30)}
    assert added["name"] in served
    assert (added["name"], added["origin"]["kind"]) == ("m-2", "admin")  # the pool's next name


async def test_admin_replica_input_errors_are_openai_errors_and_change_nothing(cluster) -> None:
    first, _ = cluster.sim("m")
    gw, _ = cluster.gateway(pool([(first, "primary")]))
    cases = [
        ({"url": first, "model": "m", "name": "m-1"}, 409, "name"),  # the name is taken
        ({"url": "ftp://x", "model": "m"}, 400, "url"),
        ({"url": first, "model": "m", "tier": "gold"}, 400, None),
        ({"url": first, "model": "m", "name": ""}, 400, None),
        ({"tier": "primary"}, 400, None),  # no url
        ({"url": first, "model": "other"}, 404, None),
    ]
    async with aiohttp.ClientSession() as s:
        for body, status, param in cases:
            async with s.post(gw + "/admin/replicas", json=body) as r:
                answer = await r.json()
                assert r.status == status, (body, answer)
                assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["message"]
                assert answer["error"]["param"] == param
        async with s.put(gw + "/admin/replicas", json={}) as r:
            assert r.status == 405 and (await r.json())["error"]["message"]
    assert list(replica_table(gw)) == [first]  # nothing was added


async def test_hung_replica_first_byte_timeout_retries_elsewhere(cluster) -> None:
    hung, _ = cluster.sim("m", "--hang-rate", "1")
    good, _ = cluster.sim("m")
    config = pool([(hung, "primary"), (good, "primary")]) + "timeouts: {first_byte: 0.5}\n"
    config = config.replace("outlier: {", "outlier: {consecutive_gateway_failure: 2, ").replace(
        *LONG_EJECTION
    )
    gw, _ = cluster.gateway(config)
    async with aiohttp.ClientSession() as s:
        # Rounds of concurrent requests until the balancer has sent the hung replica two (on a
        # slow machine the requests of a round arrive apart and may all go to the good one).
        statuses: list[int] = []
        deadline = time.monotonic() + 60
        while replica_table(gw)[hung]["state"] != "unhealthy":
            assert time.monotonic() < deadline, f"the hung replica was never ejected: {statuses}"
            statuses += [
                status for status, _, _ in await asyncio.gather(*(post(s, gw, CHAT) for _ in range(6)))
            ]
        assert statuses and set(statuses) == {200}  # every timeout was retried elsewhere
        row = replica_table(gw)[hung]
        assert row["state"] == "unhealthy" and row["failures"] >= 2
        assert "consecutive gateway failures (last: first_byte timeout)" in row["reason"]
        # Out of rotation now: no request is sent to the hung replica (to wait for its timeout).
        before = (await sim_stats(hung))["requests"]
        assert [(await post(s, gw, CHAT))[0] for _ in range(4)] == [200] * 4
        assert (await sim_stats(hung))["requests"] == before


async def test_first_byte_timeout_gives_504(cluster) -> None:
    slow, _ = cluster.sim("m", "--ttft", "5")
    gw, _ = cluster.gateway(
        pool([(slow, "primary")]) + "timeouts: {first_byte: 0.3}\nrouting: {max_attempts: 1}\n"
    )
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as s:
        status, body, _ = await post(s, gw, CHAT)
    assert status == 504 and "first_byte timeout" in body["error"]["message"]
    # Not before the 0.3 s timeout, and before the replica's first byte (5 s) could have come.
    assert 0.3 <= time.monotonic() - t0 < 5.0
    # The gateway hung up on the replica, which sees its client go away.
    await cancelled(slow, 1)


async def test_idle_and_total_timeouts_end_streams_with_an_error_event(cluster) -> None:
    slow, _ = cluster.sim("m", "--itl", "1.0", "--tokens", "5")
    gw, _ = cluster.gateway(pool([(slow, "primary")]) + "timeouts: {idle: 0.4}\n")
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw + "/v1/chat/completions", json={**CHAT, "stream": True}) as r,
    ):
        assert r.status == 200
        text = (await r.read()).decode()
    events = [e for e in text.split("\n\n") if e]
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"
    err = json.loads(events[-1][6:])
    assert err["error"]["code"] == "gateway_timeout" and "idle timeout" in err["error"]["message"]
    assert "[DONE]" not in text

    steady, _ = cluster.sim("m", "--itl", "0.1", "--tokens", "50")
    gw2, _ = cluster.gateway(pool([(steady, "primary")]) + "timeouts: {total: 0.8}\n")
    t0 = time.monotonic()
    async with (
        aiohttp.ClientSession() as s,
        s.post(gw2 + "/v1/chat/completions", json={**CHAT, "stream": True}) as r,
    ):
        text = (await r.read()).decode()
    assert time.monotonic() - t0 < 50 * 0.1  # ended before the whole stream could have come
    assert "total timeout" in text and "[DONE]" not in text


async def test_client_disconnect_cancels_upstream_and_frees_the_replica(cluster) -> None:
    url, _ = cluster.sim("m", "--itl", "0.2", "--tokens", "100")
    gw, _ = cluster.gateway(pool([(url, "primary")]))
    async with aiohttp.ClientSession() as s:
        r = await s.post(gw + "/v1/chat/completions", json={**CHAT, "stream": True})
        await r.content.readuntil(b"\n\n")
        assert replica_table(gw)[url]["in_flight"] == 1
        r.close()  # the client goes away mid-stream
    wait_for(lambda: replica_table(gw)[url]["in_flight"] == 0, 30, what="in-flight freed")
    await cancelled(url, 1)

    await sim_control(url, ttft=5.0)
    async with aiohttp.ClientSession() as s:
        with pytest.raises(asyncio.TimeoutError):
            await post(s, gw, CHAT, timeout=aiohttp.ClientTimeout(total=0.5))
    wait_for(lambda: replica_table(gw)[url]["in_flight"] == 0, 30, what="in-flight freed")
    await cancelled(url, 2)


async def test_draining_finishes_in_flight_and_takes_no_new_requests(cluster) -> None:
    a, _ = cluster.sim("m", "--itl", "0.1", "--tokens", "40")  # in flight while the test looks
    b, _ = cluster.sim("m")
    gw, _ = cluster.gateway(pool([(a, "primary"), (b, "secondary")], "    deregistration_delay: 10\n"))
    name_a = replica_table(gw)[a]["name"]
    async with aiohttp.ClientSession() as s:
        stream = await s.post(gw + "/v1/chat/completions", json={**CHAT, "stream": True})
        assert stream.headers["x-fortress-replica"] == name_a
        drain = asyncio.create_task(s.delete(gw + f"/admin/replicas/{name_a}"))
        await asyncio.to_thread(wait_for, lambda: replica_table(gw)[a]["state"] == "draining", 30)
        during = [(await post(s, gw, CHAT))[2]["x-fortress-replica"] for _ in range(5)]
        assert name_a not in during
        text = (await stream.read()).decode()
        assert text.rstrip().endswith("data: [DONE]")  # the in-flight stream finished whole
        resp = await asyncio.wait_for(drain, 30)
        assert resp.status == 200
    assert a not in replica_table(gw)


async def test_model_identity_is_strict_end_to_end(cluster) -> None:
    right, right_proc = cluster.sim("m")
    wrong, _ = cluster.sim("other")
    gw, _ = cluster.gateway(pool([(right, "primary"), (wrong, "primary")]), ready=False)
    wait_for(lambda: replica_table(gw)[right]["state"] == "healthy", 30, what="healthy")
    wait_for(lambda: "not 'm'" in replica_table(gw)[wrong]["last_check_detail"], 30, what="mismatch")
    async with aiohttp.ClientSession() as s:
        models = {(await post(s, gw, CHAT))[1]["model"] for _ in range(10)}
        assert models == {"m"}
        right_proc.kill()
        for _ in range(5):
            status, body, _ = await post(s, gw, CHAT)
            # Never a silent switch: the replica serving "other" is not used, the call fails loudly.
            assert status in (502, 503), body
            assert body["error"]["type"] in ("upstream_error", "service_unavailable")


async def test_serve_with_replica_flags_discovers_models(cluster, tmp_path) -> None:
    x, _ = cluster.sim("model-x")
    y, _ = cluster.sim("model-y")
    port = free_port()
    proc = Proc(
        fortress_argv("serve", "--replica", x, "--secondary", y, "--port", str(port)),
        tmp_path / "gw.log",
        env={
            "FORTRESS__AUTH__ENABLED": "false",
            "FORTRESS__AUDIT__ENABLED": "false",
            "FORTRESS__STATE_DIR": str(tmp_path / "state"),
        },
    )
    cluster.procs.append(proc)
    gw = f"http://127.0.0.1:{port}"
    wait_http(gw + "/ready", timeout=20)
    async with aiohttp.ClientSession() as s:
        async with s.get(gw + "/v1/models") as r:
            assert sorted(m["id"] for m in (await r.json())["data"]) == ["model-x", "model-y"]
        for model in ("model-x", "model-y"):
            status, body, headers = await post(s, gw, {**CHAT, "model": model})
            assert status == 200 and body["model"] == model
        assert headers["x-fortress-tier"] == "secondary"
