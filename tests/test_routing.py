"""Replica states (ALB semantics), stable names, tiers, balancers (power of two choices, panic
threshold, the request view), draining. Outlier detection has its own tests (test_outlier.py)."""

import asyncio
import random

import pytest

from fortress.config import HealthCheck, Tier, parse_config
from fortress.core.context import RequestContext
from fortress.routing.balancers import TieredBalancer
from fortress.routing.pool import NamingError, Router
from fortress.routing.replica import Origin, OriginKind, Replica, State

HC = HealthCheck()  # interval 10, timeout 5, thresholds 2/2


def make(state=State.INITIAL):
    r = Replica(name="x-1", url="http://x", tier=Tier.PRIMARY, check=HC)
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


def test_an_ejected_replica_returns_only_after_its_ejection_time_and_passing_checks():
    r = make(State.HEALTHY)
    r.next_check_at = 110  # the regular schedule
    assert r.eject("5 consecutive 5xx", now=100, duration=30)
    assert r.state is State.UNHEALTHY and r.ejected and "ejected" in r.reason
    assert r.next_check_at == 110  # the regular check still runs during the ejection
    r.record_check(True, "", 110, 0)
    r.record_check(True, "", 120, 0)
    assert r.state is State.UNHEALTHY  # two passes, but the ejection lasts until 130
    assert r.next_check_at == 130  # so the next check comes right when it ends
    r.record_check(True, "", 130, 0)
    assert r.state is State.HEALTHY and not r.ejected
    assert not make(State.UNHEALTHY).eject("again", now=0, duration=1)  # already out


def test_an_ejected_replica_that_fails_checks_needs_healthy_threshold_passes():
    r = make(State.HEALTHY)
    r.eject("refused", now=0, duration=1)
    r.record_check(False, "refused", 5, 0)
    r.record_check(True, "", 10, 0)
    assert r.state is State.UNHEALTHY
    r.record_check(True, "", 20, 0)
    assert r.state is State.HEALTHY


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
    assert r.pick(route, None, (p1,)) is None


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


def test_replicas_are_named_from_the_config_not_a_counter():
    cfg = parse_config(
        """
pools:
  - model: m
    replicas:
      - {url: "http://a"}
      - {url: "http://b", name: edge, tier: secondary}
      - {engine: sim, count: 2}
      - {engine: sim, name: spare, count: 1}
  - name: other
    replicas: [{url: "http://c"}]
""",
        env={},
    )
    for _ in range(2):  # a second router (another process) gives the same names
        r = Router(cfg)
        assert [x.name for x in r.all_replicas()] == ["m-1", "edge", "other-1"]
        assert [p.name for p in r.planned] == ["m-3", "m-4", "spare"]
        assert {x.name: x.origin.kind for x in r.all_replicas()} == {
            "m-1": OriginKind.STATIC,
            "edge": OriginKind.STATIC,
            "other-1": OriginKind.STATIC,
        }
    added = r.add_replica(r.pools[0], "http://d/", Tier.PRIMARY)
    assert (added.name, added.url, added.origin.kind) == ("m-2", "http://d", OriginKind.ADMIN)
    with pytest.raises(NamingError):
        r.add_replica(r.pools[0], "http://e", Tier.PRIMARY, name="edge")
    with pytest.raises(NamingError):
        r.add_replica(r.pools[0], "http://e", Tier.PRIMARY, name="m-3")  # a planned slot's name


def test_duplicate_generated_and_explicit_names_are_refused():
    cfg = parse_config(
        "pools:\n  - model: m\n    replicas: [{url: 'http://a'}, {url: 'http://b', name: m-1}]\n", env={}
    )
    with pytest.raises(NamingError, match="m-1"):
        Router(cfg)


