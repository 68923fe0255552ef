"""The replica pool: which replicas serve which model, their names, and picking one for a request.

The health checker, the outlier detector and the fleet change the pool; the gateway only reads
it. A model index (name or alias → ``Route``) is rebuilt whenever membership or a replica's
reported models change, so the hot path is one dict lookup plus a scan of a few replicas.

Names are given here and nowhere else: a pool is named by its ``name:``, else its model, else
``default``; a replica by its ``name:``, else ``<pool>-<n>`` in config order (local replicas with
``count: n`` take n such names). A local slot keeps its name across restarts, and its counters
carry over, so metric series do not churn.

``Router.reconcile`` brings the pools in line with a reloaded config by those names: pools and
replicas (of the config) that appear are added, those that disappear drain for the pool's
deregistration delay and then leave, pool settings (health check, outlier detection, aliases,
deregistration delay) change in place. Local replicas are the fleet's: they stay as started.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fortress.config import (
    TIER_ORDER,
    ExternalReplicaConfig,
    FortressConfig,
    LocalReplicaConfig,
    OutlierDetection,
    PoolConfig,
    ReplicaConfig,
    Tier,
)
from fortress.routing.balancers import RequestView, TieredBalancer, build_balancer
from fortress.routing.replica import Origin, OriginKind, Replica, State

log = logging.getLogger("fortress.routing")


class NamingError(ValueError):
    """Two replicas or pools would get the same name."""


@dataclass(eq=False)
class Pool:
    """The replicas of one configured pool (one model, or "whatever they report")."""

    name: str
    config: PoolConfig
    balancer: TieredBalancer
    replicas: list[Replica] = field(default_factory=list)
    # Gone from a reloaded config: out of the model index, its replicas draining; it leaves the
    # router once they have.
    retiring: bool = False
    # Made at run time for replicas added without a model (the discovery pool): not the
    # config's, so a reload leaves it alone.
    on_demand: bool = False
    # Set by the fleet for a pool at zero on purpose: "asleep", "waking", "stopped" or
    # "scheduled off". /ready does not count it as missing a replica.
    dormant: str | None = None

    @property
    def model(self) -> str | None:
        return self.config.model


@dataclass(frozen=True)
class PlannedSlot:
    """A local replica the config asks for: its stable name, pool and config (for the fleet)."""

    name: str
    pool: Pool
    config: LocalReplicaConfig


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


Layout = list[tuple[str, PoolConfig, list[tuple[str, ReplicaConfig]]]]


def layout(pools: Iterable[PoolConfig]) -> Layout:
    """Every pool's name, config and members (replica name, its config) as the config names
    them; a local replica with ``count: n`` is n members. Raises ``NamingError`` on a clash."""
    out: Layout = []
    pool_names: set[str] = set()
    names: set[str] = set()
    for pc in pools:
        pool_name = pc.name or pc.model or "default"
        if pool_name in pool_names:
            raise NamingError(f"two pools are named {pool_name!r}: give one a `name:`")
        pool_names.add(pool_name)
        members: list[tuple[str, ReplicaConfig]] = []
        n = 0
        for rc in pc.replicas:
            if isinstance(rc, ExternalReplicaConfig):
                n += 1
                members.append((rc.name or f"{pool_name}-{n}", rc))
                continue
            # A local replica: `count` slots, or the fleet's `max_replicas`, started by the fleet.
            for i in range(pc.fleet.max_replicas if pc.fleet is not None else rc.count):
                n += 1
                single = pc.fleet is None and rc.count == 1
                explicit = rc.name if single or rc.name is None else f"{rc.name}-{i + 1}"
                members.append((explicit or f"{pool_name}-{n}", rc))
        for name, _ in members:
            if name in names:
                raise NamingError(f"two replicas are named {name!r}: give one a `name:`")
            names.add(name)
        out.append((pool_name, pc, members))
    return out


@dataclass
class Reconciled:
    """What ``Router.reconcile`` changed (names), for the reload's log line."""

    pools_added: list[str] = field(default_factory=list)
    pools_removed: list[str] = field(default_factory=list)
    pools_changed: list[str] = field(default_factory=list)
    replicas_added: list[str] = field(default_factory=list)
    replicas_removed: list[str] = field(default_factory=list)  # draining, then removed
    replicas_changed: list[str] = field(default_factory=list)  # tier or URL
    # Pools whose local replicas differ from the running ones: a restart applies that.
    local_changed: list[str] = field(default_factory=list)
    # Replicas whose health check settings changed (the checker re-plans their next check).
    rechecked: list[Replica] = field(default_factory=list)

    def summary(self) -> list[str]:
        """``pools added: a, b``-style parts, one per kind of change that happened."""
        parts = []
        for label, names in (
            ("pools added", self.pools_added),
            ("pools removed", self.pools_removed),
            ("pools changed", self.pools_changed),
            ("replicas added", self.replicas_added),
            ("replicas draining", self.replicas_removed),
            ("replicas changed", self.replicas_changed),
        ):
            if names:
                parts.append(f"{label}: {', '.join(names)}")
        return parts


