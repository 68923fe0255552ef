"""One replica and its target-health state machine (the AWS ALB's, plus passive ejection).

States: ``initial`` (registered, must pass one check before it gets traffic), ``healthy``,
``unhealthy`` and ``draining``. Active checks move a replica between healthy and unhealthy
after ``healthy_threshold`` / ``unhealthy_threshold`` consecutive results; a passive signal
from real traffic (refused, reset, 5xx, timeout) ejects it at once and schedules an early
re-check after a backoff that doubles with each consecutive ejection.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import StrEnum

from fortress.config import HealthCheck, Tier


class State(StrEnum):
    INITIAL = "initial"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"


_ids = itertools.count(1)


@dataclass(eq=False)
class Replica:
    """A model server the gateway may send requests to. Mutated only on the event loop."""

    url: str
    tier: Tier
    check: HealthCheck
    # The model id the pool expects this replica to report; None accepts whatever it reports.
    expected_model: str | None = None
    name: str = ""
    state: State = State.INITIAL
    models: frozenset[str] = frozenset()
    in_flight: int = 0
    served: int = 0
    failures: int = 0
    consecutive_ok: int = 0
    consecutive_fail: int = 0
    ejections: int = 0
    last_check_at: float | None = None  # wall-clock time, for display
    last_check_ok: bool | None = None
    last_check_detail: str = ""
    next_check_at: float = 0.0  # monotonic; the checker sleeps until then
    checks: int = 0
    reason: str = "registered"  # why the replica is in its current state
    local: bool = False  # started by Fortress's supervisor (vs an external URL)
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name:
            self.name = f"r{next(_ids)}"

    # -- active health checks -------------------------------------------------------------

    def record_check(self, ok: bool, detail: str, now: float, wall: float) -> bool:
        """Apply one active check result. Returns True when the state changed."""
        self.checks += 1
        self.last_check_at = wall
        self.last_check_ok = ok
        self.last_check_detail = detail
        self.next_check_at = now + self.check.interval
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
            if ok and self.consecutive_ok >= self.check.healthy_threshold:
                self._set(State.HEALTHY, f"passed {self.consecutive_ok} checks")
        return self.state is not before

    # -- passive signals from real traffic -----------------------------------------------

    def eject(self, reason: str, now: float) -> bool:
        """Take the replica out of rotation at once. Returns True when it was in rotation."""
        self.failures += 1
        if self.state in (State.HEALTHY, State.INITIAL):
            self.ejections += 1
            backoff = min(
                self.check.eject_backoff * (2 ** (self.ejections - 1)), self.check.eject_backoff_max
            )
            self.next_check_at = now + backoff
            self.consecutive_ok = 0
            self._set(State.UNHEALTHY, f"ejected: {reason}")
            return True
        return False

    def record_success(self) -> None:
        """A request completed: the replica works, so the ejection backoff starts over."""
        self.served += 1
        self.ejections = 0

    def drain(self) -> None:
        self._set(State.DRAINING, "draining")

    def _set(self, state: State, reason: str) -> None:
        self.state = state
        self.reason = reason

    def serves(self, model: str) -> bool:
        return model in self.models

    def snapshot(self) -> dict[str, object]:
        """A JSON-ready view for ``fortress status`` and the admin API."""
        return {
            "name": self.name,
            "url": self.url,
            "tier": str(self.tier),
            "state": str(self.state),
            "reason": self.reason,
            "models": sorted(self.models),
            "expected_model": self.expected_model,
            "in_flight": self.in_flight,
            "served": self.served,
            "failures": self.failures,
            "last_check_at": self.last_check_at,
            "last_check_ok": self.last_check_ok,
            "last_check_detail": self.last_check_detail,
            "local": self.local,
        }
