"""llama.cpp engine metrics read from the real llama-server the suite runs (``--metrics``), all
the way to the gateway's own ``fortress_engine_*`` series."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from conftest import Cluster
from helpers import http_get, http_post, wait_for
from prometheus_client.parser import text_string_to_metric_families

from fortress.routing.load import LLAMACPP_SERIES, parse_engine_metrics

# More concurrent requests than the server's 4 slots (-np 4): the rest wait in its queue.
CONCURRENT = 6
MAX_TOKENS = 48


def llama_series(text: str) -> dict[str, float]:
    """The llama.cpp series Fortress reads, as the server printed them."""
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in LLAMACPP_SERIES
    }


def engine_series(gateway: str) -> dict[str, float]:
    """``fortress_engine_*`` samples of the gateway's one replica, by name."""
    status, body = http_get(gateway + "/metrics", timeout=10)
    assert status == 200
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name.startswith("fortress_engine_"):
                assert s.labels == {
                    "replica": "smollm2-1",
                    "model": "smollm2",
                    "tier": "primary",
                    "engine": "llamacpp",
                }, s.labels
                out[s.name] = s.value
    return out


def test_the_real_llama_server_metrics_parse_as_llamacpp(llama_url: str) -> None:
    status, body = http_get(llama_url + "/metrics", timeout=10)
    assert status == 200
    text = body.decode()
    raw = llama_series(text)
    # The series the balancers and dashboards rely on are still named as Fortress reads them.
    for name in ("llamacpp:requests_processing", "llamacpp:requests_deferred"):
        assert name in raw, f"{name} missing from llama-server's /metrics:\n{text[:2000]}"
    sample = parse_engine_metrics(text)
    assert sample.ok and sample.engine == "llamacpp"
    assert sample.running == raw["llamacpp:requests_processing"]
    assert sample.waiting == raw["llamacpp:requests_deferred"]
    assert sample.prompt_tokens == raw["llamacpp:prompt_tokens_total"]
    assert sample.generation_tokens == raw["llamacpp:tokens_predicted_total"]


def test_the_gateway_reports_the_real_engines_queue_and_token_counts(
    llama_url: str, cluster: Cluster
) -> None:
    gw, _ = cluster.gateway(
        "pools:\n  - model: smollm2\n    health_check: {interval: 1, timeout: 0.5}\n"
        f"    replicas: [{{url: '{llama_url}'}}]\n"
        "routing: {engine_metrics_interval: 0.2}\n"
    )
    wait_for(lambda: "fortress_engine_scrape_success" in engine_series(gw), 20, what="a first scrape")
    before = engine_series(gw)
    assert before["fortress_engine_scrape_success"] == 1

    def complete(i: int) -> dict[str, Any]:
        body = {
            "model": "smollm2",
            "prompt": f"Story number {i}: once upon a time",
            "max_tokens": MAX_TOKENS,
            "ignore_eos": True,  # llama-server: always generate max_tokens
        }
        status, raw = http_post(gw + "/v1/completions", json.dumps(body).encode(), timeout=300)
        assert status == 200, raw[:300]
        return json.loads(raw)["usage"]

    peak = {"running": 0.0, "waiting": 0.0}
    with ThreadPoolExecutor(CONCURRENT) as pool:
        futures = [pool.submit(complete, i) for i in range(CONCURRENT)]
        # While the server is full, the gateway's series show its slots busy and the rest queued.
        deadline = time.monotonic() + 120
        while not all(f.done() for f in futures) and time.monotonic() < deadline:
            m = engine_series(gw)
            peak["running"] = max(peak["running"], m.get("fortress_engine_requests_running", 0))
            peak["waiting"] = max(peak["waiting"], m.get("fortress_engine_requests_waiting", 0))
            time.sleep(0.1)
        usages = [f.result() for f in futures]
    assert peak["running"] == 4, peak  # llama-server runs with -np 4
    assert peak["waiting"] >= 1, peak

    # Once done: idle again, and the counters moved by what the answers' usage says.
    generated = sum(u["completion_tokens"] for u in usages)
    prompted = sum(
        u["prompt_tokens"] - u.get("prompt_tokens_details", {}).get("cached_tokens", 0) for u in usages
    )
    assert generated == CONCURRENT * MAX_TOKENS

    def settled() -> bool:
        m = engine_series(gw)
        return (
            m.get("fortress_engine_requests_running") == 0
            and m.get("fortress_engine_requests_waiting") == 0
            and m.get("fortress_engine_generation_tokens_total", 0)
            - before["fortress_engine_generation_tokens_total"]
            == generated
        )

    wait_for(settled, 30, interval=0.2, what="the engine's counters after the requests")
    after = engine_series(gw)
    # llama.cpp counts prompt tokens without those reused from its cache.
    assert (
        after["fortress_engine_prompt_tokens_total"] - before["fortress_engine_prompt_tokens_total"]
        == prompted
    )
