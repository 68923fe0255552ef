"""Passive outlier detection, after Envoy's: what real traffic says about a replica.

* A refused connection or a reset (the process is gone) ejects at once, whatever the cap below:
  nothing a request carries can cause it, and a SIGKILLed replica must cost no client a failure.
* Answers with status 5xx eject after ``consecutive_5xx`` in a row (default 5); timeouts and
  502/503/504 answers eject after ``consecutive_gateway_failure`` in a row (default 5; a timeout
  counts as a 5xx too, the client sees a 504). One good answer resets both counts.
* An ejection lasts ``base_ejection_time`` x the number of ejections since the replica last
  answered well, capped at ``max_ejection_time``; after it the replica returns only through
  active health checks (``Replica.record_check``).
* 5xx and timeouts never eject more than ``max_ejection_percent`` of a tier (at least one replica
  may always be ejected): one poison request that fails on every replica must not empty the
  primary tier.

* An answer that names another model than the one asked for (``wrong_model``) takes the replica
  out at once and keeps it out for an ejection time: the relay never passes such an answer on.

Active health checks stay a separate input with ALB semantics (``routing.health``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from enum import StrEnum

from fortress.config import OutlierDetection
from fortress.routing.pool import Router
from fortress.routing.replica import Replica, State

log = logging.getLogger("fortress.outlier")


class Failure(StrEnum):
    """What went wrong with one attempt, as the relay saw it."""

    CONNECT = "connect"  # refused or unreachable: nothing listens there
    RESET = "reset"  # the connection died under a request (the process crashed)
    STATUS = "status"  # an answer with a 5xx status
    TIMEOUT = "timeout"  # first byte or idle gap too late


_GATEWAY_STATUSES = frozenset({502, 503, 504})


class OutlierDetector:
    """Counts passive signals per replica and ejects, per its pool's ``outlier:`` settings."""

    def __init__(
        self, router: Router, clock: Callable[[], float], on_eject: Callable[[Replica], None] | None = None
    ) -> None:
        self.router = router
        self.clock = clock
        # Called after an ejection (the health checker re-plans its next check).
        self.on_eject = on_eject
        self.skipped = 0  # ejections the max_ejection_percent cap prevented

    def success(self, replica: Replica) -> None:
        """An attempt got a good answer."""
        replica.served += 1
        replica.consecutive_5xx = 0
        replica.consecutive_gateway_failures = 0
        replica.ejections = 0  # the next ejection starts at the base time again

    def failure(self, replica: Replica, kind: Failure, detail: str, status: int | None = None) -> bool:
        """An attempt failed; returns True when this ejected the replica."""
        replica.failures += 1
        if replica.state not in (State.HEALTHY, State.INITIAL):
            return False  # already out of rotation
        cfg = self.router.outlier_config(replica)
        if kind in (Failure.CONNECT, Failure.RESET):
            return self._eject(replica, cfg, detail)
        if kind is Failure.STATUS:
            replica.consecutive_5xx += 1
            if status in _GATEWAY_STATUSES:
                replica.consecutive_gateway_failures += 1
        else:  # a timeout is a gateway failure, and a 5xx the client sees (504)
            replica.consecutive_5xx += 1
            replica.consecutive_gateway_failures += 1
        n5, ngw = cfg.consecutive_5xx, cfg.consecutive_gateway_failure
        if n5 and replica.consecutive_5xx >= n5:
            why = f"{replica.consecutive_5xx} consecutive 5xx (last: {detail})"
        elif ngw and replica.consecutive_gateway_failures >= ngw:
            why = f"{replica.consecutive_gateway_failures} consecutive gateway failures (last: {detail})"
        else:
            return False
        if not self._room_to_eject(replica, cfg):
            self.skipped += 1
            log.warning(
                "replica %s not ejected (%s): max_ejection_percent %d%% of its tier already ejected",
                replica.name,
                why,
                cfg.max_ejection_percent,
            )
            return False
        return self._eject(replica, cfg, why)

    def wrong_model(self, replica: Replica, served: str, wanted: str) -> None:
        """An answer named another model than the one asked for (it was not relayed). Out of
        rotation at once, whatever ``max_ejection_percent`` says: a replica serving the wrong
        model is no capacity at all. Held for an ejection time, so a replica whose /v1/models
        contradicts its answers is not back after two checks."""
        replica.failures += 1
        cfg = self.router.outlier_config(replica)
        hold = min(cfg.base_ejection_time * (replica.ejections + 1), cfg.max_ejection_time)
        first = replica.wrong_model is None
        if first:  # answers already in flight when it was caught do not lengthen the hold
            replica.ejections += 1
        if replica.misidentify(served, wanted, "answer", self.clock(), hold if first else 0.0):
            log.warning(
                "replica %s (%s) answered as %s for %r: out of rotation for at least %gs",
                replica.name,
                replica.url,
                served,
                wanted,
                hold,
            )
        if self.on_eject is not None:
            self.on_eject(replica)

    def suspect_model(self, replica: Replica) -> None:
        """An answer hints that the replica no longer serves its model (a 404 naming the model):
        check its /v1/models now rather than at the next interval. Not an ejection by itself:
        a 404 can have other causes, and the check decides."""
        replica.failures += 1
        replica.next_check_at = self.clock()
        if self.on_eject is not None:
            self.on_eject(replica)

    def _room_to_eject(self, replica: Replica, cfg: OutlierDetection) -> bool:
        tier = [r for r in self.router.tier_of(replica) if r.state is not State.DRAINING]
        ejected = sum(1 for r in tier if r.ejected)
        allowed = max(1, len(tier) * cfg.max_ejection_percent // 100)
        return ejected < allowed

    def _eject(self, replica: Replica, cfg: OutlierDetection, why: str) -> bool:
        duration = min(cfg.base_ejection_time * (replica.ejections + 1), cfg.max_ejection_time)
        if not replica.eject(why, self.clock(), duration):
            return False
        log.warning("replica %s (%s) ejected for %gs: %s", replica.name, replica.url, duration, why)
        if self.on_eject is not None:
            self.on_eject(replica)
        return True