class Router:
    """All pools, their replicas' names, the model index and the balancers."""

    def __init__(
        self,
        config: FortressConfig,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.rng = rng or random.Random()
        self.pools: list[Pool] = []
        self.index: dict[str, Route] = {}
        self.started_at = int(time.time())
        # Callbacks run when a replica is added or removed (the health checker listens).
        self.on_added: list[Callable[[Replica], None]] = []
        self.on_removed: list[Callable[[Replica], None]] = []
        self.planned: list[PlannedSlot] = []  # local replicas, started by the fleet
        self._drains: dict[Replica, asyncio.Task[None]] = {}
        self._names: set[str] = set()
        # Counters of replicas that left, resumed by the next replica of the same name.
        self._retired: dict[str, tuple[int, int, int]] = {}
        # The config's own replicas: name → (pool, url, tier); reconcile keeps the router in
        # line with it (one replaced under its name joins once its predecessor has drained).
        self._wanted: dict[str, tuple[str, str, Tier]] = {}
        self._retiring: set[asyncio.Task[None]] = set()
        for _, pc, members in layout(config.pools):
            pool = self._new_pool(pc)
            for name, rc in members:
                self._names.add(name)
                if isinstance(rc, ExternalReplicaConfig):
                    self._new_replica(pool, rc.url, rc.tier, name, Origin(OriginKind.STATIC))
                    self._wanted[name] = (pool.name, rc.url.rstrip("/"), rc.tier)
                else:
                    self.planned.append(PlannedSlot(name, pool, rc))
        self.rebuild_index()

    # -- names -----------------------------------------------------------------------------

    def _new_pool(self, pc: PoolConfig) -> Pool:
        name = pc.name or pc.model or "default"
        if any(p.name == name for p in self.pools):
            raise NamingError(f"two pools are named {name!r}: give one a `name:`")
        pool = Pool(name, pc, build_balancer(pc, self.config.routing, self.rng))
        self.pools.append(pool)
        return pool

    def next_name(self, pool: Pool) -> str:
        """The first ``<pool>-<n>`` never used in this process, for a replica added at run time
        (a name that left is not reused, so its series and records stay its own)."""
        n = 1
        while f"{pool.name}-{n}" in self._names:
            n += 1
        return f"{pool.name}-{n}"

    # -- membership ------------------------------------------------------------------------

    def _new_replica(
        self, pool: Pool, url: str, tier: Tier, name: str, origin: Origin, incarnation: int = 1
    ) -> Replica:
        r = Replica(
            name=name,
            url=url,
            tier=tier,
            check=pool.config.health_check,
            pool=pool.name,
            expected_model=pool.model,
            origin=origin,
            incarnation=incarnation,
        )
        carried = self._retired.pop(name, None)
        if carried is not None:
            r.served, r.failures, r.ejections_total = carried
        pool.replicas.append(r)
        return r

    def add_replica(
        self,
        pool: Pool,
        url: str,
        tier: Tier,
        *,
        name: str | None = None,
        origin: Origin | None = None,
        incarnation: int = 1,
    ) -> Replica:
        """Register a replica; it starts ``initial`` and gets traffic once a check passes.

        ``name`` is a planned slot's name (the fleet) or a new one (``next_name`` when None).
        A replica re-registered under the name of one that left resumes its counters.
        """
        slot = origin is not None and origin.kind is OriginKind.LOCAL
        if name is None:
            name = self.next_name(pool)
        elif self.replica_named(name) is not None or (name in self._names and not slot):
            # A planned slot re-registers under its own name; nothing else may take a used one.
            raise NamingError(f"the replica name {name!r} is taken")
        self._names.add(name)
        r = self._new_replica(
            pool, url.rstrip("/"), tier, name, origin or Origin(OriginKind.ADMIN), incarnation
        )
        self.rebuild_index()
        for cb in self.on_added:
            cb(r)
        return r

    def remove_replica(self, replica: Replica) -> None:
        """Remove at once (no draining); see ``drain`` for the graceful way."""
        for pool in self.pools:
            if replica in pool.replicas:
                pool.replicas.remove(replica)
                self._retired[replica.name] = (replica.served, replica.failures, replica.ejections_total)
                pool.balancer.forget(replica.name)
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

    def pool_named(self, name: str) -> Pool | None:
        return next((p for p in self.pools if p.name == name), None)

    def pool_for_model(self, model: str | None) -> Pool | None:
        """The pool configured for ``model``; for None, the discovery pool (made on demand)."""
        if model is None:
            return self.default_pool()
        return next((p for p in self.pools if p.model == model and not p.retiring), None)

    def default_pool(self) -> Pool:
        """The discovery pool (model=None), created on demand for ``--replica URL`` use."""
        for pool in self.pools:
            if pool.model is None and not pool.retiring:
                return pool
        pool = self._new_pool(PoolConfig())
        pool.on_demand = True
        return pool

    def replica_named(self, name: str) -> Replica | None:
        return next((r for r in self.all_replicas() if r.name == name), None)

    def all_replicas(self) -> Iterable[Replica]:
        for pool in self.pools:
            yield from pool.replicas

    def tier_of(self, replica: Replica) -> list[Replica]:
        """The replicas of ``replica``'s pool in its tier (itself included)."""
        pool = self.pool_of(replica)
        return [r for r in pool.replicas if r.tier is replica.tier] if pool is not None else [replica]

    def outlier_config(self, replica: Replica) -> OutlierDetection:
        pool = self.pool_named(replica.pool)
        return pool.config.outlier if pool is not None else OutlierDetection()

    def set_models(self, replica: Replica, models: frozenset[str]) -> None:
        """Record what a replica reports in /v1/models (rebuilds the index on change)."""
        if models != replica.models:
            replica.models = models
            self.rebuild_index()

    # -- reload ----------------------------------------------------------------------------

    def reconcile(self, config: FortressConfig) -> Reconciled:
        """Bring the pools and the config's replicas in line with ``config`` (a reload).

        Checked before anything changes: a ``NamingError`` (a clash within the config, or with
        a replica added at run time under another URL) leaves the router as it was. Then pools
        and replicas are matched by name: new ones are added (starting ``initial``), gone ones
        drain for their pool's deregistration delay and leave (a gone pool leaves the model
        index at once), a replica whose URL or pool changed is drained and replaced under its
        name. Pool settings change in place; a changed health check applies from each replica's
        next check (``rechecked``). Replicas added at run time stay unless their pool goes;
        local replicas stay as the fleet started them (``local_changed`` lists the pools whose
        local replicas the config changed).
        """
        new_layout = layout(config.pools)
        planned = {slot.name: slot for slot in self.planned}
        live = {r.name: r for r in self.all_replicas()}
        wanted: dict[str, tuple[str, str, Tier]] = {}
        # An unnamed replica is named by its position: removing the first of two would rename
        # the second and drain both. It keeps the name of the live replica at its URL instead.
        at_url = {
            (r.pool, r.url): r.name
            for r in live.values()
            if r.origin.kind is OriginKind.STATIC and r.state is not State.DRAINING
        }
        explicit = {
            rc.name
            for _, _, members in new_layout
            for _, rc in members
            if isinstance(rc, ExternalReplicaConfig) and rc.name
        }
        for pool_name, _, members in new_layout:
            for name, rc in members:
                if not isinstance(rc, ExternalReplicaConfig):
                    continue
                url = rc.url.rstrip("/")
                if rc.name is None:
                    kept = at_url.get((pool_name, url))
                    if kept is not None and kept not in explicit and kept not in wanted:
                        name = kept
                    elif name in wanted:  # its position's name went to a replica kept above
                        name = self._free_name(pool_name, wanted, explicit, at_url.values())
                wanted[name] = (pool_name, url, rc.tier)
                if name in planned:
                    raise NamingError(f"the replica name {name!r} is a local replica's: give one a `name:`")
                r = live.get(name)
                if (
                    r is not None
                    and r.origin.kind is OriginKind.ADMIN
                    and (r.url, r.pool) != (url, pool_name)
                ):
                    raise NamingError(
                        f"the replica name {name!r} is taken by a replica added at run time "
                        f"({r.url}): give one a `name:`, or remove that replica first"
                    )
        out = Reconciled()
        by_name = {pool_name: (pc, members) for pool_name, pc, members in new_layout}
        for pool in list(self.pools):
            pc_members = by_name.get(pool.name)
            slots = [(slot.name, slot.config) for slot in self.planned if slot.pool is pool]
            if pc_members is None:
                if slots:  # the fleet's processes run on: only a restart stops them
                    out.local_changed.append(pool.name)
                    continue
                if pool.on_demand:
                    continue  # the run time's, not the config's
                if not pool.replicas:  # nothing to drain: gone at once
                    self.pools.remove(pool)
                    out.pools_removed.append(pool.name)
                    continue
                if not pool.retiring:
                    pool.retiring = True
                    out.pools_removed.append(pool.name)
                    for r in pool.replicas:
                        if r.state is not State.DRAINING:
                            out.replicas_removed.append(r.name)
                        self._retire(r)
                continue
            pc, members = pc_members
            pool.on_demand = False  # the config names it now
            local = [(n, rc) for n, rc in members if not isinstance(rc, ExternalReplicaConfig)]
            if local != slots or pc.fleet != pool.config.fleet:  # the fleet runs as it started
                out.local_changed.append(pool.name)
            if pool.retiring:  # back in the config before its replicas finished draining
                pool.retiring = False
                out.pools_added.append(pool.name)
            if self._settings(pool.config) != self._settings(pc):
                self._apply_pool_settings(pool, pc, config, out)
            pool.config = pc
        for pool_name, pc, members in new_layout:
            if self.pool_named(pool_name) is None:
                pool = self._new_pool(pc)
                out.pools_added.append(pool.name)
                if any(not isinstance(rc, ExternalReplicaConfig) for _, rc in members):
                    out.local_changed.append(pool.name)
        # The config's replicas: gone or moved ones drain; same name and URL stay (tier in place).
        retiring = {p.name for p in self.pools if p.retiring}
        for name, r in live.items():
            if r.pool in retiring:
                continue  # drained with its pool above
            if r.origin.kind is not OriginKind.STATIC and not (
                r.origin.kind is OriginKind.ADMIN and name in wanted
            ):
                continue
            want = wanted.get(name)
            if want is not None and (r.pool, r.url) == want[:2]:
                r.origin = Origin(OriginKind.STATIC)  # an admin-added one the config now names
                if r.tier is not want[2]:
                    r.tier = want[2]
                    out.replicas_changed.append(name)
                continue
            if r.state is not State.DRAINING:
                (out.replicas_changed if want is not None else out.replicas_removed).append(name)
            self._retire(r)
        self._wanted = wanted
        self.config = config
        out.replicas_added = self._converge()
        out.replicas_added = [n for n in out.replicas_added if n not in out.replicas_changed]
        self.rebuild_index()
        return out

    def _free_name(self, pool_name: str, *taken: Iterable[str]) -> str:
        used = set(self._names).union(*taken)
        n = 1
        while f"{pool_name}-{n}" in used:
            n += 1
        return f"{pool_name}-{n}"

    @staticmethod
    def _settings(pc: PoolConfig) -> PoolConfig:
        return pc.model_copy(update={"replicas": []})

    def _apply_pool_settings(
        self, pool: Pool, pc: PoolConfig, config: FortressConfig, out: Reconciled
    ) -> None:
        out.pools_changed.append(pool.name)
        pool.balancer = build_balancer(pc, config.routing, self.rng)
        now = self.clock()
        for r in pool.replicas:
            r.expected_model = pc.model
            if r.check != pc.health_check:
                r.check = pc.health_check
                # A shorter interval applies now, a longer one after the check already planned.
                r.next_check_at = min(r.next_check_at, now + r.check.interval)
                out.rechecked.append(r)

    def _converge(self) -> list[str]:
        """Add each replica the config names that is not there (and whose name is free)."""
        added = []
        for name, (pool_name, url, tier) in self._wanted.items():
            if self.replica_named(name) is not None:
                continue
            pool = self.pool_named(pool_name)
            if pool is None or pool.retiring:
                continue
            self._names.add(name)
            r = self._new_replica(pool, url, tier, name, Origin(OriginKind.STATIC))
            for cb in self.on_added:
                cb(r)
            added.append(name)
        if added:
            self.rebuild_index()
        return added

    def _retire(self, replica: Replica) -> None:
        """Drain ``replica`` in the background; then add what waited for its name, and drop a
        retiring pool left empty."""

        async def retire() -> None:
            await self.drain(replica)
            added = self._converge()
            if added:
                log.info("replicas added after a drain: %s", ", ".join(added))
            for pool in [p for p in self.pools if p.retiring and not p.replicas]:
                self.pools.remove(pool)
                log.info("pool %s removed", pool.name)
            self.rebuild_index()

        replica.drain()  # out of rotation now, not when the task first runs
        task = asyncio.get_running_loop().create_task(retire(), name=f"retire-{replica.name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # -- the index -------------------------------------------------------------------------

    def rebuild_index(self) -> None:
        index: dict[str, Route] = {}
        for pool in self.pools:
            if pool.retiring:
                continue  # its model is no longer served; in-flight requests hold their replica
            if pool.model is not None:
                route = Route(pool.model, pool.model, pool, self._tiers(pool.replicas, pool.model))
                index[pool.model] = route
                for alias in pool.config.aliases:
                    index[alias] = Route(alias, pool.model, pool, route.tiers)
        for pool in self.pools:
            if pool.model is None and not pool.retiring:
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

    def dormant(self) -> dict[str, str]:
        """Model → why its pool has no replica on purpose (asleep, waking, stopped, scheduled off)."""
        return {p.model: p.dormant for p in self.pools if p.model is not None and p.dormant is not None}

    def configured_models(self) -> list[str]:
        return [p.model for p in self.pools if p.model is not None]

    # -- picking ---------------------------------------------------------------------------

    def pick(
        self, route: Route, view: RequestView | None = None, exclude: tuple[Replica, ...] = ()
    ) -> Replica | None:
        """The replica for one attempt, by the route's pool's balancer (see ``balancers``)."""
        return route.pool.balancer.pick(route.tiers, view, exclude)

    def healthy_count(self, route: Route) -> int:
        return sum(1 for tier in route.tiers for r in tier if r.state is State.HEALTHY)

    def ready(self) -> tuple[bool, list[str]]:
        """Every configured model (and every discovered one) has a healthy replica, but those
        of pools the fleet keeps at zero on purpose (``dormant``)."""
        missing = [
            name
            for name, route in self.index.items()
            if not route.is_alias and route.pool.dormant is None and self.healthy_count(route) == 0
        ]
        if not self.index:
            return False, ["(no model discovered yet)"]
        return not missing, missing
