"""The ``local`` provider: a pool's replica processes on this machine, through the supervisor.

The pool has ``max_replicas`` supervised slots (``<pool>-1`` ..); a launch starts the
lowest-numbered stopped slot, a termination drains and stops one (the supervisor's
``start_slot``/``stop_slot``). A slot whose restart policy gave up is started again only after
its crash window has passed, so a replica that cannot run here is not relaunched in a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from fortress.config import LocalReplicaConfig
from fortress.fleet.providers.base import (
    DRAINING,
    FAILED,
    READY,
    STARTING,
    TERMINATED,
    Instance,
)
from fortress.fleet.supervisor import ProcState, Slot, Supervisor

log = logging.getLogger("fortress.fleet")

_STATES = {
    ProcState.STARTING: STARTING,
    ProcState.RUNNING: READY,
    ProcState.BACKOFF: STARTING,
    ProcState.FAILED: FAILED,
    ProcState.STOPPING: DRAINING,
    ProcState.STOPPED: TERMINATED,
}
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_CPUS = os.cpu_count() or 1


class LocalProvider:
    """Starts and stops the supervised slots of one pool."""

    kind = "local"
    registers = False  # the supervisor reports ready slots; the runtime registers them

    async def start(self) -> None:
        return None  # the processes start with the supervisor, or when the fleet asks

    def __init__(
        self, supervisor: Supervisor, pool: str, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.supervisor = supervisor
        self.clock = clock
        self.pool = pool
        self._starting: set[str] = set()  # asked to start, the supervisor's task not yet running
        self._stopping: set[str] = set()
        self._tasks: set[asyncio.Task[object]] = set()
        self._cpu: dict[str, tuple[float, float]] = {}  # slot → (cpu seconds, monotonic time)
        self._gpu: Any = None  # an NVML probe, made on first use

    @property
    def slots(self) -> list[Slot]:
        """The pool's slots (a rolling update may have added one)."""
        return [s for s in self.supervisor.slots if s.pool.name == self.pool]

    def _state(self, slot: Slot) -> str:
        if slot.name in self._stopping:
            return DRAINING
        if slot.name in self._starting:
            return STARTING
        return _STATES[slot.state]

    def instances(self) -> list[Instance]:
        out = []
        for s in self.slots:
            live = s.state in (ProcState.STARTING, ProcState.RUNNING)
            out.append(
                Instance(
                    id=s.name,
                    state=self._state(s),
                    replica=s.name,
                    detail=s.detail,
                    url=s.url if live else None,
                    extra={
                        "version": version_of(s.config),
                        "pid": s.pid if live else None,
                        "incarnation": s.incarnation,
                        "restarts": s.restarts,
                    },
                )
            )
        return out

    def launch(self, count: int) -> list[str]:
        now = self.clock()
        free = [s for s in self.slots if self._state(s) == TERMINATED]
        # A failed slot again only once its crash window has passed.
        free += [
            s
            for s in self.slots
            if self._state(s) == FAILED
            and (s.failed_at is None or now - s.failed_at >= s.config.options.crash_window)
        ]
        started = []
        for slot in free[:count]:
            self._starting.add(slot.name)
            self._run(slot.name, self._start(slot))
            started.append(slot.name)
        return started

    @property
    def starting(self) -> set[str]:
        return self._starting

    @property
    def stopping(self) -> set[str]:
        return self._stopping

    def start_now(self, slot: Slot) -> None:
        """Start this slot (a roll's surge), whatever the count."""
        self._starting.add(slot.name)
        self._run(slot.name, self._start(slot))

    def terminate(self, ids: list[str]) -> None:
        for name in ids:
            if name in self._stopping:
                continue
            self._stopping.add(name)
            self._starting.discard(name)
            self._run(name, self._stop(name))

    async def _start(self, slot: Slot) -> None:
        try:
            ok = await self.supervisor.start_slot(slot.name)
            if not ok:
                log.warning("fleet: %s did not start: %s", slot.name, slot.detail)
        finally:
            self._starting.discard(slot.name)

    async def _stop(self, name: str) -> None:
        try:
            await self.supervisor.stop_slot(name)
        finally:
            self._stopping.discard(name)

    def _run(self, name: str, coro: object) -> None:
        task: asyncio.Task[object] = asyncio.get_running_loop().create_task(coro, name=f"fleet-{name}")  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("fleet: %s failed: %r", task.get_name(), task.exception())

    def cpu_percent(self) -> float | None:
        """CPU use of each ready slot's process since the last call, as a percentage of this
        machine, averaged over the ready slots (None before two readings)."""
        now = self.clock()
        values = []
        for s in self.slots:
            pid = s.pid if s.state is ProcState.RUNNING else None
            used = _cpu_seconds(pid) if pid is not None else None
            if used is None:
                self._cpu.pop(s.name, None)
                continue
            prev = self._cpu.get(s.name)
            self._cpu[s.name] = (used, now)
            if prev is not None and now > prev[1] and used >= prev[0]:
                values.append(100.0 * (used - prev[0]) / ((now - prev[1]) * _CPUS))
        return sum(values) / len(values) if values else None

    def gpu_percent(self) -> float | None:
        """Average utilisation of this machine's GPUs (NVML), None without any."""
        if self._gpu is None:
            from fortress.observe.system import GpuProbe

            self._gpu = GpuProbe()
        samples = self._gpu.sample() if self._gpu.available else []
        return sum(g.utilization for g in samples) / len(samples) if samples else None

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)


def version_of(config: LocalReplicaConfig) -> str:
    """What a slot runs, as a short fingerprint of its engine and options (the same config
    gives the same version on every machine)."""
    raw = config.model_dump_json(exclude={"name", "tier", "count"}).encode()
    return hashlib.sha256(raw).hexdigest()[:12]


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` (Linux /proc), None when unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (IndexError, ValueError):
        return None
