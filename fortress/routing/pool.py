"""The replica pool: which replicas serve which model, and picking one for a request.

The health checker and the supervisor change the pool; the gateway only reads it. A model
index (name or alias → ``Route``) is rebuilt whenever membership or a replica's reported models
change, so the hot path is one dict lookup plus a scan of a few replicas.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fortress.config import TIER_ORDER, FortressConfig, PoolConfig, ReplicaConfig, Tier
from fortress.routing.replica import Replica, State


@dataclass(eq=False)
class Pool:
    """The replicas of one configured pool (one model, or "whatever they report")."""

    config: PoolConfig
    replicas: list[Replica] = field(default_factory=list)

    @property
    def model(self) -> str | None:
        return self.config.model


@dataclass(eq=False)
class Route:
    """Where requests for one public model name go."""

    name: str  # what the client asked for
    upstream_model: str  # what the replicas call it (differs for an alias)
    pool: Pool
    tiers: tuple[list[Replica], ...]

    @property
    def is_alias(self) -> bool:
        return self.name != self.upstream_model


class Router:
    """All pools, the model index and the balancing policy."""

    def __init__(
        self,
        config: FortressConfig,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.rng = rng or random.Random()
        self.pools: list[Pool] = [Pool(pc) for pc in config.pools]
        self.index: dict[str, Route] = {}
        self.started_at = int(time.time())
        # Callbacks run when a replica is added or removed (the health checker listens).
        self.on_added: list[Callable[[Replica], None]] = []
        self.on_removed: list[Callable[[Replica], None]] = []
        self._drains: dict[Replica, asyncio.Task[None]] = {}
        for pool in self.pools:
            for rc in pool.config.replicas:
                if rc.url:
                    self._new_replica(pool, rc.url, rc.tier)
        self.rebuild_index()

    # -- membership ------------------------------------------------------------------------

    def _new_replica(self, pool: Pool, url: str, tier: Tier, *, local: bool = False) -> Replica:
        r = Replica(url=url, tier=tier, check=pool.config.health_check, expected_model=pool.model)
        r.local = local
        pool.replicas.append(r)
        return r

    def add_replica(self, pool: Pool, url: str, tier: Tier, *, local: bool = False) -> Replica:
        """Register a replica; it starts ``initial`` and gets traffic once a check passes."""
        r = self._new_replica(pool, url.rstrip("/"), tier, local=local)
        self.rebuild_index()
        for cb in self.on_added:
            cb(r)
        return r

    def remove_replica(self, replica: Replica) -> None:
        """Remove at once (no draining); see ``drain`` for the graceful way."""
        for pool in self.pools:
            if replica in pool.replicas:
                pool.replicas.remove(replica)
                self.rebuild_index()
                for cb in self.on_removed:
                    cb(replica)
                return

    async def drain(self, replica: Replica, delay: float | None = None) -> None:
        """Stop new traffic to ``replica``, wait for its in-flight requests (at most the pool's
        deregistration delay), then remove it. Safe to call twice."""
        if replica in self._drains:
            await asyncio.shield(self._drains[replica])
            return
        pool = self.pool_of(replica)
        if pool is None:
            return
        limit = pool.config.deregistration_delay if delay is None else delay
        replica.drain()
        task = asyncio.create_task(self._drain(replica, limit))
        self._drains[replica] = task
        await asyncio.shield(task)

    async def _drain(self, replica: Replica, limit: float) -> None:
        deadline = self.clock() + limit
        try:
            # Polling keeps the request path free of drain bookkeeping; 50 ms is plenty here.
            while replica.in_flight > 0 and self.clock() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            self.remove_replica(replica)
        finally:
            self._drains.pop(replica, None)

    def pool_of(self, replica: Replica) -> Pool | None:
        for pool in self.pools:
            if replica in pool.replicas:
                return pool
        return None

    def pool_for_replica_config(self, rc: ReplicaConfig) -> Pool:
        for pool in self.pools:
            if rc in pool.config.replicas:
                return pool
        raise KeyError("replica config is not in any pool")

    def default_pool(self) -> Pool:
        """The discovery pool (model=None), created on demand for ``--replica URL`` use."""
        for pool in self.pools:
            if pool.model is None:
                return pool
        pool = Pool(PoolConfig())
        self.pools.append(pool)
        return pool

    def all_replicas(self) -> Iterable[Replica]:
        for pool in self.pools:
            yield from pool.replicas

    def set_models(self, replica: Replica, models: frozenset[str]) -> None:
        """Record what a replica reports in /v1/models (rebuilds the index on change)."""
        if models != replica.models:
            replica.models = models
            self.rebuild_index()

    # -- the index -------------------------------------------------------------------------

    def rebuild_index(self) -> None:
        index: dict[str, Route] = {}
        for pool in self.pools:
            if pool.model is not None:
                route = Route(pool.model, pool.model, pool, self._tiers(pool.replicas, pool.model))
                index[pool.model] = route
                for alias in pool.config.aliases:
                    index[alias] = Route(alias, pool.model, pool, route.tiers)
        for pool in self.pools:
            if pool.model is None:
                names = sorted({m for r in pool.replicas for m in r.models})
                for m in names:
                    if m in index:
                        continue  # an explicit pool owns this name
                    index[m] = Route(m, m, pool, self._tiers(pool.replicas, m))
        self.index = index

    @staticmethod
    def _tiers(replicas: list[Replica], model: str) -> tuple[list[Replica], ...]:
        # A replica is routable for `model` only once it has reported that model: identity is
        # strict, also when every replica is unhealthy and we fail open.
        return tuple([r for r in replicas if r.tier is t and model in r.models] for t in TIER_ORDER)

    def route(self, model: str) -> Route | None:
        return self.index.get(model)

    def configured_models(self) -> list[str]:
        return [p.model for p in self.pools if p.model is not None]

    # -- picking ---------------------------------------------------------------------------

    def pick(self, route: Route, exclude: tuple[Replica, ...] = ()) -> Replica | None:
        """Highest tier with a healthy replica; least outstanding requests of two random ones.

        When no replica of the route is healthy, ``fail_open`` tries the unhealthy ones anyway
        (as an ALB does) and ``reject`` returns None.
        """
        any_healthy = False
        for tier in route.tiers:
            cands = [r for r in tier if r.state is State.HEALTHY]
            if not cands:
                continue
            any_healthy = True
            if exclude:
                cands = [r for r in cands if r not in exclude]
            if cands:
                return self._p2c(cands)
        if any_healthy or self.config.routing.when_all_unhealthy == "reject":
            return None
        for tier in route.tiers:
            cands = [r for r in tier if r.state is State.UNHEALTHY and r not in exclude]
            if cands:
                return self._p2c(cands)
        return None

    def _p2c(self, cands: list[Replica]) -> Replica:
        if len(cands) == 1:
            return cands[0]
        a, b = self.rng.sample(cands, 2)
        if a.in_flight == b.in_flight:
            return a
        return a if a.in_flight < b.in_flight else b

    def healthy_count(self, route: Route) -> int:
        return sum(1 for tier in route.tiers for r in tier if r.state is State.HEALTHY)

    def ready(self) -> tuple[bool, list[str]]:
        """Every configured model (and every discovered one) has a healthy replica."""
        missing = [
            name
            for name, route in self.index.items()
            if not route.is_alias and self.healthy_count(route) == 0
        ]
        if not self.index:
            return False, ["(no model discovered yet)"]
        return not missing, missing
