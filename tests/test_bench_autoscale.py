"""bench/autoscale.py: the simulation's bookkeeping, on a two-hour trace with a quiet stretch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import autoscale

from fortress.config import FleetConfig

QUIET = (1800.0, 4800.0)  # no request at all in between


def rate(t: float) -> float:
    return 0.0 if QUIET[0] <= t < QUIET[1] else 1.0


TRACE = autoscale.build_trace(7, rate, 7200.0, "1 req/s, nothing from 0:30 to 1:20")
CONFIG = FleetConfig.model_validate(autoscale.FORTRESS)
COLD = 30.0


def test_fortress_sleeps_through_the_quiet_stretch_and_wakes_for_its_first_request() -> None:
    sim = autoscale.Sim(TRACE, autoscale.Fortress(CONFIG), CONFIG.max_replicas, COLD).run()
    assert any(c > 0 for t, c, _ in sim.timeline if t < QUIET[0])
    at = next(k for k, (t, c, _) in enumerate(sim.timeline) if c == 0 and t > QUIET[0])
    asleep = sim.timeline[at][0]
    last = max(a + s for a, s in zip(TRACE.arrival, TRACE.service, strict=True) if a < QUIET[0])
    assert CONFIG.idle_to_zero is not None
    assert last + CONFIG.idle_to_zero <= asleep <= last + CONFIG.idle_to_zero + 2 * CONFIG.interval
    first = next(i for i, a in enumerate(TRACE.arrival) if a >= QUIET[1])
    woke = TRACE.arrival[first]
    # asleep from then until the first request after the quiet stretch, which launches at once
    assert all(c == 0 for t, c, _ in sim.timeline[at:] if t < woke)
    assert any(t == woke and c >= 1 for t, c, _ in sim.timeline)
    assert sim.waited[first] == 1
    assert sim.state[first] == autoscale.FINISHED
    assert sim.dispatched[first] == pytest.approx(woke + COLD)


def test_static_is_billed_count_times_duration() -> None:
    r = autoscale.simulate(TRACE, autoscale.Static(3), 2.0, COLD, slots=3)
    assert r.replica_seconds == pytest.approx(3 * TRACE.duration)
    assert r.woken == 0


def test_every_request_is_accounted_for_under_every_policy() -> None:
    out = autoscale.run_all(TRACE, 2.0, COLD, matched=False)
    assert [r.policy for r in out["results"]] == ["static peak", "QPS threshold", "Fortress"]
    for r in out["results"]:
        assert r.requests == len(TRACE) > 4000  # 4200 s at 1 req/s
        assert (r.completed, r.failed) == (len(TRACE), 0), r.policy
        assert 0 < r.replica_seconds <= CONFIG.max_replicas * TRACE.duration
    fortress = out["results"][2]
    assert fortress.woken > 0 and fortress.decisions.get("idle", 0) >= 1


def test_an_impossible_slo_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert autoscale.main(["--slo", "0.001", "--hours", "2", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["passed"] is False
    assert out["results"][2]["attainment"] == 0.0
    assert not out["targets"][0]["passed"]
