"""The autoscaler and schedules on a fake clock: pure functions of signals and time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from fortress.config import FleetConfig, parse_config
from fortress.fleet.autoscaler import Autoscaler, Signals
from fortress.fleet.schedule import bounds_at, last_fired, next_change

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


class Clock:
    """Monotonic seconds and the matching wall clock, moved by hand."""

    def __init__(self, wall: datetime = T0) -> None:
        self.t = 1000.0
        self.start = wall

    def advance(self, seconds: float) -> None:
        self.t += seconds

    @property
    def wall(self) -> datetime:
        return self.start + timedelta(seconds=self.t - 1000.0)


def fleet(**kw: Any) -> FleetConfig:
    # No metric averaging and no tolerance unless a test is about them: the windows' rules
    # read plainly.
    return FleetConfig.model_validate(
        {"min_replicas": 1, "max_replicas": 10, "metric_window": 0, "tolerance": 0, **kw}
    )


def sig(clock: Clock, current: int, in_flight: float = 0, **kw: Any) -> Signals:
    metrics = {"in_flight": float(in_flight), **kw.pop("metrics", {})}
    return Signals(
        now=clock.t, wall=clock.wall, current=current, ready=kw.pop("ready", current), metrics=metrics, **kw
    )


def run(scaler: Autoscaler, clock: Clock, current: int, seconds: float, step: float = 1.0, **kw: Any) -> int:
    """Feed the same load for ``seconds``, applying each decision; the count at the end."""
    end = clock.t + seconds
    while clock.t < end:
        clock.advance(step)
        current = scaler.decide(sig(clock, current, **kw)).desired
    return current


# -- target tracking ---------------------------------------------------------------------------


def test_target_tracking_scales_out_only_after_the_out_delay() -> None:
    clock = Clock()
    a = Autoscaler(fleet(target={"in_flight": 4}, scale_out_delay=30, scale_in_delay=300), clock.t, 1)
    # 17 in flight at 4 per replica: 5 wanted, but not before the load held for 30 s.
    assert run(a, clock, 1, 29, in_flight=17) == 1
    d = a.decide(sig(clock, 1, 17))
    assert d.desired == 1 and "waiting out scale_out_delay" in d.reason
    clock.advance(2)
    d = a.decide(sig(clock, 1, 17))
    assert (d.desired, d.kind, d.recommended) == (5, "target", 5), d
    assert "in_flight 17 at 4 per replica" in d.reason


def test_a_short_burst_inside_the_out_window_does_not_scale_out() -> None:
    clock = Clock()
    a = Autoscaler(fleet(target={"in_flight": 4}, scale_out_delay=30), clock.t, 2)
    current = run(a, clock, 2, 60, in_flight=6)  # 2 wanted: steady
    assert current == 2
    current = run(a, clock, current, 10, in_flight=40)  # 10 s of burst
    assert current == 2
    current = run(a, clock, current, 40, in_flight=6)
    assert current == 2


def test_scale_out_waits_for_the_window_then_sizes_on_the_latest_reading() -> None:
    clock = Clock()
    a = Autoscaler(fleet(target={"in_flight": 1}, scale_out_delay=10), clock.t, 1)
    current = run(a, clock, 1, 5, in_flight=3)  # 3 wanted for 5 s: not yet
    assert current == 1
    # The load keeps rising: once the whole window asked for more, the latest reading (8) sizes
    # the step, not the window's smallest (3): a burst is met in one step, not two.
    current = run(a, clock, 1, 5, in_flight=8)
    assert current == 1
    current = run(a, clock, current, 1, in_flight=8)
    assert current == 8


def test_one_low_reading_in_the_out_window_restarts_it() -> None:
    clock = Clock()
    a = Autoscaler(fleet(target={"in_flight": 1}, scale_out_delay=10), clock.t, 1)
    run(a, clock, 1, 8, in_flight=6)
    assert run(a, clock, 1, 1, in_flight=1) == 1  # one reading at the count the pool has
    assert run(a, clock, 1, 9, in_flight=6) == 1  # a new window from here
    assert run(a, clock, 1, 2, in_flight=6) == 6


def test_tolerance_ignores_readings_near_the_target_and_not_beyond_it() -> None:
    clock = Clock()
    cfg = fleet(target={"in_flight": 2}, scale_out_delay=0, scale_in_delay=0, tolerance=0.1)
    a = Autoscaler(cfg, clock.t, 5)
    # 5 replicas at 2 per replica: 10 is the target; 10.9 and 9.1 are within 10 %.
    assert run(a, clock, 5, 3, in_flight=10.9) == 5
    d = a.decide(sig(clock, 5, 10.9))
    assert d.recommended == 5 and d.kind == "hold", d
    assert run(a, clock, 5, 3, in_flight=9.1) == 5
    # Beyond it, the count that meets the target: ceil(11.2 / 2) = 6, ceil(8.8 / 2) = 5 on 6 replicas.
    assert run(a, clock, 5, 1, in_flight=11.2) == 6
    assert run(a, clock, 6, 1, in_flight=8.8) == 5
    # Utilisations: the average against the target, 70 % +- 10 % of it.
    u = Autoscaler(fleet(target={"cpu": 70}, scale_out_delay=0, tolerance=0.1), clock.t, 4)
    assert u.decide(sig(clock, 4, metrics={"cpu": 76.0})).recommended == 4
    assert u.decide(sig(clock, 4, metrics={"cpu": 80.0})).recommended == 5  # ceil(4 * 80 / 70)


def test_tolerance_defaults_to_hpa_s_ten_percent() -> None:
    assert FleetConfig.model_validate({"max_replicas": 2}).tolerance == 0.1
    with pytest.raises(ValueError, match="tolerance"):
        FleetConfig.model_validate({"max_replicas": 2, "tolerance": 1})


def test_scale_in_waits_the_in_delay_and_keeps_the_window_maximum() -> None:
    clock = Clock()
    a = Autoscaler(fleet(target={"in_flight": 2}, scale_out_delay=0, scale_in_delay=60), clock.t, 1)
    current = run(a, clock, 1, 3, in_flight=12)
    assert current == 6  # no out delay: at once
    current = run(a, clock, current, 30, in_flight=4)  # 2 wanted
    assert current == 6
    current = run(a, clock, current, 31, in_flight=4)
    assert current == 2
    d = a.decide(sig(clock, 2, 4))
    assert d.kind == "hold"


def test_max_step_limits_each_decision() -> None:
    clock = Clock()
    a = Autoscaler(
        fleet(target={"in_flight": 1}, scale_out_delay=0, scale_in_delay=0, max_step=2), clock.t, 1
    )
    counts = []
    current = 1
    for _ in range(4):
        clock.advance(1)
        current = a.decide(sig(clock, current, 9)).desired
        counts.append(current)
    assert counts == [3, 5, 7, 9]
    clock.advance(1)
    assert a.decide(sig(clock, 9, 0)).desired == 7


def test_bounds_cap_and_floor_the_targets() -> None:
    clock = Clock()
    a = Autoscaler(
        fleet(min_replicas=2, max_replicas=4, target={"in_flight": 1}, scale_out_delay=0), clock.t, 2
    )
    clock.advance(1)
    d = a.decide(sig(clock, 2, 50))
    assert (d.desired, d.kind) == (4, "target") and "capped at max 4" in d.reason
    assert run(a, clock, 4, 301, in_flight=0) == 2  # the floor, after scale_in_delay
    d = a.decide(sig(clock, 2, 0))
    assert (d.desired, d.kind) == (2, "hold")
    # Bounds that make a change of their own: the count is raised to the minimum.
    b = Autoscaler(fleet(min_replicas=3, max_replicas=4), clock.t, 1)
    d = b.decide(sig(clock, 1, 0))
    assert (d.desired, d.kind) == (3, "bounds") and "at least min 3" in d.reason


def test_the_largest_count_of_several_targets_wins_and_missing_signals_have_no_say() -> None:
    clock = Clock()
    a = Autoscaler(
        fleet(target={"in_flight": 10, "kv_cache": 0.5, "queue": 2}, scale_out_delay=0), clock.t, 2
    )
    clock.advance(1)
    # in_flight: 1; kv_cache: ceil(2 * 0.9 / 0.5) = 4; queue: no signal.
    d = a.decide(sig(clock, 2, 5, metrics={"kv_cache": 0.9}))
    assert (d.desired, d.recommended) == (4, 4) and "kv_cache" in d.reason
    clock.advance(1)
    d = a.decide(sig(clock, 4, 5, metrics={"kv_cache": 0.2, "queue": 11}))
    assert d.recommended == 6 and "queue" in d.reason


def test_tokens_per_second_and_cpu_targets() -> None:
    clock = Clock()
    a = Autoscaler(fleet(target={"tokens_per_second": 100, "cpu": 70}, scale_out_delay=0), clock.t, 1)
    clock.advance(1)
    assert a.decide(sig(clock, 1, 0, metrics={"tokens_per_second": 250.0})).recommended == 3
    clock.advance(1)
    assert a.decide(sig(clock, 3, 0, ready=3, metrics={"cpu": 95.0})).recommended == 5  # ceil(3*95/70)


def test_without_targets_the_count_holds() -> None:
    clock = Clock()
    a = Autoscaler(fleet(min_replicas=1, max_replicas=3), clock.t, 2)
    clock.advance(5)
    d = a.decide(sig(clock, 2, 30))
    assert (d.desired, d.kind) == (2, "hold")


# -- zero: wake and idle -------------------------------------------------------------------------


def test_a_pool_at_zero_stays_asleep_without_requests_and_wakes_at_once_for_one() -> None:
    clock = Clock()
    a = Autoscaler(
        fleet(min_replicas=0, max_replicas=3, target={"in_flight": 4}, idle_to_zero=20, scale_out_delay=60),
        clock.t,
        0,
    )
    assert run(a, clock, 0, 100) == 0
    clock.advance(1)
    d = a.decide(sig(clock, 0, 0, waiting=1))
    assert (d.desired, d.kind) == (1, "wake")
    # 40 clients waiting at a pool at zero: the wake goes straight to the count they need.
    a2 = Autoscaler(
        fleet(min_replicas=0, max_replicas=3, target={"in_flight": 4}, idle_to_zero=20), clock.t, 0
    )
    clock.advance(1)
    d = a2.decide(sig(clock, 0, 0, waiting=40))
    assert (d.desired, d.kind) == (3, "wake")


def test_idle_to_zero_after_the_idle_time_whatever_the_in_delay() -> None:
    clock = Clock()
    cfg = fleet(min_replicas=0, max_replicas=3, target={"in_flight": 4}, idle_to_zero=20, scale_in_delay=600)
    a = Autoscaler(cfg, clock.t, 1)
    current = run(a, clock, 1, 10, in_flight=2, last_request=clock.t + 10)
    assert current == 1
    last = clock.t
    current = run(a, clock, current, 19, last_request=last)
    assert current == 1  # idle 19 s
    clock.advance(2)
    d = a.decide(sig(clock, 1, 0, last_request=last))
    assert (d.desired, d.kind) == (0, "idle") and "no request for 20s" in d.reason


def test_min_zero_without_idle_to_zero_keeps_one_once_awake() -> None:
    clock = Clock()
    a = Autoscaler(
        fleet(min_replicas=0, max_replicas=3, target={"in_flight": 1}, scale_in_delay=0), clock.t, 2
    )
    current = run(a, clock, 2, 100, last_request=clock.t)
    assert current == 1


def test_in_flight_keeps_a_pool_awake_even_past_idle_to_zero() -> None:
    clock = Clock()
    a = Autoscaler(fleet(min_replicas=0, max_replicas=3, idle_to_zero=5), clock.t, 1)
    # A request in flight for a long time (a long stream): not idle.
    assert run(a, clock, 1, 30, in_flight=1, last_request=None) == 1


def test_idle_to_zero_needs_min_zero() -> None:
    with pytest.raises(ValidationError, match="idle_to_zero needs min_replicas: 0"):
        fleet(min_replicas=1, idle_to_zero=10)


# -- operator ----------------------------------------------------------------------------------------


def test_a_pin_holds_until_released() -> None:
    clock = Clock()
    a = Autoscaler(fleet(target={"in_flight": 1}, scale_out_delay=0, scale_in_delay=0), clock.t, 1)
    a.pin(4)
    clock.advance(1)
    d = a.decide(sig(clock, 1, 0))
    assert (d.desired, d.kind) == (4, "manual")
    a.pin(None)
    clock.advance(1)
    assert a.decide(sig(clock, 4, 2)).desired == 2
    with pytest.raises(ValueError, match=r"0\.\.10"):
        a.pin(11)


# -- schedules ---------------------------------------------------------------------------------------


def seed_schedules(tz: str = "UTC") -> FleetConfig:
    # The seed deployment: down at 06:00 UTC, up at 15:00 UTC.
    return fleet(
        min_replicas=1,
        max_replicas=2,
        schedules=[
            {"name": "night-off", "cron": "0 6 * * *", "timezone": tz, "min_replicas": 0, "max_replicas": 0},
            {"name": "day-on", "cron": "0 15 * * *", "timezone": tz, "min_replicas": 1, "max_replicas": 2},
        ],
    )


def test_the_latest_fired_schedule_sets_the_bounds() -> None:
    cfg = seed_schedules()
    at = lambda h, m=0: datetime(2026, 6, 1, h, m, tzinfo=UTC)  # noqa: E731
    assert (bounds_at(cfg, at(5, 59)).max, bounds_at(cfg, at(5, 59)).schedule) == (2, "day-on")
    b = bounds_at(cfg, at(6, 0))
    assert (b.min, b.max, b.schedule) == (0, 0, "night-off")
    assert bounds_at(cfg, at(14, 59)).max == 0
    assert bounds_at(cfg, at(15, 0)).schedule == "day-on"
    nxt = next_change(cfg, at(7))
    assert nxt == (datetime(2026, 6, 1, 15, 0, tzinfo=UTC), "day-on")


def test_a_schedule_applies_at_once_whatever_the_delays() -> None:
    clock = Clock(datetime(2026, 6, 1, 5, 59, 30, tzinfo=UTC))
    a = Autoscaler(seed_schedules(), clock.t, 1)
    a.config = a.config.replace(scale_in_delay=3600)
    clock.advance(31)
    d = a.decide(sig(clock, 1, 3))
    assert (d.desired, d.kind) == (0, "schedule") and "night-off" in d.reason
    clock.advance(9 * 3600)
    d = a.decide(sig(clock, 0, 0))
    assert (d.desired, d.kind) == (1, "schedule")


def test_schedules_follow_their_time_zone_across_daylight_saving() -> None:
    cfg = seed_schedules("Europe/Paris")
    s = cfg.schedules[0]
    # 06:00 in Paris: 04:00 UTC in summer (CEST), 05:00 UTC in winter (CET).
    summer = last_fired(s, datetime(2026, 3, 30, 12, 0, tzinfo=UTC))
    winter = last_fired(s, datetime(2026, 3, 28, 12, 0, tzinfo=UTC))
    assert summer == datetime(2026, 3, 30, 4, 0, tzinfo=UTC)
    assert winter == datetime(2026, 3, 28, 5, 0, tzinfo=UTC)
    # The day of the change (29 March 2026, 02:00 -> 03:00): 06:00 CEST is 04:00 UTC.
    assert bounds_at(cfg, datetime(2026, 3, 29, 3, 59, tzinfo=UTC)).schedule == "day-on"
    assert bounds_at(cfg, datetime(2026, 3, 29, 4, 0, tzinfo=UTC)).schedule == "night-off"
    # Back in October: 06:00 CET is 05:00 UTC.
    assert bounds_at(cfg, datetime(2026, 10, 26, 4, 59, tzinfo=UTC)).schedule == "day-on"
    assert bounds_at(cfg, datetime(2026, 10, 26, 5, 0, tzinfo=UTC)).schedule == "night-off"


def test_a_schedule_may_set_one_bound() -> None:
    cfg = fleet(min_replicas=1, max_replicas=6, schedules=[{"cron": "0 9 * * 1-5", "min_replicas": 3}])
    monday = datetime(2026, 6, 1, 10, 0, tzinfo=UTC)
    b = bounds_at(cfg, monday)
    assert (b.min, b.max) == (3, 6)


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({"cron": "61 6 * * *", "max_replicas": 0}, "not a five-field cron"),
        ({"cron": "0 6 * *", "max_replicas": 0}, "not a five-field cron"),
        ({"cron": "0 6 * * *", "timezone": "Mars/Olympus", "max_replicas": 0}, "unknown time zone"),
        ({"cron": "0 6 * * *"}, "sets min_replicas, max_replicas or both"),
        ({"cron": "0 6 * * *", "min_replicas": 3, "max_replicas": 2}, "must not exceed"),
        ({"cron": "0 6 * * *", "max_replicas": 11}, "above max_replicas 10"),
    ],
)
def test_bad_schedules_are_refused(schedule: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        fleet(schedules=[schedule])


# -- the pool's config ---------------------------------------------------------------------------------


def test_a_fleet_pool_names_max_replicas_slots_and_has_one_local_template() -> None:
    from fortress.routing.pool import layout

    cfg = parse_config(
        "pools:\n- model: m\n  fleet: {min_replicas: 0, max_replicas: 3, target: {in_flight: 2}}\n"
        "  replicas: [{engine: sim}]\n",
        "t",
        env={},
    )
    ((name, pc, members),) = layout(cfg.pools)
    assert name == "m"
    assert [n for n, _ in members] == ["m-1", "m-2", "m-3"]
    assert pc.fleet is not None and pc.fleet.target[0].metric == "in_flight"
    for bad, message in [
        ("  replicas: [{url: 'http://127.0.0.1:1'}]\n", "exactly one replica, a local one"),
        ("  replicas: [{engine: sim, count: 2}]\n", "remove `count`"),
        ("  replicas: [{engine: sim}, {engine: sim}]\n", "exactly one replica"),
    ]:
        text = "pools:\n- model: m\n  fleet: {max_replicas: 3}\n" + bad
        with pytest.raises(Exception, match=message):
            parse_config(text, "t", env={})
    with pytest.raises(Exception, match="kv_cache is a fraction"):
        fleet(target={"kv_cache": 70})


def test_a_firing_alarm_action_asks_for_one_more_replica_through_the_out_window() -> None:
    clock = Clock()
    cfg = fleet(max_replicas=3, scale_out_delay=10, scale_out_on_alarms=["gpu_utilization"])
    a = Autoscaler(cfg, clock.t, 1)
    # Firing for less than the out window: nothing yet; then one more, and no further than max.
    assert run(a, clock, 1, 9, alarms=("gpu_utilization",)) == 1
    current = run(a, clock, 1, 2, alarms=("gpu_utilization",))
    assert current == 2
    d = a.decide(sig(clock, 2, 0, alarms=("gpu_utilization",)))
    assert "alarm gpu_utilization firing" in d.reason
    assert run(a, clock, 2, 60, alarms=("gpu_utilization",)) == 3
    # Quiet again: back down after the in window (the default 300 s).
    assert run(a, clock, 3, 301) == 3  # no targets: holds


def test_alarm_actions_must_name_an_alarm() -> None:
    pool = (
        "pools:\n- model: m\n  fleet: {max_replicas: 2, scale_out_on_alarms: [%s]}\n"
        "  replicas: [{engine: sim}]\n"
    )
    cfg = parse_config(pool % "latency_page", "t", env={})
    assert cfg.pools[0].fleet is not None and cfg.pools[0].fleet.scale_out_on_alarms == ["latency_page"]
    with pytest.raises(Exception, match="names no alarm: gpu_hot"):
        parse_config(pool % "gpu_hot", "t", env={})


def test_scale_in_reads_metrics_averaged_over_the_metric_window() -> None:
    clock = Clock()
    cfg = fleet(target={"in_flight": 2}, scale_out_delay=5, scale_in_delay=10, metric_window=60)
    a = Autoscaler(cfg, clock.t, 1)
    # Noisy load around a mean of 4 (2 replicas' worth): short readings of 1 and 7 alternate.
    current = run(a, clock, 1, 7, in_flight=8)
    assert current == 4  # a burst shows after the out window (scale-out reads the latest interval)
    for i in range(120):
        clock.advance(1)
        current = a.decide(sig(clock, current, 7 if i % 2 else 1)).desired
    # Without averaging, the in window's largest reading (7 -> 4 replicas) would hold 4; the
    # mean over 60 s (4 -> 2 replicas) brings it down once the burst left the window.
    assert current == 2, current
    b = Autoscaler(cfg.replace(metric_window=0), clock.t, 4)
    current = 4
    for i in range(120):
        clock.advance(1)
        current = b.decide(sig(clock, current, 7 if i % 2 else 1)).desired
    assert current == 4
