"""The local supervisor: starts replica processes, restarts them when they crash, stops them.

For every local replica slot the router planned (``engine: llamacpp | vllm | sim``, ``count``
slots each, named once by the router) the supervisor runs one process on a free port of
127.0.0.1:

* **Start.** The engine's argv runs in its own session (process group), with stdout and stderr
  going to a size-rotated log, ``<state_dir>/logs/<slot>.log``. Once its health path answers 200
  the supervisor tells its ``SlotListener`` (the runtime), which registers the replica with the
  router: it joins as ``initial`` and gets traffic after the health checker's first passing
  check, exactly like any other target.
* **Crash.** When the process exits on its own, the listener hears ``slot_down`` at once (nothing
  listens on that port any more) and the process is started again after a backoff (1 s doubling
  to 30 s, by default). After too many crashes in a window (5 in 60 s) the supervisor gives up:
  the slot is marked ``failed``, logged, and shown so in ``status()``.
* **Incarnations.** A slot keeps its name across restarts; ``incarnation`` counts the processes
  it has run. Each incarnation is registered as a fresh replica under the same name: health
  state, ejections and reported models belong to the process that died, and a new process must
  prove itself with a passing check, as an instance that replaced another does behind an ALB.
* **Stop.** ``stop()`` (all) and ``stop_slot(name)`` (one, for scale-down) ask the listener to
  drain the slot (no new traffic, in-flight requests finish within the pool's deregistration
  delay), then send SIGTERM to the process group, and SIGKILL after ``stop_timeout`` seconds. A
  stopped slot is not restarted until ``start_slot(name)``.
* **No orphans.** Children get ``PR_SET_PDEATHSIG = SIGKILL`` so the kernel kills them when
  Fortress dies, even by SIGKILL; an ``atexit`` hook kills the groups still alive on a normal
  interpreter exit. Note that Linux delivers the death signal when the *thread* that forked the
  child exits, so processes are always spawned from the event loop's thread, never from a pool.

Blocking work stays off the event loop: one daemon thread per process copies its output into
the log, one waits for its exit; the loop only sees the exit (``call_soon_threadsafe``). The
supervisor has no console of its own: whoever shows progress reads ``slots`` (``snapshot()``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import logging
import logging.handlers
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from fortress.config import LocalOptions, LocalReplicaConfig, Tier
from fortress.engines import Engine, EngineError, Launch, engine_for
from fortress.routing.pool import PlannedSlot, Pool

log = logging.getLogger("fortress.supervisor")


class SupervisorError(RuntimeError):
    """The supervisor cannot do what it was asked (bad replica config, nothing started)."""


# -- restart policy ----------------------------------------------------------------------


class RestartPolicy:
    """When to restart a crashed process and when to give up. Pure logic with an injected clock.

    * The delay before a restart is ``backoff_initial * 2**n`` capped at ``backoff_max``, where
      ``n`` counts the crashes since the process last ran for at least ``stable_after`` seconds
      (a process that ran fine for a while starts over at the short delay).
    * ``max_crashes`` crashes within ``window`` seconds mean the process cannot run here: the
      policy gives up (``crashed`` returns None) and stays ``failed``.
    """

    def __init__(
        self,
        backoff_initial: float = 1.0,
        backoff_max: float = 30.0,
        max_crashes: int = 5,
        window: float = 60.0,
        stable_after: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if backoff_initial < 0 or backoff_max < backoff_initial:
            raise ValueError("need 0 <= backoff_initial <= backoff_max")
        if max_crashes < 1 or window <= 0:
            raise ValueError("need max_crashes >= 1 and window > 0")
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.max_crashes = max_crashes
        self.window = window
        self.stable_after = window if stable_after is None else stable_after
        self.clock = clock
        self.failed = False
        self._crashes: deque[float] = deque()
        self._streak = 0
        self._started_at: float | None = None

    @classmethod
    def from_config(cls, opts: LocalOptions, clock: Callable[[], float] = time.monotonic) -> RestartPolicy:
        """The policy a local replica's (already validated) options ask for."""
        return cls(
            backoff_initial=opts.backoff_initial,
            backoff_max=opts.backoff_max,
            max_crashes=opts.max_crashes,
            window=opts.crash_window,
            stable_after=opts.stable_after,
            clock=clock,
        )

    @property
    def recent_crashes(self) -> int:
        """Crashes within the window, as of now."""
        self._prune(self.clock())
        return len(self._crashes)

    def started(self) -> None:
        """A process was (re)started now."""
        self._started_at = self.clock()

    def crashed(self) -> float | None:
        """The process ended on its own now: seconds to wait before restarting it, or None to
        give up (too many crashes within the window)."""
        now = self.clock()
        if self._started_at is not None and now - self._started_at >= self.stable_after:
            self._streak = 0
        self._started_at = None
        self._crashes.append(now)
        self._prune(now)
        if len(self._crashes) >= self.max_crashes:
            self.failed = True
            return None
        delay = min(self.backoff_initial * (2**self._streak), self.backoff_max)
        self._streak += 1
        return delay

    def _prune(self, now: float) -> None:
        while self._crashes and self._crashes[0] <= now - self.window:
            self._crashes.popleft()


