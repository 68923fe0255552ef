"""The live dashboard in a real browser (Debian's chromium, driven by Playwright).

While traffic runs, the page's numbers change without a reload; a replica killed with SIGKILL
shows as unhealthy within a few seconds and the unhealthy-replica alarm fires. The page loads
nothing from anywhere but the gateway. The final state is saved to ``docs/dashboard.png``.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from helpers import ROOT, replica_table, wait_for
from playwright.async_api import async_playwright

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = ROOT / "docs" / "dashboard.png"


async def traffic(gw: str, stop: asyncio.Event, sent: list[int]) -> None:
    """Two clients: streams and plain requests, with a pause so the charts show a rate."""

    async def client(stream: bool) -> None:
        body = {"model": "m", "messages": [{"role": "user", "content": "tell me a story"}], "stream": stream}
        async with aiohttp.ClientSession() as s:
            while not stop.is_set():
                with contextlib.suppress(aiohttp.ClientError):
                    async with s.post(gw + "/v1/chat/completions", json=body) as r:
                        await r.read()
                        sent.append(r.status)
                await asyncio.sleep(0.05)

    await asyncio.gather(client(True), client(False))


DASH = "\u2013"  # what the page shows for "no value yet"


async def number(page, selector: str) -> int:  # type: ignore[no-untyped-def]
    return int((await page.text_content(selector) or "0").strip() or 0)


async def until(check, seconds: float, what: str) -> None:  # type: ignore[no-untyped-def]
    """Poll from Python: the page's CSP (no eval) rules out wait_for_function with a string."""
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for {what}")
        await asyncio.sleep(0.1)


async def test_dashboard_live_in_chromium(cluster) -> None:
    if not await asyncio.to_thread(Path(CHROMIUM).exists):
        pytest.fail("chromium is missing: `make test` installs it (scripts/system-deps.sh chromium:chromium)")
    opts = ("--ttft", "0.05", "--itl", "0.01", "--tokens", "12")
    (p1, _), (p2, proc2), (s1, _) = cluster.sim("m", *opts), cluster.sim("m", *opts), cluster.sim("m", *opts)
    gw, _ = cluster.gateway(
        "pools:\n  - model: m\n    health_check: {interval: 0.5, timeout: 0.25}\n    replicas:\n"
        f"      - {{url: '{p1}', tier: primary}}\n      - {{url: '{p2}', tier: primary}}\n"
        f"      - {{url: '{s1}', tier: secondary}}\n"
        "routing: {engine_metrics_interval: 1}\n"
        "observe: {alarms: {evaluate_every: 0.5}}\n"
    )
    wait_for(lambda: all(r["state"] == "healthy" for r in replica_table(gw).values()), 10, what="healthy")
    stop = asyncio.Event()
    sent: list[int] = []
    load = asyncio.create_task(traffic(gw, stop, sent))
    foreign: list[str] = []
    errors: list[str] = []
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = await browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda r: None if r.url.startswith(gw) else foreign.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(gw + "/dashboard")
            await page.wait_for_selector("#conn.pill-ok", timeout=10_000)
            await page.wait_for_selector(f'tr[data-url="{p2}"][data-state="healthy"]', timeout=10_000)
            assert await page.text_content("#healthy") == "3 / 3"

            # Numbers move without a reload.
            first = await number(page, "#total-requests")
            await until(lambda: _more(page, first + 10), 10, "the request count to grow")
            assert await page.text_content("#rps") not in (DASH, "0.0")
            assert (await page.text_content("#p95")) != DASH
            assert (await page.text_content("#ttft-p95")) != DASH
            await page.wait_for_timeout(4000)  # some history in the charts

            # SIGKILL a primary: it shows as unhealthy within a few seconds.
            proc2.kill(signal.SIGKILL)
            t0 = time.monotonic()
            await page.wait_for_selector(f'tr[data-url="{p2}"][data-state="unhealthy"]', timeout=5_000)
            noticed = time.monotonic() - t0
            assert noticed < 5.0
            await until(lambda: _text_is(page, "#healthy", "2 / 3"), 5, "2 of 3 healthy")
            await page.wait_for_selector(
                'tr[data-alarm="unhealthy_replicas"][data-state="firing"]', timeout=5_000
            )
            assert "bad" in (await page.get_attribute("#tile-healthy", "class") or "")
            await page.wait_for_timeout(2500)  # the charts show the failure
            SCREENSHOT.parent.mkdir(exist_ok=True)
            await page.screenshot(path=str(SCREENSHOT), full_page=True)
            await browser.close()
    finally:
        stop.set()
        await load
    assert foreign == [], f"the page fetched from elsewhere: {foreign}"
    assert errors == [], errors
    assert sent.count(200) > 20
    assert SCREENSHOT.stat().st_size > 10_000


async def _more(page, n: int) -> bool:  # type: ignore[no-untyped-def]
    return await number(page, "#total-requests") > n


async def _text_is(page, selector: str, text: str) -> bool:  # type: ignore[no-untyped-def]
    return await page.text_content(selector) == text