def test_a_slot_re_registered_under_its_name_keeps_its_counters():
    r = router()
    pool = r.pools[0]
    first = r.add_replica(pool, "http://l1", Tier.PRIMARY, name="m-local", origin=Origin(OriginKind.LOCAL))
    first.served, first.failures, first.ejections_total = 7, 2, 1
    r.remove_replica(first)
    second = r.add_replica(
        pool, "http://l2", Tier.PRIMARY, name="m-local", origin=Origin(OriginKind.LOCAL), incarnation=2
    )
    assert (second.name, second.incarnation, second.served, second.failures) == ("m-local", 2, 7, 2)
    assert second.state is State.INITIAL  # a new process proves itself again
    with pytest.raises(NamingError):  # while it is registered, nobody else takes the name
        r.add_replica(pool, "http://l3", Tier.PRIMARY, name="m-local", origin=Origin(OriginKind.LOCAL))


class View:
    """A request view that counts what a balancer asked for."""

    def __init__(self, session: str | None = None, prompt: str = "") -> None:
        self.model = "m"
        self._session = session
        self._prompt = prompt
        self.asked: list[str] = []

    @property
    def session_key(self) -> str | None:
        self.asked.append("session")
        return self._session

    def prompt_prefix(self, limit: int = 4096) -> str:
        self.asked.append("prefix")
        return self._prompt[:limit]


def test_the_default_balancer_never_computes_the_prompt_prefix():
    r = router()
    view = View(session="s1", prompt="system: be brief")
    for _ in range(20):
        assert r.pick(r.route("m"), view) is not None
    assert view.asked == []  # least outstanding needs neither: nothing computed on the hot path


def test_a_balancer_strategy_sees_the_request_view():
    class Sticky(TieredBalancer):
        def choose(self, candidates, view):
            return sorted(candidates, key=lambda x: x.name)[len(view.session_key) % len(candidates)]

    r = router()
    pool = r.pools[0]
    pool.balancer = Sticky(pool.config, r.config.routing, random.Random(1))
    picks = {r.pick(r.route("m"), View(session="ab")).name for _ in range(10)}
    assert picks == {"m-1"}  # len("ab") % 2 == 0 -> the first primary, every time
    picks = {r.pick(r.route("m"), View(session="abc")).name for _ in range(10)}
    assert picks == {"m-2"}


def test_the_request_context_is_a_lazy_request_view():
    ctx = RequestContext("req-1", "/v1/chat/completions", 0.0, None)
    ctx.headers = {b"x-session-id": b"conv-42"}
    ctx.body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url"}]},
        ],
    }
    assert ctx.session_key == "conv-42"
    assert ctx._prefix is None  # nothing computed until a balancer asks
    assert ctx.prompt_prefix() == "system: Be brief.\nuser: Hi"
    assert ctx.prompt_prefix(6) == "system"
    ctx.body = {"model": "m", "prompt": "Once upon"}
    ctx._prefix = None
    assert ctx.prompt_prefix() == "Once upon"


def test_panic_threshold_spills_to_the_next_tier_or_fails_open():
    extra = "    outlier: {panic_threshold: 60}\n"
    r = router(extra)
    route = r.route("m")
    p1, p2, s1 = by_url(r, "http://p1"), by_url(r, "http://p2"), by_url(r, "http://s1")
    assert r.pick(route).tier is Tier.PRIMARY  # 2/2 healthy: no panic
    p1.state = State.UNHEALTHY  # 1/2 = 50 % < 60 %: the primary tier panics
    assert {r.pick(route).url for _ in range(20)} == {"http://s1"}  # spills to the secondary
    s1.state = State.UNHEALTHY  # secondary empty; the standby (1/1 healthy) takes it
    assert {r.pick(route).url for _ in range(20)} == {"http://c1"}
    by_url(r, "http://c1").state = State.UNHEALTHY
    # Nowhere to spill: fail open within the primary tier (its unhealthy replica included).
    assert {r.pick(route).url for _ in range(50)} == {"http://p1", "http://p2"}
    # Without a threshold the tier keeps its last healthy replica (today's behaviour).
    plain = router()
    by_url(plain, "http://p1").state = State.UNHEALTHY
    assert {plain.pick(plain.route("m")).url for _ in range(20)} == {"http://p2"}
    assert p2.state is State.HEALTHY
