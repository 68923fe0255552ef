"""The fleet's control loop: per pool, signals → autoscaler → decision → provider.

Every ``fleet.interval`` seconds (at once when a request waits for a wake), each managed pool's
controller reads its signals from the router (requests in flight, engine queue and KV cache,
tokens/s, CPU), asks its ``Autoscaler`` for a count and makes the provider converge on it:
launches for a shortfall, drains and terminations for a surplus. Victims are chosen so that
replicas not taking traffic go first, then the least busy; the last healthy replica of a pool
whose bounds keep at least one is never removed. Every change of the desired count is a
decision, logged and kept (``status``); counters by kind feed /metrics.

Scale to zero: a pool at 0 is *asleep*. A request for it (``Fleet.wait``, called by the relay
when the route has no healthy replica) wakes it: the controller is poked at once, and every
request of the same wake waits on one shared task until a replica is healthy, at most
``wake_timeout``, then gets a 503 with Retry-After. A stopped pool (``fortress fleet stop``) or
one whose schedule says max 0 is not woken: 503 at once, saying why and until when.

The router and the fleet meet only here: ``Pool.dormant`` tells ``/ready`` which pools are
asleep on purpose rather than broken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from fortress.config import FleetConfig, FortressConfig, LocalReplicaConfig, Tier
from fortress.core import errors
from fortress.fleet.autoscaler import Autoscaler, Decision, Signals
from fortress.fleet.instances import FleetStore
from fortress.fleet.providers.aws import AwsProvider
from fortress.fleet.providers.base import ACTIVE, DRAINING, FAILED, READY, TERMINATED, Instance, Provider
from fortress.fleet.providers.local import LocalProvider, version_of
from fortress.fleet.schedule import bounds_at, next_change
from fortress.fleet.supervisor import ProcState, Supervisor
from fortress.routing.pool import NamingError, Pool, Router
from fortress.routing.replica import Origin, OriginKind, Replica, State

log = logging.getLogger("fortress.fleet")

Wall = Callable[[], datetime]
# Histogram buckets of wake times (seconds): a simulator wakes in a few, a GPU model in minutes.
_RUNNING = (ProcState.STARTING, ProcState.RUNNING, ProcState.BACKOFF)
SAMPLE_EVERY = 0.25  # seconds between readings of the requests in flight
WAKE_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class PoolController:
    """One managed pool: its autoscaler, provider, decisions and wakes."""

    def __init__(
        self,
        pool: Pool,
        fleet: FleetConfig,
        provider: Provider,
        router: Router,
        clock: Callable[[], float],
        wall: Wall,
        alarms: Callable[[], list[tuple[str, str, str]]] | None = None,
        store: FleetStore | None = None,
        alarm_actions: frozenset[str] = frozenset(),
    ) -> None:
        self.pool = pool
        self.alarm_actions = alarm_actions  # alarms that ask for one more replica while firing
        self.store = store  # persisted instances and decisions (written in the background)
        self.config = fleet
        self.provider = provider
        self.router = router
        self.clock = clock
        self.wall = wall
        self.initial = bounds_at(fleet, wall()).min
        self.autoscaler = Autoscaler(fleet, clock(), self.initial)
        self.desired = self.initial
        self.stopped = False  # `fortress fleet stop`: held at 0, requests are not woken
        self.last: Decision | None = None
        self.decisions: deque[dict[str, Any]] = deque(maxlen=100)
        self.decision_counts: Counter[str] = Counter()
        self.waiting = 0
        self.last_request: float | None = None
        self._served = 0
        self._tokens: dict[str, tuple[float, float]] = {}  # replica → (generated tokens, at)
        self._wake: asyncio.Task[None] | None = None
        self.wake_started: float | None = None
        self.wakes: list[float] = []  # seconds each finished wake took (for the histogram)
        self.wake_counts = [0] * (len(WAKE_BUCKETS) + 1)
        self.wake_sum = 0.0
        self.poked = asyncio.Event()
        self._in_flight_samples = (0.0, 0)  # (sum, count) since the last evaluation
        # (name, severity, state) of every alarm, for scale_out_on_alarms.
        self.alarms = alarms
        self.rolling: str | None = None  # the version a roll in progress moves to
        self.rolls: deque[dict[str, Any]] = deque(maxlen=20)  # finished rolls, newest last
        self.signals: Signals | None = None

    @property
    def name(self) -> str:
        return self.pool.name

    # -- signals ---------------------------------------------------------------------------

    def replicas(self) -> list[Replica]:
        return list(self.pool.replicas)

    def healthy(self) -> int:
        return sum(1 for r in self.pool.replicas if r.state is State.HEALTHY)

    def read_signals(self) -> Signals:
        now = self.clock()
        instances = self.provider.instances()
        replicas = self.replicas()
        in_flight = sum(r.in_flight for r in replicas)
        served = sum(r.served for r in replicas)
        if in_flight or served != self._served or self.waiting:
            self.last_request = now
        self._served = served
        # The mean over the interval (sampled every SAMPLE_EVERY), not one instant: the
        # scale-in window keeps the largest value it saw, and the largest of many instants of
        # Poisson traffic sits far above its mean.
        total, count = self._in_flight_samples
        self._in_flight_samples = (0.0, 0)
        metrics: dict[str, float] = {"in_flight": (total + in_flight) / (count + 1)}
        samples = [r.load for r in replicas if r.load is not None and r.load.ok]
        queue = [s.waiting for s in samples if s.waiting is not None]
        if queue:
            metrics["queue"] = float(sum(queue))
        kv = [s.kv_usage for s in samples if s.kv_usage is not None]
        if kv:
            metrics["kv_cache"] = sum(kv) / len(kv)
        rate = self._token_rate(replicas)
        if rate is not None:
            metrics["tokens_per_second"] = rate
        cpu = self.provider.cpu_percent()
        if cpu is not None:
            metrics["cpu"] = cpu
        if any(t.metric == "gpu" for t in self.config.target):
            gpu = self.provider.gpu_percent()
            if gpu is not None:
                metrics["gpu"] = gpu
        firing: tuple[str, ...] = ()
        if self.alarm_actions and self.alarms is not None:
            firing = tuple(
                sorted(n for n, _, state in self.alarms() if n in self.alarm_actions and state == "firing")
            )
        return Signals(
            now=now,
            wall=self.wall(),
            current=sum(1 for i in instances if i.state in ACTIVE),
            ready=self.healthy(),
            metrics=metrics,
            waiting=self.waiting,
            last_request=self.last_request,
            alarms=firing,
        )

    def _token_rate(self, replicas: list[Replica]) -> float | None:
        """Generated tokens per second, summed over replicas, from the engines' counters."""
        total, seen = 0.0, False
        for r in replicas:
            s = r.load
            if s is None or not s.ok or s.generation_tokens is None:
                continue
            prev = self._tokens.get(r.name)
            self._tokens[r.name] = (s.generation_tokens, s.at)
            if prev is not None and s.at > prev[1] and s.generation_tokens >= prev[0]:
                total += (s.generation_tokens - prev[0]) / (s.at - prev[1])
                seen = True
        return total if seen else None

    # -- deciding and applying ---------------------------------------------------------------

    def tick(self) -> Decision:
        """One evaluation: decide, record a change, converge the provider on it."""
        s = self.signals = self.read_signals()
        d = self.autoscaler.decide(s)
        self.last = d
        if d.desired != self.desired:
            self._record(self.desired, d.desired, d.kind, d.reason)
            self.desired = d.desired
        self.apply(self.desired)
        instances = self.provider.instances()
        if self.provider.registers:
            self._sync_replicas(instances)
        if self.store is not None:  # an in-memory diff; changed rows are written by its thread
            self.store.observe(self.name, self.provider.kind, instances)
        self._set_dormant()
        return d

    def _sync_replicas(self, instances: list[Instance]) -> None:
        """Cloud instances in service join the router under their id (``initial``: traffic
        after a passing check); those gone without a drain of ours leave at once."""
        by_name = {i.replica: i for i in instances if i.replica}
        for i in instances:
            if i.state == READY and i.url and self.router.replica_named(i.replica) is None:
                origin = Origin(OriginKind.FLEET, engine=self.provider.kind)
                with contextlib.suppress(NamingError):  # an id that left once does not return
                    self.router.add_replica(self.pool, i.url, Tier.PRIMARY, name=i.replica, origin=origin)
        for r in list(self.pool.replicas):
            if r.origin.kind is not OriginKind.FLEET or r.state is State.DRAINING:
                continue
            i = by_name.get(r.name)
            if i is None or i.state in (TERMINATED, FAILED):
                self.router.remove_replica(r)

    async def drain(self, name: str, limit: float | None) -> None:
        """Drain the replica ``name`` (the pool's deregistration delay, or ``limit``)."""
        r = self.router.replica_named(name)
        if r is not None:
            await self.router.drain(r, limit)

    def interrupt(self, instance_id: str) -> bool:
        """A spot interruption notice: drain the instance now and replace it (aws)."""
        handler = getattr(self.provider, "interrupt", None)
        if handler is None:
            raise ValueError(f"pool {self.name}'s provider ({self.provider.kind}) has no spot instances")
        ok: bool = handler(instance_id)
        if ok:
            self.poked.set()
        return ok

    def _record(self, before: int, after: int, kind: str, reason: str) -> None:
        entry = {
            "at": self.wall().isoformat(timespec="seconds"),
            "from": before,
            "to": after,
            "kind": kind,
            "reason": reason,
        }
        self.decisions.append(entry)
        self.decision_counts[kind] += 1
        if self.store is not None:
            self.store.decision(self.name, entry)
        log.info("fleet %s: %d -> %d (%s: %s)", self.name, before, after, kind, reason)

    def apply(self, desired: int) -> None:
        if self.rolling is not None:
            return  # a roll holds the count and surges by one: nothing to correct meanwhile
        instances = self.provider.instances()
        active = [i for i in instances if i.state in ACTIVE]
        if desired > len(active):
            started = self.provider.launch(desired - len(active))
            if len(started) < desired - len(active):
                log.debug("fleet %s: wants %d, could start only %s", self.name, desired, started)
        elif desired < len(active):
            victims = self._victims(active, len(active) - desired)
            if victims:
                self.provider.terminate(victims)

    def _victims(self, active: list[Instance], count: int) -> list[str]:
        """Who goes first: not taking traffic, then fewest in flight, then the highest slot."""
        by_name = {r.name: r for r in self.pool.replicas}

        def key(i: tuple[int, Instance]) -> tuple[int, int, int]:
            r = by_name.get(i[1].replica)
            healthy = r is not None and r.state is State.HEALTHY
            return (1 if healthy else 0, r.in_flight if r is not None else 0, -i[0])

        ordered = [inst for _, inst in sorted(enumerate(active), key=key)]
        chosen = ordered[:count]
        keep_one = self.autoscaler.bounds(self.wall()).min >= 1 and not self.stopped
        if keep_one:
            left_healthy = [
                i
                for i in ordered[count:]
                if (r := by_name.get(i.replica)) is not None and r.state is State.HEALTHY
            ]
            if not left_healthy:  # never the last healthy replica of a pool that keeps one
                chosen = [
                    i for i in chosen if not ((r := by_name.get(i.replica)) and r.state is State.HEALTHY)
                ]
        return [i.id for i in chosen]

    def _set_dormant(self) -> None:
        if self.healthy():
            state = None
        elif self.stopped:
            state = "stopped"
        elif self._wake is not None and not self._wake.done():
            state = "waking"
        elif self.desired == 0:
            if any(i.state in (DRAINING, *ACTIVE) for i in self.provider.instances()):
                state = "going to sleep"  # draining the last replicas: asleep once they stopped
            else:
                state = "scheduled off" if self.autoscaler.bounds(self.wall()).max == 0 else "asleep"
        else:
            state = None  # replicas are wanted and not healthy: that is not sleep
        self.pool.dormant = state

    # -- waking ------------------------------------------------------------------------------

    async def wait(self, model: str) -> None:
        """Wait until the pool has a healthy replica, waking it (see the module docstring)."""
        if self.healthy():
            return
        if self.stopped:
            raise errors.pool_unavailable(
                model, "is stopped by its operator (fortress fleet start starts it).", "pool_stopped", 60
            )
        wall = self.wall()
        if self.autoscaler.bounds(wall).max == 0:
            nxt = next_change(self.config, wall)
            wait = int((nxt[0] - wall).total_seconds()) + 1 if nxt else 3600
            until = f" until {nxt[0].isoformat(timespec='minutes')} ({nxt[1]})" if nxt else ""
            raise errors.pool_unavailable(
                model, f"is scheduled off{until}.", "pool_scheduled_off", min(wait, 3600)
            )
        if self._wake is None or self._wake.done():
            self.wake_started = self.clock()
            self._wake = asyncio.get_running_loop().create_task(
                self._until_healthy(), name=f"wake-{self.name}"
            )
            self.pool.dormant = "waking"
        self.waiting += 1
        self.poked.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._wake), self.config.wake_timeout)
        except TimeoutError:
            raise errors.pool_unavailable(
                model,
                f"is waking up: no replica was ready within wake_timeout "
                f"{self.config.wake_timeout:g}s. Please try again shortly.",
                "pool_wake_timeout",
                math.ceil(min(self.config.wake_timeout, 30)),
            ) from None
        finally:
            self.waiting -= 1
        if self.stopped and not self.healthy():  # stopped while we waited
            raise errors.pool_unavailable(model, "was stopped by its operator.", "pool_stopped", 60)

    async def _until_healthy(self) -> None:
        # Polls only while a wake is on: the request path keeps no wake bookkeeping.
        while not self.healthy():
            if self.stopped:
                return
            await asyncio.sleep(0.05)
        assert self.wake_started is not None
        took = self.clock() - self.wake_started
        self.wakes.append(took)
        del self.wakes[:-100]
        self.wake_sum += took
        for i, bound in enumerate(WAKE_BUCKETS):
            if took <= bound:
                self.wake_counts[i] += 1
                break
        else:
            self.wake_counts[-1] += 1
        self.pool.dormant = None
        log.info("fleet %s: awake after %.1fs", self.name, took)

    # -- operator actions --------------------------------------------------------------------

    def scale(self, count: int | None) -> None:
        """Hold at ``count`` (None: back to the autoscaler)."""
        self.autoscaler.pin(count)
        self.stopped = False
        self.poked.set()

    async def stop(self, within: float) -> bool:
        """To zero and held there; True once nothing of the pool runs (within ``within`` s)."""
        self.autoscaler.pin(0)
        self.stopped = True
        self.tick()
        gone = (TERMINATED, FAILED)
        done = await self._until(lambda: all(i.state in gone for i in self.provider.instances()), within)
        self._set_dormant()
        return done

    async def start(self, within: float) -> bool:
        """Back to the autoscaler and awake; True once a replica is healthy (within ``within`` s).
        A start counts as a request waiting, so a pool at zero wakes."""
        self.stopped = False
        self.autoscaler.pin(None)
        self.waiting += 1
        try:
            self.tick()
            return await self._until(lambda: self.healthy() > 0, within)
        finally:
            self.waiting -= 1

    async def _until(self, cond: Callable[[], bool], within: float) -> bool:
        deadline = self.clock() + within
        while not cond():
            if self.clock() >= deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    # -- rolling updates -------------------------------------------------------------------------

    async def roll(
        self,
        template: LocalReplicaConfig,
        strategy: str = "rolling",
        force: bool = False,
        within: float = 300.0,
        shift: float = 0.0,
    ) -> dict[str, Any]:
        """Move every running replica to ``template`` (a new version: model, engine, flags).

        ``rolling``: one at a time, surge one on the new version, wait until it is healthy,
        then drain and stop an old one. ``blue-green``: start as many new ones as there are
        old, wait until all are healthy, then drain the old ones: together, or with ``shift``
        seconds one at a time over that long, so traffic moves to the new version in steps
        (and a new replica that turns unhealthy meanwhile stops the shift). A new replica that
        does not become healthy within ``within`` seconds (or crashes) stops the roll, and what
        was replaced is rolled back to the old version: the old replicas keep serving
        throughout. Stopped slots take the new version for later
        scale-outs. The autoscaler holds its count during a roll.
        """
        provider = self.provider
        if not isinstance(provider, LocalProvider):
            raise ValueError(f"pool {self.name}: rolling updates are for the local provider")
        if self.rolling is not None:
            raise ValueError(f"pool {self.name} is already rolling to {self.rolling}")
        new = version_of(template)
        running = [s for s in provider.slots if s.state in _RUNNING and s.name not in provider.stopping]
        old = [s for s in running if force or version_of(s.config) != new]
        result: dict[str, Any] = {"version": new, "strategy": strategy, "replaced": [], "rolled_back": False}
        if not old:
            result["detail"] = f"every replica runs {new} already"
            self._retarget_idle(provider, template)
            return result
        previous = old[0].config
        pinned = self.autoscaler.pinned
        self.rolling = new
        log.info("fleet %s: rolling %d replica(s) to %s (%s)", self.name, len(old), new, strategy)
        try:
            done, why = await self._replace(
                provider, old, template, strategy, within, result["replaced"], shift
            )
            if not done:
                result["rolled_back"] = True
                result["detail"] = why
                log.warning("fleet %s: roll to %s stopped: %s; rolling back", self.name, new, why)
                back = [provider.supervisor.slot(n) for n in result["replaced"]]
                ok, again = await self._replace(provider, back, previous, strategy, within, [])
                if not ok:
                    result["detail"] += f"; the rollback failed too: {again}"
                self._retarget_idle(provider, previous)
            else:
                self._retarget_idle(provider, template)
                result["detail"] = f"{len(old)} replica(s) now run {new}"
        finally:
            self.rolling = None
            self.autoscaler.pinned = pinned
            self.rolls.append({"at": self.wall().isoformat(timespec="seconds"), **result})
            self.poked.set()
        log.info("fleet %s: roll to %s: %s", self.name, new, result["detail"])
        return result

    async def _replace(
        self,
        provider: LocalProvider,
        old: list[Any],
        template: LocalReplicaConfig,
        strategy: str,
        within: float,
        replaced: list[str],
        shift: float = 0.0,
    ) -> tuple[bool, str]:
        """Replace ``old`` slots by slots running ``template``; (done, why not)."""
        sup = provider.supervisor
        batches = [old] if strategy == "blue-green" else [[s] for s in old]
        for batch in batches:
            fresh = []
            try:
                for _ in batch:
                    fresh.append(self._surge_slot(provider, template, exclude=fresh))
            except Exception as exc:  # the new version cannot even be launched here
                return False, f"cannot start the new version: {exc}"
            results = await asyncio.gather(*(self._until_serving(provider, s, within) for s in fresh))
            failed = [why for ok, why in results if not ok]
            if failed:
                await asyncio.gather(*(sup.stop_slot(s.name) for s in fresh), return_exceptions=True)
                return False, failed[0]
            if shift > 0 and len(batch) > 1:  # blue-green in steps: one old replica at a time
                replaced.extend(s.name for s in fresh)  # a failure now rolls these back
                for i, s in enumerate(batch):
                    await sup.stop_slot(s.name)
                    sup.retarget(s.name, template)
                    if i == len(batch) - 1:
                        break
                    await asyncio.sleep(shift / len(batch))
                    sick = [f.name for f in fresh if not self._serving(f)]
                    if sick:
                        return False, f"{', '.join(sick)} on the new version stopped serving during the shift"
                continue
            await asyncio.gather(*(sup.stop_slot(s.name) for s in batch))
            for s in batch:
                sup.retarget(s.name, template)
            replaced.extend(s.name for s in fresh)
        return True, ""

    def _serving(self, slot: Any) -> bool:
        r = self.router.replica_named(slot.name)
        return r is not None and r.state is State.HEALTHY and r.incarnation == slot.incarnation

    def _surge_slot(self, provider: LocalProvider, template: LocalReplicaConfig, exclude: list[Any]) -> Any:
        sup = provider.supervisor
        free = [
            s
            for s in provider.slots
            if s.state in (ProcState.STOPPED, ProcState.FAILED)
            and s not in exclude
            and s.name not in provider.starting
        ]
        if free:
            slot = free[0]
        else:  # every slot is busy: one more, beyond max_replicas, for the roll's surge
            slot = sup.add_slot(self.router.next_name(self.pool), self.pool, template)
        sup.retarget(slot.name, template)
        provider.start_now(slot)
        return slot

    async def _until_serving(self, provider: LocalProvider, slot: Any, within: float) -> tuple[bool, str]:
        """A started slot's replica is healthy (True), or it crashed, failed or took too long."""
        deadline = self.clock() + within
        restarts = slot.restarts
        while self.clock() < deadline:
            if self._serving(slot):
                return True, ""
            if slot.name not in provider.starting and (
                slot.state in (ProcState.FAILED, ProcState.BACKOFF) or slot.restarts > restarts
            ):
                return False, f"{slot.name} on the new version did not come up: {slot.detail}"
            await asyncio.sleep(0.1)
        return False, f"{slot.name} on the new version was not healthy within {within:g}s ({slot.detail})"

    @staticmethod
    def _retarget_idle(provider: LocalProvider, template: LocalReplicaConfig) -> None:
        for s in provider.slots:
            if s.state in (ProcState.STOPPED, ProcState.FAILED) and s.name not in provider.starting:
                with contextlib.suppress(Exception):
                    provider.supervisor.retarget(s.name, template)

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        wall = self.wall()
        bounds = self.autoscaler.bounds(wall)
        nxt = next_change(self.config, wall)
        instances = self.provider.instances()
        s = self.signals
        self._set_dormant()
        state = self.pool.dormant or ("running" if self.healthy() else "starting")
        return {
            "pool": self.name,
            "model": self.pool.model,
            "provider": self.provider.kind,
            "state": state,
            "desired": self.desired,
            "current": sum(1 for i in instances if i.state in ACTIVE),
            "ready": sum(1 for i in instances if i.state == READY),
            "healthy": self.healthy(),
            "min": bounds.min,
            "max": bounds.max,
            "bounds_from": bounds.schedule,
            "pinned": self.autoscaler.pinned,
            "stopped": self.stopped,
            "waiting": self.waiting,
            "targets": [{"metric": t.metric, "value": t.value} for t in self.config.target],
            "signals": dict(s.metrics) if s is not None else {},
            "last_reason": self.last.reason if self.last is not None else None,
            "instances": [i.snapshot() for i in instances],
            "decisions": list(self.decisions)[-20:],
            "next_scheduled": {"at": nxt[0].isoformat(timespec="minutes"), "schedule": nxt[1]}
            if nxt
            else None,
            "rolling": self.rolling,
            "rolls": list(self.rolls)[-5:],
            "wakes": len(self.wakes),
            "last_wake_seconds": round(self.wakes[-1], 3) if self.wakes else None,
            # The aws provider's groups, fallbacks and last errors (the local one has none).
            "provider_stats": stats() if callable(stats := getattr(self.provider, "stats", None)) else None,
        }

    def stats(self) -> dict[str, Any]:
        instances = self.provider.instances()
        return {
            "pool": self.name,
            "desired": self.desired,
            "current": sum(1 for i in instances if i.state in ACTIVE),
            "decisions": dict(self.decision_counts),
            "wake_buckets": list(zip(WAKE_BUCKETS, _cumulative(self.wake_counts), strict=False)),
            "wake_count": sum(self.wake_counts),
            "wake_sum": self.wake_sum,
            "spot_interruptions": getattr(self.provider, "interruptions", 0),
            "recent_decisions": list(self.decisions)[-10:],
        }

    def sample(self) -> None:
        """Add one reading of the pool's requests in flight to the interval's mean."""
        total, count = self._in_flight_samples
        self._in_flight_samples = (total + sum(r.in_flight for r in self.pool.replicas), count + 1)

    async def run(self) -> None:
        """Tick every ``interval`` seconds, or at once when poked (a wake, an operator); read
        the requests in flight every SAMPLE_EVERY in between."""
        while True:
            try:
                self.tick()
            except Exception:  # one bad tick must not end the fleet's control of the pool
                log.exception("fleet %s: evaluation failed", self.name)
            self.poked.clear()
            deadline = self.clock() + self.config.interval
            while (left := deadline - self.clock()) > 0 and not self.poked.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.poked.wait(), min(SAMPLE_EVERY, left))
                self.sample()

    async def close(self) -> None:
        if self._wake is not None:
            self._wake.cancel()
        await self.provider.close()