# -- process plumbing ----------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
# Process groups started by any supervisor in this interpreter and not yet reaped: killed by the
# atexit hook, so a crashing Fortress does not leave model servers holding GPUs or ports.
_LIVE_GROUPS: set[int] = set()
_atexit_installed = False


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking the kernel to SIGKILL the child when its parent dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    parent = os.getpid()

    def setup() -> None:  # runs in the child between fork and exec: keep it tiny
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return setup


def kill_all_now() -> None:
    """SIGKILL every process group this interpreter's supervisors started (atexit, force quit)."""
    for pgid in list(_LIVE_GROUPS):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        _LIVE_GROUPS.discard(pgid)


def _install_atexit() -> None:
    global _atexit_installed
    if not _atexit_installed:
        atexit.register(kill_all_now)
        _atexit_installed = True


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class ProcState(StrEnum):
    STARTING = "starting"  # spawned, waiting for its health check to answer 200
    RUNNING = "running"  # ready and registered with the router
    BACKOFF = "backoff"  # crashed; restarting after a delay
    FAILED = "failed"  # too many crashes: given up
    STOPPING = "stopping"
    STOPPED = "stopped"


@dataclass(eq=False)
class Slot:
    """One supervised process slot: the same name across restarts, a new process each time."""

    name: str
    pool: Pool
    config: LocalReplicaConfig
    engine: Engine
    policy: RestartPolicy
    log_path: Path
    port: int = 0
    state: ProcState = ProcState.STARTING
    detail: str = "not started"
    proc: subprocess.Popen[bytes] | None = None
    incarnation: int = 0  # processes started so far (the current one's number)
    ready: bool = False  # the current process answered its health check
    restarts: int = 0
    exit_codes: deque[int] = field(default_factory=lambda: deque(maxlen=10))
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    started_at: float | None = None  # wall clock of the current process's start
    ready_at: float | None = None  # wall clock of the first readiness
    failed_at: float | None = None  # monotonic time the restart policy gave up
    asleep: bool = False  # not started with the others: the fleet starts it when needed
    first_ready: asyncio.Event = field(default_factory=asyncio.Event)  # ready once, or failed
    stopping: asyncio.Event = field(default_factory=asyncio.Event)  # this slot is asked to stop
    exited: asyncio.Future[int] | None = None
    task: asyncio.Task[None] | None = None
    handler: logging.Handler | None = None

    @property
    def tier(self) -> Tier:
        return self.config.tier

    @property
    def stop_timeout(self) -> float:
        return self.config.options.stop_timeout

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def url(self) -> str | None:
        return f"http://127.0.0.1:{self.port}" if self.port else None

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready view of the slot."""
        return {
            "name": self.name,
            "pool": self.pool.name,
            "engine": self.engine.kind,
            "model": self.engine.model,
            "tier": str(self.tier),
            "state": str(self.state),
            "detail": self.detail,
            "pid": self.pid if self.state in (ProcState.STARTING, ProcState.RUNNING) else None,
            "url": self.url,
            "incarnation": self.incarnation,
            "restarts": self.restarts,
            "exit_codes": list(self.exit_codes),
            "replica": self.name if self.ready else None,
            "log": str(self.log_path),
        }


class SlotListener(Protocol):
    """Who hears about a slot's process: the runtime, which keeps the router in step."""

    def slot_ready(self, slot: Slot) -> None:
        """The slot's current process answers its health check at ``slot.url``."""

    def slot_down(self, slot: Slot) -> None:
        """The slot's process is gone (exited or killed): it must get no more traffic."""

    async def slot_drain(self, slot: Slot) -> None:
        """The slot is about to be stopped: let its in-flight requests finish first."""


# -- the supervisor ------------------------------------------------------------------------


