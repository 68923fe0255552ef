"""One replica: its stable identity, where it came from, and its target-health state machine.

States follow the AWS ALB: ``initial`` (registered, must pass one check before it gets traffic),
``healthy``, ``unhealthy`` and ``draining``. Active checks move a replica between healthy and
unhealthy after ``healthy_threshold`` / ``unhealthy_threshold`` consecutive results. Passive
signals from real traffic are judged by ``fortress.routing.outlier``: an ejection makes the
replica ``unhealthy`` until its ejection time has passed *and* it has passed
``healthy_threshold`` consecutive checks (checks during the ejection count).

Identity is stable: a replica is named from the config (pool and index, or its ``name:``), a
local process slot keeps its name across restarts and counts them in ``incarnation``, so metric
series and audit records keep one name for one place in the fleet.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from fortress.config import HealthCheck, Tier
from fortress.routing.load import EngineSample


class State(StrEnum):
    INITIAL = "initial"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"


class OriginKind(StrEnum):
    """Where a replica came from."""

    STATIC = "static"  # a URL in the config or on the command line
    ADMIN = "admin"  # added at run time through POST /admin/replicas
    LOCAL = "local"  # a process Fortress's supervisor started on this machine
    FLEET = "fleet"  # an instance of a fleet's cloud provider (an Auto Scaling group's)


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a replica came from; for a local process, which one."""

    kind: OriginKind = OriginKind.STATIC
    engine: str | None = None  # local: llamacpp | vllm | sim; fleet: the provider (aws)
    pid: int | None = None  # local: the process of this incarnation

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"kind": str(self.kind)}
        if self.engine is not None:
            out["engine"] = self.engine
        if self.pid is not None:
            out["pid"] = self.pid
        return out


