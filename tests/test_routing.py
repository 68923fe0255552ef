"""Replica states (ALB semantics), passive ejection, tiers, power-of-two choices, draining."""

import asyncio
import random

from fortress.config import HealthCheck, Tier, parse_config
from fortress.routing.pool import Router
from fortress.routing.replica import Replica, State

HC = HealthCheck()  # interval 10, timeout 5, thresholds 2/2


def make(state=State.INITIAL):
    r = Replica(url="http://x", tier=Tier.PRIMARY, check=HC)
    r.state = state
    return r


def test_initial_needs_one_passing_check():
    r = make()
    assert r.record_check(True, "200", 0, 0)
    assert r.state is State.HEALTHY


def test_initial_becomes_unhealthy_after_threshold_failures():
    r = make()
    assert not r.record_check(False, "refused", 0, 0)
    assert r.state is State.INITIAL
    assert r.record_check(False, "refused", 10, 0)
    assert r.state is State.UNHEALTHY


def test_flapping_replica_never_leaves_state_on_alternating_results():
    healthy = make(State.HEALTHY)
    unhealthy = make(State.UNHEALTHY)
    for i in range(10):
        ok = i % 2 == 0
        healthy.record_check(not ok, "", i, i)
        unhealthy.record_check(ok, "", i, i)
    # Thresholds are consecutive results: alternating never reaches 2 in a row.
    assert healthy.state is State.HEALTHY
    assert unhealthy.state is State.UNHEALTHY


def test_healthy_threshold_then_unhealthy_threshold():
    r = make(State.UNHEALTHY)
    r.record_check(True, "", 0, 0)
    assert r.state is State.UNHEALTHY
    r.record_check(True, "", 10, 0)
    assert r.state is State.HEALTHY
    r.record_check(False, "timeout", 20, 0)
    assert r.state is State.HEALTHY
    r.record_check(False, "timeout", 30, 0)
    assert r.state is State.UNHEALTHY
    assert "timeout" in r.reason


def test_passive_ejection_is_immediate_with_doubling_backoff():
    hc = HealthCheck(eject_backoff=1, eject_backoff_max=4)
    r = Replica(url="http://x", tier=Tier.PRIMARY, check=hc, state=State.HEALTHY)
    assert r.eject("connection refused", now=100)
    assert r.state is State.UNHEALTHY
    assert r.next_check_at == 101
    backoffs = []
    for _ in range(4):
        r.record_check(True, "", 0, 0)
        r.record_check(True, "", 0, 0)
        assert r.state is State.HEALTHY
        r.eject("5xx", now=100)
        backoffs.append(r.next_check_at - 100)
    assert backoffs == [2, 4, 4, 4]
    r.record_success()
    r.record_check(True, "", 0, 0)
    r.record_check(True, "", 0, 0)
    r.eject("reset", now=100)
    assert r.next_check_at == 101  # a success starts the backoff over
    assert not r.eject("again", now=100)  # already out of rotation


def test_draining_ignores_checks():
    r = make(State.HEALTHY)
    r.drain()
    r.record_check(True, "", 0, 0)
    r.record_check(False, "", 0, 0)
    r.record_check(False, "", 0, 0)
    assert r.state is State.DRAINING


CFG = """
pools:
  - model: m
    aliases: [alias]
    replicas:
      - {url: "http://p1", tier: primary}
      - {url: "http://p2", tier: primary}
      - {url: "http://s1", tier: secondary}
      - {url: "http://c1", tier: standby}
"""


def router(extra="", **kw):
    r = Router(parse_config(CFG + extra, env={}), rng=random.Random(1))
    for rep in r.all_replicas():
        r.set_models(rep, frozenset({"m"}))
        rep.state = State.HEALTHY
    return r


def by_url(r, url):
    return next(x for x in r.all_replicas() if x.url == url)