def _cumulative(counts: list[int]) -> list[int]:
    out, total = [], 0
    for c in counts[:-1]:
        total += c
        out.append(total)
    return out


class Fleet:
    """Every managed pool's controller; the gateway's ``Capacity`` and ``/admin/fleet``."""

    def __init__(
        self,
        config: FortressConfig,
        router: Router,
        supervisor: Supervisor | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Wall = lambda: datetime.now(UTC),
        aws_session: Any = None,
        templates: Callable[[str], LocalReplicaConfig | None] | None = None,
        alarms: Callable[[], list[tuple[str, str, str]]] | None = None,
        store: FleetStore | None = None,
    ) -> None:
        self.router = router
        self.store = store
        # Reads the config file again for a roll: the pool's replica template now (blocking:
        # called in a thread). None: rolls replace replicas with what they run (--force).
        self.templates = templates
        self.controllers: dict[str, PoolController] = {}
        for pool in router.pools:
            fc = pool.config.fleet
            if fc is None:
                continue
            provider: Provider
            if fc.provider == "aws":
                provider = AwsProvider(pool.name, fc, self._drainer(pool.name), clock, session=aws_session)
            else:
                assert supervisor is not None  # a local fleet's template is a local replica
                provider = LocalProvider(supervisor, pool.name, clock)
            self.controllers[pool.name] = PoolController(
                pool,
                fc,
                provider,
                router,
                clock,
                wall,
                alarms=alarms,
                store=store,
                alarm_actions=frozenset(
                    fc.scale_out_on_alarms
                    if fc.scale_out_on_alarms is not None
                    else [r.name for r in config.observe.alarms.rules if r.action == "scale_up"]
                ),
            )
        self._tasks: list[asyncio.Task[None]] = []

    def _drainer(self, pool: str) -> Callable[[str, float | None], Any]:
        async def drain(name: str, limit: float | None) -> None:
            await self.controllers[pool].drain(name, limit)

        return drain

    def asleep_slots(self) -> frozenset[str]:
        """The slots not to start with the rest: each pool starts with its minimum."""
        out: set[str] = set()
        for c in self.controllers.values():
            if c.provider.kind != "local":
                continue
            slots = [i.id for i in c.provider.instances()]
            out.update(slots[c.initial :])
        return frozenset(out)

    async def start(self) -> None:
        if self.store is not None:
            self.store.start()
            for c in self.controllers.values():
                if c.provider.kind != "local":
                    continue
                try:  # the processes of a previous run died with it: say so in their rows
                    closed = await asyncio.to_thread(self.store.close_orphans, c.name, "local")
                    if closed:
                        log.info(
                            "fleet %s: %d instance(s) of a previous run marked terminated", c.name, closed
                        )
                except Exception as exc:  # the store is down: the next start that reaches it does this
                    log.warning("fleet %s: previous instances not checked (store: %s)", c.name, exc)
        for c in self.controllers.values():
            await c.provider.start()
            c.tick()
            self._tasks.append(asyncio.create_task(c.run(), name=f"fleet-{c.name}"))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for c in self.controllers.values():
            await c.close()
        if self.store is not None:
            await asyncio.to_thread(self.store.stop)  # writes what is queued, bounded

    # -- the gateway's Capacity ------------------------------------------------------------------

    async def wait(self, pool: str, model: str) -> None:
        c = self.controllers.get(pool)
        if c is not None:
            await c.wait(model)

    # -- status and the admin API -------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pools": [c.status() for c in self.controllers.values()]}
        if self.store is not None:
            out["store"] = self.store.stats()
        return out

    def stats(self) -> dict[str, Any]:
        """For observe: per pool, desired and current counts, decisions by kind, wake times."""
        out: dict[str, Any] = {"fleet": [c.stats() for c in self.controllers.values()]}
        if self.store is not None:
            out.update(self.store.stats())
        return out

    async def handle_admin(self, method: str, path: str, body: bytes) -> tuple[int, Any] | None:
        """``GET /admin/fleet``; ``POST /admin/fleet/{pool}/scale`` ``{"replicas": N}`` or
        ``{"auto": true}``; ``POST /admin/fleet/{pool}/stop`` and ``/start`` (``{"timeout": s}``:
        how long to wait for nothing running, or a healthy replica); ``POST
        /admin/fleet/{pool}/interruption`` ``{"instance_id": ...}`` (a spot interruption notice)."""
        if path == "/admin/fleet":
            if method != "GET":
                return 405, errors.method_not_allowed("Use GET for /admin/fleet.").as_dict()
            return 200, self.status()
        if not path.startswith("/admin/fleet/"):
            return None
        parts = path[len("/admin/fleet/") :].split("/")
        if len(parts) != 2 or parts[1] not in ("scale", "stop", "start", "interruption", "roll"):
            return 404, errors.not_found(method, path).as_dict()
        if method != "POST":
            return 405, errors.method_not_allowed(f"Use POST for {path}.").as_dict()
        c = self.controllers.get(parts[0])
        if c is None:
            managed = ", ".join(self.controllers) or "none"
            return 404, _bad(f"No pool {parts[0]!r} has a fleet (managed pools: {managed}).").as_dict()
        try:
            req = orjson.loads(body) if body.strip() else {}
            if not isinstance(req, dict):
                raise ValueError("the body must be a JSON object")
            timeout = float(req.get("timeout", c.config.wake_timeout))
            if not 0 <= timeout <= 3600:
                raise ValueError("'timeout' must be between 0 and 3600 seconds")
        except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
            return 400, _bad(f"Bad request: {exc}").as_dict()
        action = parts[1]
        if action == "roll":
            return await _roll_request(self, c, req, timeout)
        if action == "interruption":
            iid = req.get("instance_id")
            if not isinstance(iid, str) or not iid:
                return 400, _bad('Give {"instance_id": "i-..."}.', "instance_id").as_dict()
            try:
                known = c.interrupt(iid)
            except ValueError as exc:
                return 400, _bad(str(exc)).as_dict()
            if not known:
                return 404, _bad(f"No instance {iid!r} in pool {c.name}.", "instance_id").as_dict()
            return 202, {"instance_id": iid, "draining": True, "replacement": "requested"}
        if action == "scale":
            if req.get("auto") is True:
                c.scale(None)
                return 200, c.status()
            n = req.get("replicas")
            if isinstance(n, bool) or not isinstance(n, int):
                return 400, _bad('Give {"replicas": N} (an integer) or {"auto": true}.', "replicas").as_dict()
            try:
                c.scale(n)
            except ValueError as exc:
                return 400, _bad(str(exc), "replicas").as_dict()
            c.tick()
            return 200, c.status()
        if action == "stop":
            done = await c.stop(timeout)
            return (200 if done else 504), {**c.status(), "nothing_running": done}
        ok = await c.start(timeout)
        return (200 if ok else 504), {**c.status(), "healthy_replica": ok}


