"""Engine load lives in routing: each replica's own /metrics becomes ``replica.load``, which
balancers read, also when observe is off."""

from __future__ import annotations

import asyncio

import aiohttp

from fortress.config import parse_config
from fortress.runtime import Runtime


async def test_engine_load_is_scraped_with_observe_off(cluster) -> None:
    vllm, _ = cluster.sim("m", "--ttft", "1.0", "--metrics-flavor", "vllm")
    llama, _ = cluster.sim("m", "--metrics-flavor", "llamacpp")
    cfg = parse_config(
        "pools:\n  - model: m\n    health_check: {interval: 0.5, timeout: 0.25}\n    replicas:\n"
        f"      - {{url: '{vllm}'}}\n      - {{url: '{llama}', tier: secondary}}\n"
        "routing: {engine_metrics_interval: 0.2}\n"
        "auth: {enabled: false}\naudit: {enabled: false}\nobserve: {enabled: false}\n",
        env={},
    )
    runtime = Runtime(cfg)
    assert runtime.observe is None and runtime.gateway.observers == ()
    a, b = runtime.router.all_replicas()
    await runtime.start()
    try:
        # Two requests held by the first replica: its engine reports them running.
        async with aiohttp.ClientSession() as s:
            body = {"model": "m", "prompt": "x"}
            held = [asyncio.create_task(s.post(vllm + "/v1/completions", json=body)) for _ in range(2)]
            for _ in range(100):
                if a.load is not None and a.load.running == 2 and b.load is not None:
                    break
                await asyncio.sleep(0.05)
            for t in held:
                (await t).release()
        assert a.load is not None and a.load.ok and a.load.engine == "vllm" and a.load.running == 2
        assert a.load.kv_usage is not None
        assert b.load is not None and b.load.ok and b.load.engine == "llamacpp"
        assert b.load.running == 0 and b.load.waiting == 0
    finally:
        await runtime.stop()


async def test_no_scraping_when_the_interval_is_zero(cluster) -> None:
    sim, _ = cluster.sim("m")
    cfg = parse_config(
        f"pools:\n  - model: m\n    replicas: [{{url: '{sim}'}}]\n"
        "routing: {engine_metrics_interval: 0}\n"
        "auth: {enabled: false}\naudit: {enabled: false}\nobserve: {enabled: false}\n",
        env={},
    )
    runtime = Runtime(cfg)
    await runtime.start()
    try:
        await asyncio.sleep(0.5)
        assert [r.load for r in runtime.router.all_replicas()] == [None]
        assert not runtime.load.enabled
    finally:
        await runtime.stop()
