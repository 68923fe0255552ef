"""The ``aws`` provider: EC2 Auto Scaling groups that Fortress sizes and routes to.

Fortress decides, the groups provision. One group per capacity type (``aws.groups``: spot,
on-demand), used in the pool's ``capacity`` order:

* **Size.** The controller's count (``want``) goes to the preferred group as its desired
  capacity. A scale-in never lowers a desired capacity and lets the group pick: Fortress picks
  the instance, drains it (the pool's deregistration delay), then terminates it with
  ``ShouldDecrementDesiredCapacity``.
* **Instances become replicas**: every instance ``InService`` is routed to at
  ``http://<private or public ip>:<port>``, named by its instance id (the controller registers
  it; it gets traffic once a health check passes). Pending instances count as capacity on the
  way; terminating ones leave the router.
* **Spot fallback** (SkyServe's dynamic fallback): a group that refuses capacity (the API
  refuses the desired count, the group's max is reached, or it stays short of its desired
  capacity for ``spot_fallback_after``) is *refused*: it keeps what it has and the next group
  takes the shortfall. After ``return_to_spot_after`` the preferred group is asked again; the
  fallback group's instances are drained and removed only as the preferred group's instances
  come into service, so capacity never dips.
* **Spot interruption** (the two-minute notice, delivered to ``interrupt``: an EventBridge rule
  or an agent on the instance calling ``POST /admin/fleet/{pool}/interruption``): the instance
  is drained at once and detached from its group without decrementing it, so the group launches
  the replacement right away.
* **Lifecycle hook** (``aws.lifecycle_hook``): an instance the group terminates on its own
  (health replacement, rebalancing) waits in ``Terminating:Wait`` until Fortress has drained it
  and completes the action.
* **Adoption.** At start the groups are read: their instances become replicas and their desired
  capacities are the starting count, so a restarted gateway launches nothing new.
* **CPU and GPU** (for ``cpu``/``gpu`` targets only): CloudWatch, every ``metrics_interval``,
  per group: ``AWS/EC2 CPUUtilization`` and the CloudWatch agent's GPU utilisation, both by
  ``AutoScalingGroupName``; the pool's figure is the groups' latest one-minute averages
  weighted by their instances in service. A minute or more late (what AWS target tracking
  reads too); a reading older than five intervals is no signal.

Every AWS call runs in a worker thread (boto3 blocks); the controller reads ``instances()``,
a view refreshed every ``poll_interval`` and after each change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from fortress.config import FleetConfig
from fortress.fleet.providers.base import (
    ACTIVE,
    DRAINING,
    PREEMPTED,
    PROVISIONING,
    READY,
    TERMINATED,
    Instance,
)

log = logging.getLogger("fortress.fleet")

Drain = Callable[[str, float | None], Awaitable[None]]  # (replica name, at most seconds)

_PENDING = {"Pending", "Pending:Wait", "Pending:Proceed", "Warmed:Pending"}
_LEAVING = {"Terminating", "Terminating:Wait", "Terminating:Proceed", "Terminated", "Detaching", "Detached"}
INTERRUPTION_DRAIN = 90.0  # seconds of the two-minute notice spent draining


@dataclass
class _Seen:
    """What the last read of the groups said of one instance."""

    id: str
    capacity: str  # spot | on-demand
    lifecycle: str
    address: str | None
    version: str | None = None  # its launch template and version (what it runs)


@dataclass
class _Group:
    name: str
    desired: int = 0
    max: int = 0
    instances: int = 0  # not leaving (pending or in service)
    in_service: int = 0
    short_since: float | None = None  # monotonic time it first had fewer instances than desired
    refused_at: float | None = None  # monotonic time capacity was refused


class AwsProvider:
    """Sizes a pool's Auto Scaling groups and reports their instances."""

    kind = "aws"
    registers = True  # the controller routes to its instances

    def __init__(
        self,
        pool: str,
        fleet: FleetConfig,
        drain: Drain,
        clock: Callable[[], float] = time.monotonic,
        session: Any = None,
    ) -> None:
        assert fleet.aws is not None
        self.pool = pool
        self.cfg = fleet.aws
        self.order = fleet.capacity_order
        self.drain = drain
        self.clock = clock
        self._session = session
        self._asg: Any = None
        self._ec2: Any = None
        self.groups = {cap: _Group(name) for cap, name in self.cfg.groups.items()}
        self.want: int | None = None  # the controller's count; None until the groups are read
        self.seen: dict[str, _Seen] = {}
        self.draining: set[str] = set()  # being drained, then terminated by us
        self.preempted: dict[str, _Seen] = {}  # interrupted: detached, draining until reclaimed
        self.completed: set[str] = set()  # lifecycle actions completed
        self.interruptions = 0
        self.fallbacks = 0
        self.last_error: str | None = None
        self.metrics_error: str | None = None  # the last CloudWatch failure, until a read works
        self._outages: dict[str, str] = {}  # repeating failures already logged, by kind
        self._poke = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._jobs: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()  # one change of the groups at a time
        self._step_lock = asyncio.Lock()
        wanted = {t.metric for t in fleet.target}
        self.read_cpu, self.read_gpu = "cpu" in wanted, "gpu" in wanted
        self._cw: Any = None
        self.utilisation: dict[str, tuple[float, float]] = {}  # metric -> (percent, read at)
        self._metrics_read: float | None = None

    # -- boto3, in threads ---------------------------------------------------------------------

    def _clients(self) -> tuple[Any, Any]:
        if self._asg is None:
            import boto3

            session = self._session or boto3.session.Session()
            kw = {"region_name": self.cfg.region, "endpoint_url": self.cfg.endpoint_url}
            self._asg = session.client("autoscaling", **kw)
            self._ec2 = session.client("ec2", **kw)
        return self._asg, self._ec2

    def _describe(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        asg, ec2 = self._clients()
        names = [g.name for g in self.groups.values()]
        out = asg.describe_auto_scaling_groups(AutoScalingGroupNames=names)["AutoScalingGroups"]
        by_name = {g["AutoScalingGroupName"]: g for g in out}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise LookupError(f"no Auto Scaling group named {', '.join(missing)}")
        ids = [i["InstanceId"] for g in out for i in g.get("Instances", [])] + list(self.preempted)
        addresses: dict[str, dict[str, Any]] = {}
        if ids:
            for r in ec2.describe_instances(InstanceIds=ids)["Reservations"]:
                for inst in r["Instances"]:
                    addresses[inst["InstanceId"]] = inst
        return by_name, addresses

    def _call(self, op: str, **kw: Any) -> Any:
        asg, _ = self._clients()
        return getattr(asg, op)(**kw)

    # -- the view --------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Read the groups and their instances (in a thread)."""
        groups, addresses = await asyncio.to_thread(self._describe)
        now = self.clock()
        seen: dict[str, _Seen] = {}
        for cap, g in self.groups.items():
            raw = groups[g.name]
            g.desired, g.max = raw["DesiredCapacity"], raw["MaxSize"]
            alive = [i for i in raw.get("Instances", []) if i["LifecycleState"] not in _LEAVING]
            g.instances = len(alive)
            g.in_service = sum(1 for i in alive if i["LifecycleState"] == "InService")
            if g.instances < g.desired:
                g.short_since = g.short_since if g.short_since is not None else now
            else:
                g.short_since = None
            for i in raw.get("Instances", []):
                iid = i["InstanceId"]
                seen[iid] = _Seen(
                    iid, cap, i["LifecycleState"], self._address(addresses.get(iid)), _version(i)
                )
        for iid, p in self.preempted.items():
            if iid in addresses and addresses[iid].get("State", {}).get("Name") in (
                "terminated",
                "shutting-down",
            ):
                p.lifecycle = "Terminated"
        self.seen = seen
        if self.want is None:  # adoption: the groups' sizes are where we start
            self.want = sum(g.desired for g in self.groups.values())
            log.info(
                "fleet %s: adopted %d instance(s) of %s",
                self.pool,
                sum(1 for s in seen.values() if s.lifecycle not in _LEAVING),
                ", ".join(g.name for g in self.groups.values()),
            )

    def _address(self, inst: dict[str, Any] | None) -> str | None:
        if inst is None:
            return None
        key = "PrivateIpAddress" if self.cfg.address == "private_ip" else "PublicIpAddress"
        return inst.get(key)

    def instances(self) -> list[Instance]:
        out = []
        for s in sorted(self.seen.values(), key=lambda s: (self.order.index(s.capacity), s.id)):
            if s.id in self.preempted:
                continue
            if s.id in self.draining or s.lifecycle in _LEAVING:
                state = TERMINATED if s.lifecycle in ("Terminated", "Detached") else DRAINING
            elif s.lifecycle in _PENDING:
                state = PROVISIONING
            elif s.lifecycle == "InService":
                state = READY
            else:
                state = PROVISIONING  # Standby and the warm-pool states: not serving
            url = f"http://{s.address}:{self.cfg.port}" if s.address and state == READY else None
            out.append(
                Instance(
                    s.id,
                    state,
                    s.id,
                    capacity=s.capacity,
                    detail=s.lifecycle,
                    url=url,
                    extra={"version": s.version},
                )
            )
        for p in self.preempted.values():
            out.append(Instance(p.id, PREEMPTED, p.id, capacity=p.capacity, detail="spot interruption"))
        # Capacity asked of a group and not yet visible as instances: on its way.
        for cap, g in self.groups.items():
            visible = sum(1 for s in self.seen.values() if s.capacity == cap and s.lifecycle not in _LEAVING)
            for n in range(max(0, g.desired - visible - self._draining_in(cap))):
                out.append(
                    Instance(f"{g.name}/pending-{n + 1}", PROVISIONING, "", capacity=cap, detail="requested")
                )
        # Asked of this provider and not yet of a group (the next round sizes the groups): on its
        # way too, or the controller's next tick would ask again and overshoot.
        active = sum(1 for i in out if i.state in ACTIVE)
        for n in range(max(0, (self.want or 0) - active)):
            out.append(
                Instance(
                    f"{self.pool}/asked-{n + 1}", PROVISIONING, "", capacity=self.order[0], detail="asked"
                )
            )
        return out

    def _draining_in(self, cap: str) -> int:
        return sum(1 for iid in self.draining if (s := self.seen.get(iid)) is not None and s.capacity == cap)

    # -- the controller's calls --------------------------------------------------------------------

    def launch(self, count: int) -> list[str]:
        if self.want is None:
            return []  # not read yet: the first refresh sets the count
        self.want += count
        self._poke.set()
        return [f"pending-{n + 1}" for n in range(count)]

    def terminate(self, ids: list[str]) -> None:
        for iid in ids:
            if self.want is not None:
                self.want = max(0, self.want - 1)
            if iid in self.seen and iid not in self.draining:
                self.draining.add(iid)
                self._job(self._drain_and_terminate(iid))
        self._poke.set()  # placeholders: the group's desired goes down with the next reconcile

    def interrupt(self, instance_id: str) -> bool:
        """A spot interruption notice for ``instance_id``: drain now, replace now. False when
        the instance is not one of this pool's."""
        s = self.seen.get(instance_id)
        if s is None or instance_id in self.preempted:
            return False
        self.interruptions += 1
        self.preempted[instance_id] = s
        self.draining.discard(instance_id)
        log.warning(
            "fleet %s: spot interruption of %s: draining, launching a replacement", self.pool, instance_id
        )
        self._job(self._preempt(s))
        return True

    def cpu_percent(self) -> float | None:
        return self._fresh("cpu")

    def gpu_percent(self) -> float | None:
        return self._fresh("gpu")

    def _fresh(self, metric: str) -> float | None:
        got = self.utilisation.get(metric)
        if got is None or self.clock() - got[1] > 5 * self.cfg.metrics_interval:
            return None
        return got[0]

    def _read_utilisation(self) -> dict[str, float]:
        """The pool's CPU and GPU from CloudWatch (in a thread): per group the latest one-minute
        average, weighted by the group's instances in service."""
        if self._cw is None:
            import boto3

            session = self._session or boto3.session.Session()
            self._cw = session.client(
                "cloudwatch", region_name=self.cfg.region, endpoint_url=self.cfg.endpoint_url
            )
        sources = {"cpu": ("AWS/EC2", "CPUUtilization"), "gpu": (self.cfg.gpu_namespace, self.cfg.gpu_metric)}
        wanted = [m for m, on in (("cpu", self.read_cpu), ("gpu", self.read_gpu)) if on]
        queries, weights = [], {}
        for metric in wanted:
            namespace, name = sources[metric]
            for n, g in enumerate(self.groups.values()):
                if not g.in_service:
                    continue
                qid = f"{metric}{n}"
                weights[qid] = (metric, g.in_service)
                queries.append(
                    {
                        "Id": qid,
                        "MetricStat": {
                            "Metric": {
                                "Namespace": namespace,
                                "MetricName": name,
                                "Dimensions": [{"Name": "AutoScalingGroupName", "Value": g.name}],
                            },
                            "Period": 60,
                            "Stat": "Average",
                        },
                    }
                )
        if not queries:
            return {}
        now = datetime.now(UTC)
        got = self._cw.get_metric_data(  # the minute under way included: EndTime is exclusive
            MetricDataQueries=queries,
            StartTime=now - timedelta(minutes=10),
            EndTime=now + timedelta(minutes=1),
            ScanBy="TimestampDescending",
        )
        sums: dict[str, list[float]] = {}
        for r in got["MetricDataResults"]:
            if not r.get("Values"):
                continue  # no datapoint in ten minutes: this group has no say
            metric, weight = weights[r["Id"]]
            latest = max(zip(r["Timestamps"], r["Values"], strict=True))[1]
            acc = sums.setdefault(metric, [0.0, 0.0])
            acc[0] += latest * weight
            acc[1] += weight
        return {m: total / weight for m, (total, weight) in sums.items() if weight}

    async def _utilisation(self) -> None:
        now = self.clock()
        if not (self.read_cpu or self.read_gpu):
            return
        if self._metrics_read is not None and now - self._metrics_read < self.cfg.metrics_interval:
            return
        self._metrics_read = now
        try:
            read = await asyncio.to_thread(self._read_utilisation)
        except Exception as exc:  # no signal this round; the targets without one have no say
            self._error(f"cannot read CloudWatch: {exc}", outage="cloudwatch")
            return
        self.metrics_error = None
        self._recovered("cloudwatch")
        for metric, value in read.items():
            self.utilisation[metric] = (value, now)

    # -- jobs --------------------------------------------------------------------------------------

    def _job(self, coro: Awaitable[None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)

    async def _drain_and_terminate(self, iid: str) -> None:
        try:
            await self.drain(iid, None)
            async with self._lock:
                await asyncio.to_thread(
                    self._call,
                    "terminate_instance_in_auto_scaling_group",
                    InstanceId=iid,
                    ShouldDecrementDesiredCapacity=True,
                )
            log.info("fleet %s: %s drained and terminated", self.pool, iid)
        except Exception as exc:
            self._error(f"terminating {iid}: {exc}")
            self.draining.discard(iid)
        finally:
            self._poke.set()

    async def _preempt(self, s: _Seen) -> None:
        g = self.groups[s.capacity]
        try:
            async with self._lock:
                # Detached without decrementing: the group starts the replacement now, while the
                # interrupted instance drains for what is left of its two minutes.
                await asyncio.to_thread(
                    self._call,
                    "detach_instances",
                    InstanceIds=[s.id],
                    AutoScalingGroupName=g.name,
                    ShouldDecrementDesiredCapacity=False,
                )
        except Exception as exc:
            self._error(f"detaching interrupted {s.id}: {exc}")
        self._poke.set()
        try:
            await self.drain(s.id, INTERRUPTION_DRAIN)
        finally:
            self.preempted.pop(s.id, None)

    def _error(self, text: str, outage: str | None = None) -> None:
        """Record a failure. One that repeats every poll (``outage``: the groups, CloudWatch)
        is logged once as a WARNING, again only if its text changes, and once at INFO when it
        ends (``_recovered``): an unreachable API must not write a line per poll."""
        if outage == "cloudwatch":
            self.metrics_error = text
        else:
            self.last_error = text
        if outage is not None and self._outages.get(outage) == text:
            log.debug("fleet %s: still %s", self.pool, text)
            return
        if outage is not None:
            self._outages[outage] = text
        log.warning("fleet %s: %s", self.pool, text)

    def _recovered(self, outage: str) -> None:
        if self._outages.pop(outage, None) is not None:
            log.info(
                "fleet %s: %s answers again", self.pool, "CloudWatch" if outage == "cloudwatch" else "AWS"
            )

    # -- sizing the groups ----------------------------------------------------------------------------

    async def reconcile(self) -> None:
        """Make the groups' desired capacities match ``want`` in capacity order (see the module
        docstring for fallback and return)."""
        if self.want is None:
            return
        async with self._lock:
            now = self.clock()
            remaining = self.want
            served_before = 0  # in-service instances of the groups preferred to this one
            for i, cap in enumerate(self.order):
                g = self.groups[cap]
                if g.refused_at is not None and now - g.refused_at >= self.cfg.return_to_spot_after:
                    log.info("fleet %s: asking %s (%s) for capacity again", self.pool, g.name, cap)
                    g.refused_at = None
                    g.short_since = None
                if g.refused_at is None and g.short_since is not None and i < len(self.order) - 1:
                    if now - g.short_since >= self.cfg.spot_fallback_after:
                        self._refuse(
                            g, cap, f"short of its desired {g.desired} for {now - g.short_since:.0f}s"
                        )
                mine = g.instances - self._draining_in(cap)
                target = remaining if g.refused_at is None else min(mine, remaining)
                if i > 0:  # a fallback group keeps its instances until preferred ones serve
                    target = max(target, min(mine, max(0, self.want - served_before)))
                if target > g.max and i < len(self.order) - 1:
                    self._refuse(g, cap, f"max size {g.max} reached")
                    target = g.max
                target = min(target, g.max)
                await self._size(g, cap, target, mine)
                remaining = max(0, remaining - target)
                served_before += g.in_service

    def _refuse(self, g: _Group, cap: str, why: str) -> None:
        if g.refused_at is None:
            self.fallbacks += 1
            nxt = self.order[self.order.index(cap) + 1] if cap != self.order[-1] else None
            log.warning(
                "fleet %s: %s capacity refused (%s): %s takes the shortfall", self.pool, cap, why, nxt
            )
        g.refused_at = self.clock()

    async def _size(self, g: _Group, cap: str, target: int, mine: int) -> None:
        draining = self._draining_in(cap)
        if target > mine:
            desired = target + draining
            if desired != g.desired:
                try:
                    await asyncio.to_thread(
                        self._call,
                        "set_desired_capacity",
                        AutoScalingGroupName=g.name,
                        DesiredCapacity=desired,
                        HonorCooldown=False,
                    )
                    g.desired = desired
                except Exception as exc:
                    self._error(f"{g.name} refused desired capacity {desired}: {exc}")
                    if cap != self.order[-1]:
                        self._refuse(g, cap, str(exc).splitlines()[0][:200])
        else:
            # Requested and not yet there: lower the desired capacity to what exists (nothing is
            # terminated by that); below that, drain and terminate instances we pick ourselves.
            if g.desired > mine + draining:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(
                        self._call,
                        "set_desired_capacity",
                        AutoScalingGroupName=g.name,
                        DesiredCapacity=mine + draining,
                        HonorCooldown=False,
                    )
                    g.desired = mine + draining
            victims = [
                s.id
                for s in sorted(self.seen.values(), key=lambda s: (s.lifecycle == "InService", s.id))
                if s.capacity == cap and s.lifecycle not in _LEAVING and s.id not in self.draining
            ][: max(0, mine - target)]
            for iid in victims:
                self.draining.add(iid)
                self._job(self._drain_and_terminate(iid))

    async def _hooks(self) -> None:
        """Drain instances the group terminates on its own, then let the group go on."""
        hook = self.cfg.lifecycle_hook
        for s in list(self.seen.values()):
            if s.lifecycle != "Terminating:Wait" or s.id in self.completed or s.id in self.draining:
                continue
            self.completed.add(s.id)

            async def finish(s: _Seen = s) -> None:
                await self.drain(s.id, None)
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(
                        self._call,
                        "complete_lifecycle_action",
                        LifecycleHookName=hook,
                        AutoScalingGroupName=self.groups[s.capacity].name,
                        InstanceId=s.id,
                        LifecycleActionResult="CONTINUE",
                    )

            self._job(finish())

    # -- rolling updates ---------------------------------------------------------------------------

    async def roll(self, force: bool, within: float) -> dict[str, Any]:
        """A rolling update of every group with instances: an instance refresh to the group's
        launch template as it is now (``SkipMatching`` unless ``force``), surging above the
        count (MinHealthyPercentage 100, MaxHealthyPercentage 200) and rolled back by the group
        when it fails (``AutoRollback``). Old instances are drained through the lifecycle hook
        when one is configured. Returns when every refresh ended, or ``within`` seconds."""
        started: list[tuple[str, str]] = []
        for cap in self.order:
            g = self.groups[cap]
            if g.instances == 0:
                continue
            out = await asyncio.to_thread(
                self._call,
                "start_instance_refresh",
                AutoScalingGroupName=g.name,
                Strategy="Rolling",
                Preferences={
                    "MinHealthyPercentage": 100,
                    "MaxHealthyPercentage": 200,
                    "SkipMatching": not force,
                    "AutoRollback": True,
                },
            )
            started.append((g.name, out["InstanceRefreshId"]))
        if not started:
            return {
                "strategy": "instance-refresh",
                "replaced": [],
                "rolled_back": False,
                "detail": "no instance to roll",
            }
        deadline = self.clock() + within
        ended: dict[str, dict[str, Any]] = {}
        while len(ended) < len(started):
            for name, rid in started:
                if name in ended:
                    continue
                out = await asyncio.to_thread(
                    self._call,
                    "describe_instance_refreshes",
                    AutoScalingGroupName=name,
                    InstanceRefreshIds=[rid],
                )
                r = out["InstanceRefreshes"][0]
                if r["Status"] not in ("Pending", "InProgress", "Cancelling", "RollbackInProgress", "Baking"):
                    ended[name] = r
            if len(ended) < len(started):
                if self.clock() >= deadline:
                    break
                await asyncio.sleep(min(5.0, self.cfg.poll_interval))
        failed = {n: r for n, r in ended.items() if r["Status"] != "Successful"}
        pending = [n for n, _ in started if n not in ended]
        self._poke.set()
        if failed or pending:
            why = "; ".join(f"{n}: {r['Status']} ({r.get('StatusReason', '')})" for n, r in failed.items())
            if pending:
                why = "; ".join(
                    [*([why] if why else []), f"{', '.join(pending)}: not done within {within:g}s"]
                )
            return {
                "strategy": "instance-refresh",
                "replaced": [],
                "rolled_back": bool(failed),
                "timed_out": bool(pending),
                "detail": why,
            }
        return {
            "strategy": "instance-refresh",
            "replaced": [n for n, _ in started],
            "rolled_back": False,
            "detail": f"instance refresh done in {', '.join(n for n, _ in started)}",
        }

    # -- life ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Read the groups once (adoption), then keep them in step in the background."""
        try:
            async with self._step_lock:
                await self.refresh()
        except Exception as exc:  # the loop retries; the pool starts with what it can see
            self._error(f"cannot read the groups: {exc}", outage="groups")
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"aws-{self.pool}")

    async def step(self) -> None:
        """One round: refresh, resize, hooks. Rounds never overlap: a resize must read a view
        taken after the previous resize, or it would undo its own request."""
        async with self._step_lock:
            await self.refresh()
            await self.reconcile()
            if self.cfg.lifecycle_hook:
                await self._hooks()
            await self.refresh()
            await self._utilisation()

    async def _loop(self) -> None:
        while True:
            try:
                await self.step()
                self.last_error = None
                self._recovered("groups")
            except Exception as exc:
                self._error(f"cannot read or size the groups: {exc}", outage="groups")
            self._poke.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self.cfg.poll_interval)

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._jobs) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stats(self) -> dict[str, Any]:
        return {
            "interruptions": self.interruptions,
            "fallbacks": self.fallbacks,
            "groups": {
                cap: {
                    "name": g.name,
                    "desired": g.desired,
                    "max": g.max,
                    "instances": g.instances,
                    "in_service": g.in_service,
                    "refused": g.refused_at is not None,
                }
                for cap, g in self.groups.items()
            },
            "last_error": self.last_error,
            "metrics_error": self.metrics_error,
        }


def _version(instance: dict[str, Any]) -> str | None:
    """What an Auto Scaling instance runs: its launch template (name or id) and version."""
    lt = instance.get("LaunchTemplate")
    if not lt:
        return instance.get("LaunchConfigurationName")
    return f"{lt.get('LaunchTemplateName') or lt.get('LaunchTemplateId')}:{lt.get('Version')}"
