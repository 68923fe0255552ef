"""``GET /metrics`` of a real gateway process after known traffic: exact counts, the replica
and engine series, and the admin rule on the observability endpoints."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import aiohttp
from helpers import http_get, wait_for
from prometheus_client.parser import text_string_to_metric_families

FAST = "health_check: {interval: 0.5, timeout: 0.25}"
TOKENS = 7


def scrape(gw: str, token: str | None = None) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    req = urllib.request.Request(gw + "/metrics")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.headers["content-type"].startswith("text/plain")
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def v(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def chat(session: aiohttp.ClientSession, gw: str, model: str, stream: bool = False) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "one two three"}], "stream": stream}
    async with session.post(gw + "/v1/chat/completions", json=body) as r:
        await r.read()
        return r.status


async def test_known_traffic_gives_exact_series(cluster) -> None:
    """10 requests, 2 of which fail upstream, 3 streamed; plus one for an unknown model."""
    good, _ = cluster.sim("good", "--tokens", str(TOKENS), "--metrics-flavor", "vllm")
    bad, _ = cluster.sim("bad", "--error-rate", "1", "--metrics-flavor", "llamacpp")
    gw, _ = cluster.gateway(
        f"routing: {{max_attempts: 1, engine_metrics_interval: 0.3}}\n"
        f"pools:\n  - model: good\n    {FAST}\n    replicas:\n      - {{url: '{good}'}}\n"
        f"  - model: bad\n    {FAST}\n    replicas:\n      - {{url: '{bad}', tier: secondary}}\n"
    )
    async with aiohttp.ClientSession() as s:
        statuses = [await chat(s, gw, "good", stream=i < 3) for i in range(8)]
        statuses += [await chat(s, gw, "bad") for _ in range(2)]
        statuses.append(await chat(s, gw, "no-such-model"))
    assert statuses == [200] * 8 + [502, 502, 404]

    def settled() -> bool:
        m = scrape(gw)
        return v(m, "fortress_request_duration_seconds_count", model="unknown") == 1

    wait_for(settled, 5, what="the last request observed")
    m = scrape(gw)
    assert v(m, "fortress_requests_total", model="good", status="200", outcome="ok") == 8
    assert v(m, "fortress_requests_total", model="bad", status="502", outcome="upstream_error") == 2
    assert v(m, "fortress_requests_total", model="unknown", status="404", outcome="client_error") == 1
    assert v(m, "fortress_request_duration_seconds_count", model="good") == 8
    assert v(m, "fortress_request_duration_seconds_count", model="bad") == 2
    assert v(m, "fortress_request_duration_seconds_bucket", model="good", le="+Inf") == 8
    assert v(m, "fortress_time_to_first_token_seconds_count", model="good") == 3
    assert v(m, "fortress_inter_token_latency_seconds_count", model="good") == 3
    # The sim counts words ("user one two three" = 4) and emits TOKENS tokens per answer.
    assert v(m, "fortress_tokens_total", model="good", direction="out") == 8 * TOKENS
    assert v(m, "fortress_tokens_total", model="good", direction="in") == 8 * 4
    assert v(m, "fortress_upstream_errors_total", kind="status_5xx") == 2
    assert v(m, "fortress_retries_total", model="bad") == 0
    assert v(m, "fortress_gateway_overhead_seconds_count") == 10
    # Replicas, read at scrape time: the bad one's 500s count as passive failures (two in a row
    # stay under outlier detection's consecutive_5xx, so it is not ejected).
    assert v(m, "fortress_replicas_healthy", model="good", tier="primary") == 1
    assert v(m, "fortress_replica_failures_total", replica="bad-1", model="bad", tier="secondary") == 2
    assert v(m, "fortress_replica_requests_total", replica="good-1", model="good", tier="primary") == 8
    assert v(m, "fortress_replica_info", replica="good-1", model="good", tier="primary", url=good) == 1
    # The gateway's own process series.
    assert (v(m, "process_resident_memory_bytes") or 0) > 0

    # The engines' own /metrics, scraped in the background and re-exported per replica.
    def engines() -> bool:
        m = scrape(gw)
        return (
            v(m, "fortress_engine_generation_tokens_total", replica="good-1", model="good", tier="primary",
              engine="vllm") == 8 * TOKENS
            and v(m, "fortress_engine_scrape_success", replica="bad-1", model="bad", tier="secondary",
                  engine="llamacpp") == 1
        )  # fmt: skip

    wait_for(engines, 10, what="engine metrics re-exported")
    m = scrape(gw)
    labels = {"replica": "good-1", "model": "good", "tier": "primary", "engine": "vllm"}
    assert v(m, "fortress_engine_requests_running", **labels) == 0
    assert v(m, "fortress_engine_kv_cache_usage_ratio", **labels) == 0
    assert v(m, "fortress_engine_prompt_tokens_total", **labels) == 8 * 4
    assert (
        v(
            m,
            "fortress_engine_requests_waiting",
            replica="bad-1",
            model="bad",
            tier="secondary",
            engine="llamacpp",
        )
        == 0
    )
    # Nothing per request or per user in the label sets.
    for name, labelset in m:
        assert not {k for k, _ in labelset} & {"request_id", "key_id", "user", "client"}, name


async def test_in_flight_is_read_from_the_replicas(cluster) -> None:
    # The first token takes long enough that the three requests are still open when seen.
    slow, _ = cluster.sim("m", "--ttft", "5")
    gw, _ = cluster.gateway(f"pools:\n  - model: m\n    {FAST}\n    replicas:\n      - {{url: '{slow}'}}\n")

    def in_flight(n: int) -> bool:
        m = scrape(gw)
        return (
            v(m, "fortress_replica_in_flight", replica="m-1", model="m", tier="primary") == n
            and v(m, "fortress_requests_in_flight", model="m") == n
        )

    async with aiohttp.ClientSession() as s:
        tasks = [asyncio.create_task(chat(s, gw, "m")) for _ in range(3)]
        await asyncio.to_thread(wait_for, lambda: in_flight(3), 30, what="3 requests in flight")
        assert not any(t.done() for t in tasks)  # seen while they were all open
        assert await asyncio.gather(*tasks) == [200, 200, 200]
    wait_for(lambda: in_flight(0), 30, what="nothing in flight")


def test_admin_token_guards_metrics_alarms_and_dashboard(cluster) -> None:
    sim, _ = cluster.sim("m")
    gw, _ = cluster.gateway(
        "server: {admin_token: s3cret}\n"
        f"pools:\n  - model: m\n    {FAST}\n    replicas:\n      - {{url: '{sim}'}}\n"
    )
    for path in ("/metrics", "/alarms", "/dashboard/data", "/dashboard/static/app.js"):
        assert http_get(gw + path)[0] == 401, path
    assert v(scrape(gw, "s3cret"), "fortress_replicas_healthy", model="m", tier="primary") == 1
    req = urllib.request.Request(gw + "/alarms", headers={"Authorization": "Bearer s3cret"})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert {a["name"] for a in json.load(resp)["alarms"]} >= {"unhealthy_replicas", "latency_page"}
    status, body = http_get(gw + "/dashboard")
    assert status == 401 and b"token" in body
    # ?token= trades the token for a cookie (a MAC of it) and redirects to the bare URL.

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        opener.open(gw + "/dashboard?token=s3cret", timeout=5)
        raise AssertionError("expected a redirect")
    except urllib.error.HTTPError as exc:
        assert exc.code == 303 and exc.headers["location"] == "/dashboard"
        cookie = exc.headers["set-cookie"].split(";", 1)[0]
    assert "s3cret" not in cookie
    req = urllib.request.Request(gw + "/dashboard/data", headers={"Cookie": cookie})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert json.load(resp)["tiers"]["primary"]["total"] == 1
    req = urllib.request.Request(gw + "/dashboard", headers={"Cookie": cookie})
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert "default-src 'self'" in resp.headers["content-security-policy"]
        assert b"/dashboard/static/vendor/uPlot.iife.min.js" in resp.read()


def test_access_log_lines_on_stdout(cluster) -> None:
    sim, _ = cluster.sim("m", "--tokens", "3")
    gw, proc = cluster.gateway(f"pools:\n  - model: m\n    {FAST}\n    replicas:\n      - {{url: '{sim}'}}\n")
    req = urllib.request.Request(
        gw + "/v1/chat/completions",
        data=json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode(),
        headers={"content-type": "application/json", "x-request-id": "trace-me-42"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200

    def logged() -> list[dict]:
        lines = [line for line in proc.output().splitlines() if '"request_id":"trace-me-42"' in line]
        return [json.loads(line) for line in lines]

    wait_for(lambda: logged() != [], 5, what="the access log line")
    (rec,) = logged()
    assert (rec["model"], rec["status"], rec["replica"], rec["tier"], rec["tokens_out"]) == (
        "m", 200, "m-1", "primary", 3,
    )  # fmt: skip
    assert rec["latency_ms"] > 0 and rec["attempts"] == 1 and rec["error"] is None


def test_observe_off_leaves_only_the_relay(cluster) -> None:
    sim, _ = cluster.sim("m", "--tokens", "3")
    gw, proc = cluster.gateway(
        "observe: {enabled: false}\n"
        f"pools:\n  - model: m\n    {FAST}\n    replicas:\n      - {{url: '{sim}'}}\n"
    )
    req = urllib.request.Request(
        gw + "/v1/chat/completions",
        data=json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode(),
        headers={"content-type": "application/json", "x-request-id": "unobserved-1"},
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        assert resp.status == 200 and json.load(resp)["usage"]["completion_tokens"] == 3
    for path in ("/metrics", "/alarms", "/dashboard"):
        assert http_get(gw + path)[0] == 404, path
    time.sleep(0.5)  # longer than the access log's buffering
    assert "unobserved-1" not in proc.output()
