"""Passive outlier detection (Envoy-style): units with a fake clock, then drills against real
gateways in front of `fortress sim` replicas (random 5xx, a poison request, SIGKILL under load,
a replica that answers 500 to everything)."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
from helpers import replica_table, wait_for

from fortress.config import Tier, parse_config
from fortress.routing.outlier import Failure, OutlierDetector
from fortress.routing.pool import Router
from fortress.routing.replica import State

# -- units -------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def setup(outlier: str = "", primaries: int = 3) -> tuple[Router, OutlierDetector, Clock]:
    reps = "\n".join(f"      - {{url: 'http://p{i}'}}" for i in range(primaries))
    cfg = parse_config(
        f"pools:\n  - model: m\n    outlier: {{{outlier}}}\n    replicas:\n{reps}\n"
        "      - {url: 'http://s0', tier: secondary}\n",
        env={},
    )
    clock = Clock()
    router = Router(cfg, clock=clock)
    for r in router.all_replicas():
        router.set_models(r, frozenset({"m"}))
        r.state = State.HEALTHY
    woken: list[str] = []
    det = OutlierDetector(router, clock, on_eject=lambda r: woken.append(r.name))
    det.woken = woken  # type: ignore[attr-defined]
    return router, det, clock


def primaries(router: Router) -> list:
    return [r for r in router.all_replicas() if r.tier is Tier.PRIMARY]


def test_five_consecutive_5xx_eject_and_a_success_resets_the_count() -> None:
    router, det, clock = setup()
    p0 = primaries(router)[0]
    for _ in range(4):
        assert not det.failure(p0, Failure.STATUS, "status 500", 500)
    det.success(p0)  # one good answer: the count starts over
    for _ in range(4):
        assert not det.failure(p0, Failure.STATUS, "status 500", 500)
    assert p0.state is State.HEALTHY and p0.failures == 8
    assert det.failure(p0, Failure.STATUS, "status 500", 500)
    assert p0.state is State.UNHEALTHY and p0.ejected
    assert p0.reason.startswith("ejected: 5 consecutive 5xx")
    assert p0.ejected_until == clock.now + 30  # base_ejection_time
    assert det.woken == [p0.name]  # the health checker re-plans its next check


def test_timeouts_and_gateway_statuses_count_as_gateway_failures() -> None:
    router, det, _ = setup("consecutive_5xx: 0, consecutive_gateway_failure: 3")
    p0, p1, _ = primaries(router)
    for _ in range(5):
        det.failure(p0, Failure.STATUS, "status 500", 500)  # a plain 500 is not a gateway failure
    assert p0.state is State.HEALTHY
    det.failure(p1, Failure.TIMEOUT, "first_byte timeout")
    det.failure(p1, Failure.STATUS, "status 503", 503)
    assert p1.state is State.HEALTHY
    assert det.failure(p1, Failure.TIMEOUT, "idle timeout")
    assert "3 consecutive gateway failures" in p1.reason


def test_refused_or_reset_ejects_at_once_and_ignores_the_cap() -> None:
    router, det, _ = setup("max_ejection_percent: 10")
    p0, p1, p2 = primaries(router)
    assert det.failure(p0, Failure.CONNECT, "connect failed (Connection refused)")
    assert det.failure(p1, Failure.RESET, "connection closed by replica")
    assert det.failure(p2, Failure.CONNECT, "connect failed (Connection refused)")
    assert all(r.ejected for r in (p0, p1, p2))  # a dead process is out, whatever the cap


def test_max_ejection_percent_keeps_the_tier() -> None:
    router, det, _ = setup("max_ejection_percent: 50")
    p0, p1, p2 = primaries(router)
    for _ in range(5):
        det.failure(p0, Failure.STATUS, "status 500", 500)
    assert p0.ejected
    for r in (p1, p2):
        for _ in range(10):
            assert not det.failure(r, Failure.STATUS, "status 500", 500)
    # 3 primaries x 50 % = 1: the other two stay in rotation.
    assert p1.state is State.HEALTHY and p2.state is State.HEALTHY and det.skipped == 12
    secondary = next(r for r in router.all_replicas() if r.tier is Tier.SECONDARY)
    for _ in range(5):
        det.failure(secondary, Failure.STATUS, "status 500", 500)
    assert secondary.ejected  # the cap is per tier, and one replica may always be ejected


def test_ejection_time_grows_with_each_ejection_and_is_capped() -> None:
    router, det, clock = setup("base_ejection_time: 10, max_ejection_time: 25")
    p0 = primaries(router)[0]
    times = []
    for _ in range(4):
        for _ in range(5):
            det.failure(p0, Failure.STATUS, "status 500", 500)
        assert p0.ejected
        times.append(p0.ejected_until - clock.now)
        clock.now = p0.ejected_until
        p0.record_check(True, "200", clock.now, 0)
        p0.record_check(True, "200", clock.now, 0)
        assert p0.state is State.HEALTHY
    assert times == [10, 20, 25, 25]
    det.success(p0)
    for _ in range(5):
        det.failure(p0, Failure.STATUS, "status 500", 500)
    assert p0.ejected_until - clock.now == 10  # an answered request starts the multiplier over


def test_a_poison_request_that_fails_everywhere_ejects_nobody() -> None:
    router, det, _ = setup()
    route = router.route("m")
    tried: tuple = ()
    for _ in range(3):  # max_attempts: each attempt on another primary, each answers 500
        r = router.pick(route, None, tried)
        assert r is not None
        tried += (r,)
        det.failure(r, Failure.STATUS, "status 500", 500)
    assert router.healthy_count(route) == 4


# -- drills: real gateways and `fortress sim` replicas ------------------------------------------

FAST = "health_check: {interval: 0.5, timeout: 0.25}"
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def config(urls: list[tuple[str, str]], outlier: str = "", routing: str = "") -> str:
    reps = "\n".join(f"      - {{url: '{u}', tier: {t}}}" for u, t in urls)
    out = f"pools:\n  - model: m\n    {FAST}\n    outlier: {{{outlier}}}\n    replicas:\n{reps}\n"
    return out + (f"routing: {{{routing}}}\n" if routing else "")


async def post(session: aiohttp.ClientSession, gw: str, body: dict) -> tuple[int, dict, str]:
    async with session.post(gw + "/v1/chat/completions", json=body) as r:
        return r.status, await r.json(content_type=None), r.headers.get("x-fortress-replica", "")


async def load(gw: str, seconds: float, clients: int = 20) -> list[tuple[float, int, str]]:
    """``clients`` loops posting chats for ``seconds``: (time, status, replica) per request."""
    log: list[tuple[float, int, str]] = []
    stop = time.monotonic() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < stop:
            try:
                status, _, replica = await post(session, gw, CHAT)
            except aiohttp.ClientError as exc:
                status, replica = -1, repr(exc)
            log.append((time.monotonic(), status, replica))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return log


def all_healthy(gw: str, n: int) -> None:
    wait_for(
        lambda: [r["state"] for r in replica_table(gw).values()] == ["healthy"] * n,
        15,
        what=f"{n} healthy replicas",
    )


async def test_random_5xx_on_primaries_keep_the_tier_and_fail_no_client(cluster) -> None:
    """3 primaries answering 5 % random 500s + 1 healthy secondary, 20 clients for 8 s.

    Before outlier detection the first 500 ejected a primary: all three were out and the
    secondary served 99.5 % of the traffic. Now the primaries keep it; a 500 is retried on
    another replica. With 3 primaries at 5 % a request fails on all three with p = 1.25e-4, so
    a fourth attempt (on the secondary) keeps clients at 0 failures over ~10,000 requests.
    """
    prims = [cluster.sim("m", "--error-rate", "0.05", "--seed", str(i))[0] for i in range(3)]
    secondary, _ = cluster.sim("m")
    gw, _ = cluster.gateway(
        config([*((u, "primary") for u in prims), (secondary, "secondary")], routing="max_attempts: 4")
    )
    all_healthy(gw, 4)
    log = await load(gw, 8.0)
    table = replica_table(gw)
    names = {table[u]["name"] for u in prims}
    failed = [e for e in log if e[1] != 200]
    assert not failed, f"{len(failed)} of {len(log)} requests failed, first: {failed[:3]}"
    on_primaries = sum(1 for _, _, r in log if r in names)
    assert len(log) > 1000
    assert on_primaries / len(log) >= 0.90, f"primaries served {on_primaries} of {len(log)}"
    assert sum(table[u]["failures"] for u in prims) > 0  # the errors did happen (and were retried)
    assert all(table[u]["state"] == "healthy" for u in prims)


async def test_a_poison_request_leaves_the_tier_healthy(cluster) -> None:
    """A request every replica answers 500 gets the client an OpenAI 502; nobody is ejected."""
    prims = [cluster.sim("m")[0] for _ in range(3)]
    gw, _ = cluster.gateway(config([(u, "primary") for u in prims]))
    all_healthy(gw, 3)
    poison = {"model": "m", "messages": [{"role": "user", "content": "break it [sim:500]"}]}
    async with aiohttp.ClientSession() as s:
        for _ in range(2):  # the same poison twice: 2 consecutive 500s at most on any replica
            status, body, _ = await post(s, gw, poison)
            assert status == 502 and body["error"]["type"] == "upstream_error"
            assert "answered 500" in body["error"]["message"]
        ok = [(await post(s, gw, CHAT))[0] for _ in range(10)]
    table = replica_table(gw)
    assert sum(table[u]["failures"] for u in prims) == 6  # 2 requests x 3 attempts
    assert [table[u]["state"] for u in prims] == ["healthy"] * 3
    assert ok == [200] * 10


async def test_sigkill_of_a_primary_under_load_fails_nothing_and_ejects_within_a_second(cluster) -> None:
    opts = ("--ttft", "0.01", "--tokens", "4")
    (p0, proc0), (p1, _) = cluster.sim("m", *opts), cluster.sim("m", *opts)
    secondary, _ = cluster.sim("m", *opts)
    # Health checks every 10 s (the default): only the passive signal can eject this fast.
    gw, _ = cluster.gateway(
        "pools:\n  - model: m\n    health_check: {interval: 10, timeout: 2}\n    replicas:\n"
        f"      - {{url: '{p0}'}}\n      - {{url: '{p1}'}}\n      - {{url: '{secondary}', tier: secondary}}\n"
    )
    all_healthy(gw, 3)
    ejected_after: list[float] = []

    async def kill_and_watch() -> None:
        await asyncio.sleep(1.5)
        proc0.kill(signal.SIGKILL)
        t_kill = time.monotonic()
        while time.monotonic() - t_kill < 5:
            row = (await asyncio.to_thread(replica_table, gw))[p0]
            if row["state"] == "unhealthy":
                ejected_after.append(time.monotonic() - t_kill)
                # Refused (new requests) or reset (those in flight at the kill): out at once.
                gone = (
                    "connect failed",
                    "closed by replica",
                    "reset by replica",
                    "cut off",
                    "ended the stream",
                )
                assert row["ejected"] and any(g in row["reason"] for g in gone), row["reason"]
                return
            await asyncio.sleep(0.02)

    log, _ = await asyncio.gather(load(gw, 4.0), kill_and_watch())
    failed = [e for e in log if e[1] != 200]
    assert not failed, f"{len(failed)} of {len(log)} requests failed, first: {failed[:3]}"
    assert ejected_after and ejected_after[0] < 1.0, ejected_after


async def test_a_replica_answering_500_to_everything_is_ejected_after_five_and_returns_only_through_checks(
    cluster,
) -> None:
    bad, _ = cluster.sim("m", "--error-rate", "1")
    good, _ = cluster.sim("m")
    gw, _ = cluster.gateway(
        config([(bad, "primary"), (good, "secondary")], outlier="base_ejection_time: 1, max_ejection_time: 1")
    )
    all_healthy(gw, 2)
    async with aiohttp.ClientSession() as s:
        for i in range(4):
            assert (await post(s, gw, CHAT))[0] == 200  # 500 from the primary, retried
            row = replica_table(gw)[bad]
            assert row["state"] == "healthy" and row["failures"] == i + 1
        assert (await post(s, gw, CHAT))[0] == 200
        row = replica_table(gw)[bad]
        assert row["state"] == "unhealthy" and row["failures"] == 5 and row["ejections"] == 1
        assert row["reason"].startswith("ejected: 5 consecutive 5xx")
        # While ejected, the secondary answers without a failed attempt first.
        for _ in range(5):
            status, _, replica = await post(s, gw, CHAT)
            assert status == 200 and replica == replica_table(gw)[good]["name"]
        assert replica_table(gw)[bad]["failures"] == 5
        # Its /health fails now: the ejection time passes, but only checks can bring it back.
        async with s.post(bad + "/sim/control", json={"health": "down"}) as r:
            assert r.status == 200
        await asyncio.sleep(2.0)
        assert replica_table(gw)[bad]["state"] == "unhealthy"
        async with s.post(bad + "/sim/control", json={"health": "up"}) as r:
            assert r.status == 200
        await asyncio.to_thread(
            wait_for, lambda: replica_table(gw)[bad]["state"] == "healthy", 10, 0.05, "checks to restore it"
        )
        # Back in rotation, it fails again: five more 500s and it is out for the second time.
        for _ in range(5):
            assert (await post(s, gw, CHAT))[0] == 200
        row = replica_table(gw)[bad]
        assert row["state"] == "unhealthy" and row["failures"] == 10 and row["ejections"] == 2