@dataclass(eq=False)
class Replica:
    """A model server the gateway may send requests to. Mutated only on the event loop."""

    name: str
    url: str
    tier: Tier
    check: HealthCheck
    pool: str = "default"  # the pool's name
    # The model id the pool expects this replica to report; None accepts whatever it reports.
    expected_model: str | None = None
    origin: Origin = Origin()
    incarnation: int = 1  # 1 + restarts of the process behind this name
    state: State = State.INITIAL
    models: frozenset[str] = frozenset()
    in_flight: int = 0
    served: int = 0
    failures: int = 0
    consecutive_ok: int = 0
    consecutive_fail: int = 0
    last_check_at: float | None = None  # wall-clock time, for display
    last_check_ok: bool | None = None
    last_check_detail: str = ""
    next_check_at: float = 0.0  # monotonic; the checker sleeps until then
    checks: int = 0
    reason: str = "registered"  # why the replica is in its current state
    # Outlier detection (passive): consecutive failures and the current ejection.
    consecutive_5xx: int = 0
    consecutive_gateway_failures: int = 0
    ejections: int = 0  # ejections since the last successful answer (multiplies the time)
    ejections_total: int = 0
    ejected_until: float | None = None  # monotonic; set while passively ejected
    # Engine load from the replica's own /metrics (routing.load), None until scraped.
    load: EngineSample | None = None
    # Model identity: what the replica serves instead of its pool's model, while it does (seen by
    # a health check's /v1/models or in an answer). Such a replica takes no traffic, not even
    # when a tier fails open.
    wrong_model: str | None = None
    model_mismatches: dict[str, int] | None = None  # detections by source: "check" | "answer"

    # -- active health checks -------------------------------------------------------------

    def record_check(self, ok: bool, detail: str, now: float, wall: float) -> bool:
        """Apply one active check result. Returns True when the state changed."""
        self.checks += 1
        self.last_check_at = wall
        self.last_check_ok = ok
        self.last_check_detail = detail
        self.next_check_at = now + self.check.interval
        if self.ejected_until is not None and self.ejected_until > now:
            # Look again right when the ejection ends, so a recovered replica is back promptly.
            self.next_check_at = min(self.next_check_at, self.ejected_until)
        if ok:
            self.consecutive_ok += 1
            self.consecutive_fail = 0
        else:
            self.consecutive_fail += 1
            self.consecutive_ok = 0
        before = self.state
        if self.state is State.INITIAL:
            if ok:
                self._set(State.HEALTHY, "passed initial health check")
            elif self.consecutive_fail >= self.check.unhealthy_threshold:
                self._set(State.UNHEALTHY, f"failed {self.consecutive_fail} checks: {detail}")
        elif self.state is State.HEALTHY:
            if not ok and self.consecutive_fail >= self.check.unhealthy_threshold:
                self._set(State.UNHEALTHY, f"failed {self.consecutive_fail} checks: {detail}")
        elif self.state is State.UNHEALTHY:
            ejected = self.ejected_until is not None and now < self.ejected_until
            if ok and not ejected and self.consecutive_ok >= self.check.healthy_threshold:
                self.ejected_until = None
                self._set(State.HEALTHY, f"passed {self.consecutive_ok} checks")
        return self.state is not before

    # -- passive signals (decided by routing.outlier) ----------------------------------------

    def eject(self, reason: str, now: float, duration: float) -> bool:
        """Take the replica out of rotation for at least ``duration`` seconds. Returns True when
        it was in rotation."""
        if self.state not in (State.HEALTHY, State.INITIAL):
            return False
        self.ejections += 1
        self.ejections_total += 1
        self.ejected_until = now + duration
        self.next_check_at = min(self.next_check_at, self.ejected_until)
        self.consecutive_ok = 0
        self.consecutive_5xx = self.consecutive_gateway_failures = 0
        self._set(State.UNHEALTHY, f"ejected: {reason}")
        return True

    def misidentify(self, served: str, wanted: str, source: str, now: float, hold: float = 0.0) -> bool:
        """The replica serves ``served`` instead of ``wanted`` (seen by ``source``: a
        health "check" or an "answer"). Out of rotation at once, without thresholds: identity is
        a fact, not a trend. ``hold`` keeps it out for that long even if /v1/models looks right
        again (a replica whose answers contradict its /v1/models). Returns True on the first
        detection."""
        first = self.wrong_model is None
        self.wrong_model = served
        counts = self.model_mismatches if self.model_mismatches is not None else {}
        counts[source] = counts.get(source, 0) + 1
        self.model_mismatches = counts
        if hold:
            self.ejected_until = max(self.ejected_until or 0.0, now + hold)
            self.next_check_at = min(self.next_check_at, self.ejected_until)
        self.consecutive_ok = 0
        if self.state is not State.DRAINING:
            self._set(State.UNHEALTHY, f"wrong model: serves {served}, not {wanted!r}")
        return first

    def identity_confirmed(self, now: float) -> bool:
        """/v1/models shows the pool's model again: forget a mismatch once its hold is over.
        Returns True when a mismatch was forgotten (health checks then bring it back)."""
        if self.wrong_model is None or (self.ejected_until is not None and now < self.ejected_until):
            return False
        self.wrong_model = None
        return True

    @property
    def ejected(self) -> bool:
        """Out of rotation by outlier detection (until health checks bring it back)."""
        return self.state is State.UNHEALTHY and self.ejected_until is not None

    def drain(self) -> None:
        self._set(State.DRAINING, "draining")

    def _set(self, state: State, reason: str) -> None:
        self.state = state
        self.reason = reason

    def snapshot(self) -> dict[str, object]:
        """A JSON-ready view for ``fortress status`` and the admin API."""
        return {
            "name": self.name,
            "url": self.url,
            "pool": self.pool,
            "tier": str(self.tier),
            "state": str(self.state),
            "reason": self.reason,
            "models": sorted(self.models),
            "expected_model": self.expected_model,
            "origin": self.origin.describe(),
            "incarnation": self.incarnation,
            "in_flight": self.in_flight,
            "served": self.served,
            "failures": self.failures,
            "ejected": self.ejected,
            "ejections": self.ejections_total,
            "wrong_model": self.wrong_model,
            "model_mismatches": dict(self.model_mismatches or {}),
            "last_check_at": self.last_check_at,
            "last_check_ok": self.last_check_ok,
            "last_check_detail": self.last_check_detail,
        }
