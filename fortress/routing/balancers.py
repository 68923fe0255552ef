"""Balancers: which replica of a route gets one request. A strategy per pool (``balancer:``).

Every strategy walks the tiers the same way (``TieredBalancer``): traffic goes to the highest
tier with a healthy replica; with ``outlier.panic_threshold`` set, a tier with fewer healthy
replicas than that share of its members spills to the next tier that is not itself in panic,
and when there is none it *fails open* within the tier (its unhealthy and ejected replicas take
traffic too, as in Envoy's panic mode); when no tier has a healthy replica,
``routing.when_all_unhealthy: fail_open`` tries the unhealthy ones (as an ALB does) and
``reject`` gives up. Failing open never includes a replica known to serve another model.
Within the chosen tier a strategy's ``choose`` picks one replica; it sees
the request (``RequestView``: model, session key, prompt prefix, computed only when asked) and
each replica's load (``in_flight``, and ``load`` from the engine's own metrics).

Strategies: ``least_outstanding`` (power of two choices on requests in flight; the default).
Session affinity and prefix-aware routing plug in here as further ``choose`` functions.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from fortress.config import PoolConfig, Routing
from fortress.routing.replica import Replica, State

Tiers = tuple[list[Replica], ...]  # a route's replicas per tier, highest first


class RequestView(Protocol):
    """What a balancer may know of the request (``core.context.RequestContext`` is one)."""

    model: str | None

    @property
    def session_key(self) -> str | None: ...

    def prompt_prefix(self, limit: int = 4096) -> str: ...


class Balancer(Protocol):
    """Picks the replica for one attempt of one request."""

    def pick(self, tiers: Tiers, view: RequestView | None, exclude: Sequence[Replica] = ()) -> Replica | None:
        """A replica of a route (its ``tiers``) not in ``exclude``, or None when none may be tried."""


class TieredBalancer:
    """The tier walk every strategy shares; subclasses implement ``choose``."""

    def __init__(self, pool: PoolConfig, routing: Routing, rng: random.Random) -> None:
        self.rng = rng
        self.fail_open = routing.when_all_unhealthy == "fail_open"
        self.panic = pool.outlier.panic_threshold / 100.0

    def choose(self, candidates: list[Replica], view: RequestView | None) -> Replica:
        raise NotImplementedError

    def pick(self, tiers: Tiers, view: RequestView | None, exclude: Sequence[Replica] = ()) -> Replica | None:
        any_healthy = False
        for i, tier in enumerate(tiers):
            cands = [r for r in tier if r.state is State.HEALTHY]
            if not cands:
                continue
            any_healthy = True
            if self.panic and self._panics(tier, len(cands)):
                if any(self._serves(t) for t in tiers[i + 1 :]):
                    continue  # spill to a lower tier that has the capacity
                # Nowhere to spill: fail open within this tier (Envoy's panic mode).
                cands = [r for r in tier if _may_fail_open(r) or r.state is State.HEALTHY]
            if exclude:
                cands = [r for r in cands if r not in exclude]
            if cands:
                return self.choose(cands, view)
        if any_healthy or not self.fail_open:
            return None
        for tier in tiers:
            cands = [r for r in tier if _may_fail_open(r) and r not in exclude]
            if cands:
                return self.choose(cands, view)
        return None

    def _panics(self, tier: list[Replica], healthy: int) -> bool:
        return healthy < self.panic * len(tier)

    def _serves(self, tier: list[Replica]) -> bool:
        healthy = sum(1 for r in tier if r.state is State.HEALTHY)
        return healthy > 0 and not self._panics(tier, healthy)


def _may_fail_open(r: Replica) -> bool:
    # Unhealthy, but never one known to serve another model: failing open trades health for
    # availability, never identity.
    return r.state is State.UNHEALTHY and r.wrong_model is None


class LeastOutstanding(TieredBalancer):
    """Power of two choices: of two random candidates, the one with fewer requests in flight."""

    def choose(self, candidates: list[Replica], view: RequestView | None) -> Replica:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self.rng.sample(candidates, 2)
        if a.in_flight == b.in_flight:
            return a
        return a if a.in_flight < b.in_flight else b


# The one registry of strategies: the name a pool's `balancer:` gives -> the class.
BALANCERS: dict[str, type[TieredBalancer]] = {"least_outstanding": LeastOutstanding}


def build_balancer(pool: PoolConfig, routing: Routing, rng: random.Random) -> TieredBalancer:
    return BALANCERS[pool.balancer](pool, routing, rng)