def test_highest_tier_with_a_healthy_replica_wins():
    r = router()
    route = r.route("m")
    assert r.pick(route).tier is Tier.PRIMARY
    for u in ("http://p1", "http://p2"):
        by_url(r, u).state = State.UNHEALTHY
    assert r.pick(route).url == "http://s1"
    by_url(r, "http://s1").state = State.DRAINING
    assert r.pick(route).url == "http://c1"
    by_url(r, "http://p2").state = State.HEALTHY
    assert r.pick(route).url == "http://p2"


def test_power_of_two_prefers_fewer_in_flight():
    r = router()
    route = r.route("m")
    by_url(r, "http://p1").in_flight = 5
    picks = {r.pick(route).url for _ in range(50)}
    assert picks == {"http://p2"}


def test_p2c_spreads_load_when_equal():
    r = router()
    route = r.route("m")
    counts = {"http://p1": 0, "http://p2": 0}
    for _ in range(200):
        counts[r.pick(route).url] += 1
    assert min(counts.values()) > 50


def test_retry_excludes_tried_replicas_but_never_fails_open_while_one_is_healthy():
    r = router()
    route = r.route("m")
    for u in ("http://p2", "http://s1", "http://c1"):
        by_url(r, u).state = State.UNHEALTHY
    p1 = by_url(r, "http://p1")
    assert r.pick(route) is p1
    assert r.pick(route, exclude=(p1,)) is None


def test_fail_open_and_reject_when_all_unhealthy():
    r = router()
    route = r.route("m")
    for rep in r.all_replicas():
        rep.state = State.UNHEALTHY
    assert r.pick(route).tier is Tier.PRIMARY  # fail_open: like an ALB, try them anyway
    rej = router("routing: {when_all_unhealthy: reject}\n")
    for rep in rej.all_replicas():
        rep.state = State.UNHEALTHY
    assert rej.pick(rej.route("m")) is None


def test_model_identity_is_strict():
    r = router()
    p1 = by_url(r, "http://p1")
    r.set_models(p1, frozenset({"other"}))  # now reports a different model
    route = r.route("m")
    assert all(r.pick(route) is not p1 for _ in range(50))
    for rep in r.all_replicas():
        if rep is not p1:
            rep.state = State.UNHEALTHY
    # Even failing open, a replica that does not serve "m" never gets its requests.
    assert r.pick(route) is not p1
    assert r.route("other") is None  # an explicit pool does not publish stray models


def test_alias_routes_to_the_real_model():
    r = router()
    route = r.route("alias")
    assert route.is_alias and route.upstream_model == "m"
    assert r.pick(route) is not None
    assert r.route("unknown") is None


def test_discovery_pool_routes_by_reported_models():
    r = Router(parse_config("pools:\n  - replicas: [{url: 'http://a'}, {url: 'http://b'}]\n", env={}))
    a, b = list(r.all_replicas())
    r.set_models(a, frozenset({"x"}))
    r.set_models(b, frozenset({"y"}))
    a.state = b.state = State.HEALTHY
    assert r.pick(r.route("x")) is a
    assert r.pick(r.route("y")) is b
    assert sorted(r.index) == ["x", "y"]


async def test_draining_waits_for_in_flight_then_removes():
    r = router("    deregistration_delay: 5\n")
    p1 = by_url(r, "http://p1")
    p1.in_flight = 1
    task = asyncio.create_task(r.drain(p1))
    await asyncio.sleep(0.1)
    assert p1.state is State.DRAINING
    assert p1 in r.pools[0].replicas
    assert all(r.pick(r.route("m")) is not p1 for _ in range(20))
    p1.in_flight = 0
    await asyncio.wait_for(task, 2)
    assert p1 not in r.pools[0].replicas


async def test_draining_gives_up_after_deregistration_delay():
    r = router()
    p1 = by_url(r, "http://p1")
    p1.in_flight = 3
    await asyncio.wait_for(r.drain(p1, delay=0.2), 2)
    assert p1 not in list(r.all_replicas())
