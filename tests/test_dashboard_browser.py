"""The live dashboard in a real browser (Debian's chromium, driven by Playwright).

While traffic runs, the page's numbers change without a reload; a replica killed with SIGKILL
shows as unhealthy within a few seconds and the unhealthy-replica alarm fires. The charts draw
the gateway's history: the dip survives a reload, and the time axis' labels are short local
times that never overlap. The page loads nothing from anywhere but the gateway. The final state
is saved as a screenshot: in the test's temporary directory, or where ``FORTRESS_SCREENSHOT``
says (``make screenshot`` refreshes ``docs/dashboard.png``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
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


def screenshot_path(tmp_path: Path) -> Path:
    """Where the final state is saved: a run of the suite leaves the checkout as it was."""
    wanted = os.environ.get("FORTRESS_SCREENSHOT")
    return ROOT / wanted if wanted else tmp_path / "dashboard.png"


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


async def test_dashboard_live_in_chromium(cluster, tmp_path: Path) -> None:
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
            # The gateway's history has a point with every replica healthy (a point every 5 s).
            await page.wait_for_selector('#chart-health[data-max-healthy="3"]', timeout=15_000)

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
            # The history records the dip; the page's charts draw it.
            await page.wait_for_selector('#chart-health[data-last-healthy="2"]', timeout=15_000)
            await page.wait_for_selector('#chart-health[data-max-unhealthy="1"]', timeout=15_000)
            for chart in ("chart-rps", "chart-latency", "chart-tokens", "chart-health"):
                await _check_time_axis(page, chart)
            before = await page.get_attribute("#chart-health", "data-points")
            first = await page.get_attribute("#chart-health", "data-first")
            assert before is not None and int(before) >= 3

            # A reload keeps the history: it comes from the gateway, not from the page.
            await page.reload()
            await page.wait_for_selector("#conn.pill-ok", timeout=10_000)
            await page.wait_for_selector("#chart-health[data-points]", timeout=10_000)
            assert int(await page.get_attribute("#chart-health", "data-points") or 0) >= int(before)
            assert await page.get_attribute("#chart-health", "data-first") == first
            assert await page.get_attribute("#chart-health", "data-last-healthy") == "2"
            assert await page.get_attribute("#chart-health", "data-max-healthy") == "3"
            assert await page.get_attribute("#chart-health", "data-max-unhealthy") == "1"
            await _check_time_axis(page, "chart-health")
            await until(lambda: _text_is(page, "#healthy", "2 / 3"), 5, "2 of 3 healthy after the reload")
            screenshot = screenshot_path(tmp_path)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(screenshot), full_page=True)
            await browser.close()
    finally:
        stop.set()
        await load
    assert foreign == [], f"the page fetched from elsewhere: {foreign}"
    assert errors == [], errors
    assert sent.count(200) > 20
    assert screenshot.stat().st_size > 10_000


async def _more(page, n: int) -> bool:  # type: ignore[no-untyped-def]
    return await number(page, "#total-requests") > n


async def _text_is(page, selector: str, text: str) -> bool:  # type: ignore[no-untyped-def]
    return await page.text_content(selector) == text


LABEL = re.compile(r"^\d\d:\d\d(:\d\d)?$")  # local HH:MM, or HH:MM:SS for ticks under a minute


async def _check_time_axis(page, chart: str) -> None:  # type: ignore[no-untyped-def]
    """The chart's time labels: a few short, distinct local times whose boxes do not overlap."""
    labels = await page.query_selector_all(f"#{chart} .xlabel")
    texts = [await label.text_content() or "" for label in labels]
    assert 2 <= len(texts) <= 12, texts
    assert all(LABEL.match(t) for t in texts), texts
    assert len(set(texts)) == len(texts), texts
    boxes = [await label.bounding_box() for label in labels]
    assert all(b is not None and b["width"] > 0 for b in boxes), boxes
    spans = sorted((b["x"], b["x"] + b["width"], b["y"], b["height"]) for b in boxes if b is not None)
    assert len({(y, h) for _, _, y, h in spans}) == 1, spans  # one line, nothing wrapped
    for (_, right, _, _), (left, _, _, _) in itertools.pairwise(spans):
        assert right <= left, f"{chart}: tick labels overlap: {texts} {spans}"
    plot = await page.query_selector(f"#{chart} .u-over")
    assert plot is not None
    area = await plot.bounding_box()
    assert area is not None and all(y >= area["y"] + area["height"] for _, _, y, _ in spans)  # below the plot


async def test_the_dashboard_shows_a_fleets_replicas_over_time_and_its_decisions(tmp_path: Path) -> None:
    from test_fleet_local import Gateway, sim_pool

    if not await asyncio.to_thread(Path(CHROMIUM).exists):
        pytest.fail("chromium is missing: `make test` installs it (scripts/system-deps.sh chromium:chromium)")
    pool = sim_pool(min_replicas=1, max_replicas=2, idle_to_zero=None)
    gw = await asyncio.to_thread(Gateway, tmp_path, pool)
    errors: list[str] = []
    try:
        await asyncio.to_thread(wait_for, lambda: gw.fleet()["healthy"] == 1, 60, 0.1, "one replica")
        status, _ = await asyncio.to_thread(gw.admin, "/admin/fleet/m/scale", {"replicas": 2})
        assert status == 200
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = await browser.new_page(viewport={"width": 1400, "height": 1200})
            page.on("pageerror", lambda e: errors.append(str(e)))
            await page.goto(gw.url + "/dashboard")
            await page.wait_for_selector("#conn.pill-ok", timeout=10_000)
            # The decision is in the table; the chart draws both replicas once the history has a
            # point with them (a point every 5 s).
            await page.wait_for_selector('#fleet-decisions tr[data-kind="manual"]', timeout=10_000)
            row = await page.text_content('#fleet-decisions tr[data-kind="manual"]') or ""
            assert "1 → 2" in row and "held at 2 by the operator" in row, row
            await page.wait_for_selector('#chart-fleet[data-max-current="2"]', timeout=30_000)
            assert await page.is_visible("#fleet-chart-box")
            await browser.close()
    finally:
        await asyncio.to_thread(gw.stop)
    assert errors == []