async def _roll_request(
    fleet: Fleet, c: PoolController, req: dict[str, Any], within: float
) -> tuple[int, Any]:
    strategy = req.get("strategy", "rolling")
    if strategy not in ("rolling", "blue-green"):
        return 400, _bad("'strategy' is rolling or blue-green.", "strategy").as_dict()
    if isinstance(c.provider, AwsProvider):  # the groups roll themselves: an instance refresh
        if c.rolling is not None:
            return 409, errors.GatewayError(
                409, f"pool {c.name} is already rolling", "invalid_request_error", "roll_refused"
            ).as_dict()
        c.rolling = "instance-refresh"
        try:
            result = await c.provider.roll(bool(req.get("force")), within)
        except Exception as exc:  # the API refused (a refresh already running, no permission)
            return 409, errors.GatewayError(
                409, f"The instance refresh did not start: {exc}", "invalid_request_error", "roll_refused"
            ).as_dict()
        finally:
            c.rolling = None
        c.rolls.append({"at": c.wall().isoformat(timespec="seconds"), **result})
        code = 504 if result.get("timed_out") else 502 if result["rolled_back"] else 200
        return code, {**c.status(), "roll": result}
    template = None
    if fleet.templates is not None:
        try:
            template = await asyncio.to_thread(fleet.templates, c.name)
        except Exception as exc:  # an invalid file changes nothing, as for a reload
            return 400, _bad(f"The config file cannot be used: {exc}").as_dict()
    if template is None:
        current = getattr(c.provider, "slots", None)
        if not current:
            return 400, _bad(f"Pool {c.name} has no local replica to roll.").as_dict()
        template = current[0].config
    try:
        shift = float(req.get("shift", 0))
        if not 0 <= shift <= 3600:
            return 400, _bad("'shift' must be between 0 and 3600 seconds.", "shift").as_dict()
        result = await c.roll(template, strategy, bool(req.get("force")), within, shift)
    except ValueError as exc:
        return 409, errors.GatewayError(409, str(exc), "invalid_request_error", "roll_refused").as_dict()
    return (200 if not result["rolled_back"] else 502), {**c.status(), "roll": result}


def _bad(message: str, param: str | None = None) -> errors.GatewayError:
    return errors.GatewayError(400, message, "invalid_request_error", param=param)
