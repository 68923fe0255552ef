"""The controller with a recording provider: what it launches and stops, and whom it drains."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fortress.config import parse_config
from fortress.fleet.controller import PoolController
from fortress.fleet.providers.base import READY, STARTING, TERMINATED, Instance
from fortress.routing.pool import Router
from fortress.routing.replica import Origin, OriginKind, State


class Recorder:
    """A provider whose instances are set by the test; it records the calls."""

    kind = "test"
    registers = False

    async def start(self) -> None:
        return None

    def __init__(self, names: list[str]) -> None:
        self.states = dict.fromkeys(names, TERMINATED)
        self.launched: list[str] = []
        self.terminated: list[str] = []
        self.gpu: float | None = None

    def instances(self) -> list[Instance]:
        return [Instance(id=n, state=s, replica=n) for n, s in self.states.items()]

    def launch(self, count: int) -> list[str]:
        free = [n for n, s in self.states.items() if s == TERMINATED][:count]
        for n in free:
            self.states[n] = STARTING
        self.launched += free
        return free

    def terminate(self, ids: list[str]) -> None:
        for n in ids:
            self.states[n] = TERMINATED
        self.terminated += ids

    def cpu_percent(self) -> float | None:
        return None

    def gpu_percent(self) -> float | None:
        return self.gpu

    async def close(self) -> None:
        return None


def controller(fleet: str, now: list[float]) -> tuple[PoolController, Recorder, Router]:
    cfg = parse_config(
        f"pools:\n- model: m\n  name: m\n  fleet: {fleet}\n  replicas: [{{engine: sim}}]\n", "t", env={}
    )
    router = Router(cfg)
    pool = router.pools[0]
    provider = Recorder([s.name for s in router.planned])
    c = PoolController(
        pool, cfg.pools[0].fleet, provider, router, lambda: now[0], lambda: datetime(2026, 6, 1, tzinfo=UTC)
    )
    return c, provider, router


def join(router: Router, provider: Recorder, name: str, state: State, in_flight: int = 0) -> Any:
    """The replica of a running slot, as the runtime registers it."""
    provider.states[name] = READY
    r = router.add_replica(
        router.pools[0],
        f"http://127.0.0.1:{9000 + int(name[-1])}",
        router.pools[0].config.replicas[0].tier,
        name=name,
        origin=Origin(OriginKind.LOCAL),
    )
    r.state = state
    r.in_flight = in_flight
    return r


async def test_scale_out_launches_the_lowest_free_slots_and_in_drains_the_idle_unhealthy_first() -> None:
    now = [100.0]
    c, provider, router = controller("{min_replicas: 1, max_replicas: 4}", now)
    assert c.initial == 1
    c.scale(3)
    c.tick()
    assert provider.launched == ["m-1", "m-2", "m-3"]
    join(router, provider, "m-1", State.HEALTHY, in_flight=3)
    join(router, provider, "m-2", State.UNHEALTHY)
    join(router, provider, "m-3", State.HEALTHY, in_flight=1)
    c.scale(1)
    c.tick()
    # Not taking traffic first (m-2), then the least busy healthy one (m-3).
    assert provider.terminated == ["m-2", "m-3"]
    assert [d["kind"] for d in c.decisions] == ["manual", "manual"]
    assert [(d["from"], d["to"]) for d in c.decisions] == [(1, 3), (3, 1)]


async def test_the_last_healthy_replica_of_a_pool_that_keeps_one_is_never_removed() -> None:
    now = [100.0]
    c, provider, router = controller("{min_replicas: 1, max_replicas: 3}", now)
    c.scale(2)
    c.tick()
    join(router, provider, "m-1", State.HEALTHY, in_flight=0)
    provider.states["m-2"] = STARTING  # still loading, not a replica yet
    # Asked for one: the loading one goes, the healthy one stays, whatever its load.
    c.scale(1)
    c.tick()
    assert provider.terminated == ["m-2"]
    # Two healthy, min 1, asked for one: the busier stays.
    provider.terminated.clear()
    c.scale(2)
    c.tick()
    join(router, provider, "m-2", State.HEALTHY, in_flight=5)
    c.scale(1)
    c.tick()
    assert provider.terminated == ["m-1"]
    # With a healthy one starting elsewhere but only one healthy left, min 1 keeps it even if a
    # count of 0 were asked through the victims' path.
    victims = c._victims([i for i in provider.instances() if i.state == READY], 1)
    assert victims == []


async def test_a_pool_with_min_zero_may_lose_its_last_replica_when_idle() -> None:
    now = [100.0]
    c, provider, router = controller("{min_replicas: 0, max_replicas: 2, idle_to_zero: 10}", now)
    assert c.initial == 0 and c.desired == 0
    c.waiting = 1  # a request waits: a wake
    c.tick()
    assert provider.launched == ["m-1"] and c.decisions[-1]["kind"] == "wake"
    c.waiting = 0
    join(router, provider, "m-1", State.HEALTHY)
    now[0] += 5
    c.tick()
    assert provider.terminated == []
    now[0] += 11
    c.tick()
    assert provider.terminated == ["m-1"] and c.decisions[-1]["kind"] == "idle"
    assert c.stats()["decisions"] == {"wake": 1, "idle": 1}


def test_a_reload_that_changes_a_fleet_names_it_for_a_restart() -> None:
    text = (
        "pools:\n- model: m\n  name: m\n  fleet: {{max_replicas: 3, target: {{in_flight: {n}}}}}\n"
        "  replicas: [{{engine: sim}}]\n"
    )
    router = Router(parse_config(text.format(n=4), "t", env={}))
    same = router.reconcile(parse_config(text.format(n=4), "t", env={}))
    assert same.local_changed == []
    changed = router.reconcile(parse_config(text.format(n=8), "t", env={}))
    assert changed.local_changed == ["m"]


async def test_gpu_and_alarm_signals_reach_the_autoscaler() -> None:
    now = [100.0]
    cfg = parse_config(
        "pools:\n- model: m\n  name: m\n  fleet: {max_replicas: 4, target: {gpu: 60}, scale_out_delay: 0,"
        " scale_out_on_alarms: [gpu_scale_up]}\n  replicas: [{engine: sim}]\n",
        "t",
        env={},
    )
    router = Router(cfg)
    provider = Recorder([s.name for s in router.planned])
    provider.gpu = 90.0
    firing = [("gpu_scale_up", "info", "ok")]
    c = PoolController(
        router.pools[0],
        cfg.pools[0].fleet,
        provider,
        router,
        lambda: now[0],
        lambda: datetime(2026, 6, 1, tzinfo=UTC),
        alarms=lambda: firing,
        alarm_actions=frozenset(cfg.pools[0].fleet.scale_out_on_alarms or ()),
    )
    c.tick()
    join(router, provider, "m-1", State.HEALTHY)
    now[0] += 1
    d = c.tick()
    assert c.signals is not None and c.signals.metrics["gpu"] == 90.0
    assert (d.recommended, c.desired) == (2, 2), d  # ceil(1 x 90 / 60)
    firing[:] = [("gpu_scale_up", "info", "firing")]
    join(router, provider, "m-2", State.HEALTHY)
    now[0] += 1
    d = c.tick()
    assert c.signals.alarms == ("gpu_scale_up",) and d.desired == 3, d