class Supervisor:
    """Runs the planned local replica slots on one event loop.

    Building it resolves every slot's engine (engine errors surface here); ``start()`` spawns
    the processes and waits until each is ready or failed; ``stop()`` drains and stops them all,
    ``stop_slot``/``start_slot`` one. In between, crashed processes are restarted according to
    their ``RestartPolicy``.
    """

    def __init__(
        self,
        planned: list[PlannedSlot],
        listener: SlotListener,
        *,
        state_dir: str | Path = ".fortress",
        host: str = "127.0.0.1",
        log_max_bytes: int = 10 * 1024 * 1024,
        log_backups: int = 3,
        poll_interval: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.listener = listener
        self.host = host
        self.log_dir = Path(state_dir) / "logs"
        self.log_max_bytes = log_max_bytes
        self.log_backups = log_backups
        self.poll_interval = poll_interval
        self.clock = clock
        self._stopping = asyncio.Event()
        self._stop_task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        engines: dict[int, Engine] = {}  # one engine per replica config, shared by its slots
        self.slots: list[Slot] = []
        for p in planned:
            engine = engines.get(id(p.config))
            if engine is None:
                engine = engines[id(p.config)] = self._engine(p)
            self.slots.append(
                Slot(
                    name=p.name,
                    pool=p.pool,
                    config=p.config,
                    engine=engine,
                    policy=RestartPolicy.from_config(p.config.options, clock),
                    log_path=self.log_dir / f"{p.name}.log",
                )
            )

    def _engine(self, p: PlannedSlot) -> Engine:
        engine = engine_for(p.config, p.pool.model)
        program = engine.launch(1, self.host).argv[0]
        if shutil.which(program) is None:  # fail now, not after a crash loop of "not found"
            raise EngineError(
                f"{p.config.engine}: {program!r} is not an executable (nor on PATH); install it "
                "or set the replica's options.binary"
            )
        return engine

    def retarget(self, name: str, config: LocalReplicaConfig) -> None:
        """Run ``config`` the next time the (stopped) slot ``name`` starts: a rolling update's
        new version. Engine errors (a missing binary, a bad model path) surface here."""
        slot = self.slot(name)
        if slot.task is not None and not slot.task.done():
            raise SupervisorError(f"{name} is running: stop it before changing what it runs")
        engine = self._engine(PlannedSlot(name, slot.pool, config))
        slot.config, slot.engine = config, engine
        slot.policy = RestartPolicy.from_config(config.options, self.clock)

    def add_slot(self, name: str, pool: Pool, config: LocalReplicaConfig) -> Slot:
        """A new stopped slot (a rolling update's surge beyond the pool's slots)."""
        if any(s.name == name for s in self.slots):
            raise SupervisorError(f"a slot named {name!r} exists")
        slot = Slot(
            name=name,
            pool=pool,
            config=config,
            engine=self._engine(PlannedSlot(name, pool, config)),
            policy=RestartPolicy.from_config(config.options, self.clock),
            log_path=self.log_dir / f"{name}.log",
            state=ProcState.STOPPED,
            detail="not started",
            asleep=True,
        )
        self.slots.append(slot)
        return slot

    def slot(self, name: str) -> Slot:
        for s in self.slots:
            if s.name == name:
                return s
        raise SupervisorError(f"no local replica slot named {name!r}")

    # -- starting --------------------------------------------------------------------------

    def set_asleep(self, names: frozenset[str]) -> None:
        """Before ``start``: these slots are not started with the rest (the fleet starts them
        when it needs them)."""
        for slot in self.slots:
            if slot.name in names:
                slot.asleep = True
                self._set(slot, ProcState.STOPPED, "asleep: the fleet starts it when needed")

    async def start(self) -> list[Slot]:
        """Start every slot (but those ``set_asleep``) and wait until each is ready or has failed.

        Returns the slots that failed (empty when all are ready). The slots keep running (and
        restarting) until ``stop``.
        """
        started = [slot for slot in self.slots if not slot.asleep]
        for slot in started:
            self._launch(slot)
        await asyncio.gather(*(slot.first_ready.wait() for slot in started))
        return [s for s in started if s.state is ProcState.FAILED]

    async def start_slot(self, name: str) -> bool:
        """Start one stopped (or failed) slot again and wait until it is ready; True when it is."""
        slot = self.slot(name)
        if self._stopping.is_set():
            raise SupervisorError("the supervisor is stopping: no slot starts any more")
        if slot.task is not None and not slot.task.done():
            await slot.first_ready.wait()
            return slot.state is ProcState.RUNNING
        slot.asleep = False
        slot.stopping.clear()
        slot.first_ready.clear()
        slot.policy = RestartPolicy.from_config(slot.config.options, self.clock)
        self._set(slot, ProcState.STARTING, "starting")
        self._launch(slot)
        await slot.first_ready.wait()
        return slot.state is ProcState.RUNNING

    def _launch(self, slot: Slot) -> None:
        _install_atexit()
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True),
                skip_auto_headers=("User-Agent",),
            )
        if slot.task is None or slot.task.done():
            slot.task = asyncio.create_task(self._run(slot), name=f"supervise-{slot.name}")

    async def _run(self, slot: Slot) -> None:
        """One slot's life: spawn, wait ready, register, wait exit, back off, again."""
        try:
            while not slot.stopping.is_set():
                outcome = await self._one_incarnation(slot)
                if slot.stopping.is_set():
                    break
                self._down(slot)
                code = slot.exit_codes[-1] if outcome == "exited" and slot.exit_codes else None
                delay = slot.policy.crashed()
                why = {
                    "exited": f"exited with status {code}",
                    "timeout": f"not ready after {slot.engine.ready_timeout:g}s",
                    "spawn": slot.detail,
                }[outcome]
                if delay is None:
                    slot.failed_at = self.clock()
                    self._set(
                        slot,
                        ProcState.FAILED,
                        f"gave up after {slot.policy.max_crashes} crashes in "
                        f"{slot.policy.window:g}s (last: {why})",
                    )
                    log.error(
                        "replica %s failed: %s; last output:\n%s",
                        slot.name,
                        slot.detail,
                        "\n".join(list(slot.tail)[-15:]),
                    )
                    slot.first_ready.set()
                    return
                slot.restarts += 1
                self._set(slot, ProcState.BACKOFF, f"{why}; restarting in {delay:g}s")
                log.warning("replica %s %s; restart %d in %gs", slot.name, why, slot.restarts, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(slot.stopping.wait(), delay)
        finally:
            slot.first_ready.set()

    async def _one_incarnation(self, slot: Slot) -> str:
        """Run one process until it exits: "exited", "timeout" (never ready) or "spawn"."""
        if not slot.port or not _port_free(self.host, slot.port):
            slot.port = _free_port(self.host)
        launch = slot.engine.launch(slot.port, self.host)
        slot.incarnation += 1
        try:
            self._spawn(slot, launch)
        except OSError as exc:
            self._set(slot, ProcState.STARTING, f"cannot start {launch.argv[0]}: {exc.strerror or exc}")
            slot.policy.started()
            return "spawn"
        slot.policy.started()
        assert slot.exited is not None
        self._set(slot, ProcState.STARTING, f"loading (pid {slot.pid})")
        ready = await self._until_ready(slot, launch)
        if ready is None:  # stopping
            await slot.exited
            return "exited"
        if not ready:
            if slot.exited.done():
                return "exited"
            await self._kill(slot)
            return "timeout"
        slot.ready = True
        self.listener.slot_ready(slot)
        if slot.ready_at is None:
            slot.ready_at = time.time()
        self._set(slot, ProcState.RUNNING, f"ready (pid {slot.pid}), incarnation {slot.incarnation}")
        log.info(
            "replica %s ready at %s (pid %s, incarnation %d)",
            slot.name,
            launch.url,
            slot.pid,
            slot.incarnation,
        )
        slot.first_ready.set()
        await slot.exited
        return "exited"

    async def _until_ready(self, slot: Slot, launch: Launch) -> bool | None:
        """Poll the health URL: True once it answers 200, False on exit or timeout, None when
        the slot is stopping."""
        assert self._session is not None and slot.exited is not None
        deadline = self.clock() + slot.engine.ready_timeout
        timeout = aiohttp.ClientTimeout(total=2.0)
        while self.clock() < deadline:
            if slot.stopping.is_set():
                return None
            if slot.exited.done():
                return False
            try:
                async with self._session.get(launch.health_url, timeout=timeout) as resp:
                    await resp.read()
                    if resp.status == 200:
                        return True
                    slot.detail = f"loading (pid {slot.pid}): health {resp.status}"
            except (aiohttp.ClientError, OSError, TimeoutError):
                pass  # not listening yet
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(slot.exited), self.poll_interval)
        return False

    def _spawn(self, slot: Slot, launch: Launch) -> None:
        """Start the process (on the loop's thread: see the module docstring on PDEATHSIG)."""
        if slot.handler is None:
            slot.log_path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.handlers.RotatingFileHandler(
                slot.log_path, maxBytes=self.log_max_bytes, backupCount=self.log_backups
            )
            handler.setFormatter(logging.Formatter("%(message)s"))
            slot.handler = handler
        _emit(slot, f"=== fortress: starting {' '.join(launch.argv)}")
        proc = subprocess.Popen(
            launch.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **launch.env},
            start_new_session=True,  # own group: Ctrl-C in the terminal does not reach it
            preexec_fn=_die_with_parent(),
            close_fds=True,
        )
        _install_atexit()
        _LIVE_GROUPS.add(proc.pid)
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[int] = loop.create_future()
        slot.proc, slot.exited, slot.started_at = proc, exited, time.time()
        threading.Thread(target=_pump, args=(slot, proc), name=f"log-{slot.name}", daemon=True).start()
        threading.Thread(
            target=_wait, args=(slot, proc, loop, exited), name=f"wait-{slot.name}", daemon=True
        ).start()

    def _down(self, slot: Slot) -> None:
        if slot.ready:
            slot.ready = False
            self.listener.slot_down(slot)

    @staticmethod
    def _set(slot: Slot, state: ProcState, detail: str) -> None:
        slot.state = state
        slot.detail = detail

    # -- stopping --------------------------------------------------------------------------

    async def stop(self) -> None:
        """Drain, then stop every process (SIGTERM, SIGKILL after ``stop_timeout``). Idempotent."""
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._stop_all())
        await asyncio.shield(self._stop_task)

    async def stop_slot(self, name: str) -> None:
        """Drain and stop one slot's process; it stays stopped (scale-down)."""
        slot = self.slot(name)
        slot.stopping.set()
        await self._stop_one(slot)
        if slot.task is not None:
            await asyncio.gather(slot.task, return_exceptions=True)

    async def _stop_all(self) -> None:
        self._stopping.set()
        for s in self.slots:  # each slot's loop watches only its own flag
            s.stopping.set()
        await asyncio.gather(*(self._stop_one(s) for s in self.slots), return_exceptions=True)
        tasks = [s.task for s in self.slots if s.task is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
        for s in self.slots:
            if s.handler is not None:
                s.handler.close()

    async def _stop_one(self, slot: Slot) -> None:
        if slot.state is not ProcState.FAILED:
            self._set(slot, ProcState.STOPPING, "draining")
        if slot.ready:
            await self.listener.slot_drain(slot)
            self._down(slot)
        await self._terminate(slot)
        if slot.state is not ProcState.FAILED:
            self._set(slot, ProcState.STOPPED, "stopped")

    async def _terminate(self, slot: Slot) -> None:
        proc, exited = slot.proc, slot.exited
        if proc is None or exited is None:
            return
        if not exited.done():
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(exited), slot.stop_timeout)
            except TimeoutError:
                log.warning("replica %s ignored SIGTERM for %gs: SIGKILL", slot.name, slot.stop_timeout)
        await self._kill(slot)

    async def _kill(self, slot: Slot) -> None:
        """SIGKILL the process group (what is left of it) and wait for the exit."""
        if slot.proc is None or slot.exited is None:
            return
        _signal_group(slot.proc.pid, signal.SIGKILL)
        await asyncio.shield(slot.exited)
        _LIVE_GROUPS.discard(slot.proc.pid)

    # -- status ----------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """One JSON-ready row per supervised process slot."""
        return [s.snapshot() for s in self.slots]

    def stats(self) -> dict[str, Any]:
        """For observe, read at scrape and evaluation time: restarts after a crash (all slots,
        a counter) and the slots' rows (which are down, each one's restarts)."""
        return {
            "replica_restarts_total": sum(s.restarts for s in self.slots),
            "local_slots": self.status(),
        }


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _emit(slot: Slot, line: str) -> None:
    slot.tail.append(line)
    if slot.handler is not None:
        slot.handler.handle(logging.makeLogRecord({"msg": line, "levelno": logging.INFO}))


def _pump(slot: Slot, proc: subprocess.Popen[bytes]) -> None:
    """Copy the child's output into its rotating log (a thread: never on the event loop)."""
    assert proc.stdout is not None
    with proc.stdout:
        for raw in proc.stdout:
            _emit(slot, raw.decode("utf-8", "replace").rstrip("\n"))


def _wait(
    slot: Slot,
    proc: subprocess.Popen[bytes],
    loop: asyncio.AbstractEventLoop,
    fut: asyncio.Future[int],
) -> None:
    """Wait for the child's exit in a thread and hand the status to the loop."""
    code = proc.wait()
    _emit(slot, f"=== fortress: pid {proc.pid} exited with status {code}")

    def done() -> None:
        slot.exit_codes.append(code)
        # The leader is gone; kill what may be left of its group (workers of a vLLM server).
        _signal_group(proc.pid, signal.SIGKILL)
        _LIVE_GROUPS.discard(proc.pid)
        if not fut.done():
            fut.set_result(code)

    with contextlib.suppress(RuntimeError):  # the loop is already closed
        loop.call_soon_threadsafe(done)
