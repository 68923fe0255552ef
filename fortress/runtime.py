"""The one composition root: builds every part of a running Fortress, starts and stops them.

``Runtime(config)`` builds, in this order and without I/O: the router (pools, stable replica
names), the health checker, the outlier detector, engine load, the access and audit layers,
observability, the relay, the gateway, and the supervisor of local replicas. Nothing is wired
after construction. ``start()`` starts them (audit, access, relay, health, load, observe) and
freezes what lives for the whole process out of the garbage collector; ``start_replicas()``
runs the local processes; ``stop()`` stops everything in reverse. ``serve()`` is the life of a
``fortress serve`` or ``fortress up`` process: signals, start, replicas, uvicorn, stop.

The runtime is also the supervisor's ``SlotListener``: a local process that is ready joins the
router under its slot's name (with its ``incarnation``), one that dies leaves it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

from fortress.config import FortressConfig
from fortress.core.layers import AccessLayer, AuditLayer
from fortress.fleet.supervisor import Slot, Supervisor, kill_all_now
from fortress.gateway.admin import ReplicaAdmin
from fortress.gateway.app import Gateway
from fortress.gateway.protocol import ConnectionLimits, ConnectionStats, guarded_protocol
from fortress.gateway.relay import Relay
from fortress.observe.observability import Observability
from fortress.routing.health import HealthChecker
from fortress.routing.load import EngineLoad
from fortress.routing.outlier import OutlierDetector
from fortress.routing.pool import Router
from fortress.routing.replica import Origin, OriginKind

log = logging.getLogger("fortress.runtime")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Shows progress while local replicas load: called with the supervisor and the awaitable that
# finishes when every slot is ready or failed; returns once that awaitable is done.
StartWatcher = Callable[[Supervisor, Awaitable[list[Slot]]], Awaitable[list[Slot]]]
# Called once the gateway listens and every model has a healthy replica (or after a minute).
OnReady = Callable[["Runtime", str], Awaitable[None]]


class StartError(RuntimeError):
    """Fortress cannot start as configured; the message says why."""


def setup_logging(config: FortressConfig) -> None:
    """Operational logs on stderr at ``server.log_level``."""
    logging.basicConfig(level=config.server.log_level.upper(), format=LOG_FORMAT)


def bind(host: str, port: int) -> socket.socket:
    """The gateway's listening socket, bound now: a busy port fails at once, before any model
    loads. Not inheritable, so replica processes never hold the gateway's port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


class Runtime:
    """Every part of one Fortress process, built from one ``FortressConfig``."""

    def __init__(self, config: FortressConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.router = Router(config, clock=clock)
        self.health = HealthChecker(self.router)
        self.outlier = OutlierDetector(self.router, self.router.clock, on_eject=self.health.poke)
        self.load = EngineLoad(self.router.all_replicas, config.routing.engine_metrics_interval)
        self.access: AccessLayer | None = None
        self.audit: AuditLayer | None = None
        if config.auth.enabled:
            from fortress.access.layer import build_access

            self.access = build_access(config)
        if config.audit.enabled:
            from fortress.audit.layer import build_audit

            self.audit = build_audit(config)
        # What the connection guard (gateway.protocol) counts: open, refused, timed out.
        self.connections = ConnectionStats()
        self.observe: Observability | None = None
        if config.observe.enabled:
            stats = [layer.stats for layer in (self.audit, self.access) if layer is not None]
            # The supervisor is built below: a lambda reads it when observe asks.
            slots = lambda: self.supervisor.stats() if self.supervisor is not None else {}  # noqa: E731
            self.observe = Observability(
                config, self.router, stats=[*stats, self.connections.snapshot, slots]
            )
        # Local replica processes (engine: llamacpp | vllm | sim); engine errors surface here.
        self.supervisor: Supervisor | None = None
        if self.router.planned:
            self.supervisor = Supervisor(self.router.planned, self, state_dir=config.state_dir)
        self.relay = Relay(
            config,
            self.router,
            self.outlier,
            finish=self.audit.record if self.audit is not None else None,
        )
        self.gateway = Gateway(
            config,
            self.router,
            self.relay,
            access=self.access,
            audit=self.audit,
            observers=self.observe.observers if self.observe is not None else (),
            routes=self.observe.routes if self.observe is not None else None,
            replica_admin=ReplicaAdmin(
                self.router, self.supervisor.status if self.supervisor is not None else None
            ),
        )
        self.server: uvicorn.Server | None = None
        self._running: list[Any] = []  # started parts, in start order

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the layers and the checkers (not the local replicas). On failure, what did
        start is stopped again before the error propagates."""
        parts: list[Any] = [self.audit, self.access, self.relay, self.health, self.load, self.observe]
        for part in parts:
            if part is None:
                continue
            try:
                await part.start()
            except BaseException:
                await self.stop()
                raise
            self._running.append(part)
        self._freeze()

    async def start_replicas(self, watch: StartWatcher | None = None) -> list[Slot]:
        """Start the local replica processes; returns the slots that failed."""
        if self.supervisor is None:
            return []
        self._running.append(self.supervisor)
        started = self.supervisor.start()
        failed = await (watch(self.supervisor, started) if watch is not None else started)
        self._freeze()
        return failed

    async def stop(self) -> None:
        """Stop what was started, in reverse: local replicas first (drained while the relay is
        still there), the audit journal last."""
        while self._running:
            part = self._running.pop()
            try:
                await part.stop()
            except Exception:  # stop the rest whatever one part does
                log.exception("stopping %s failed", type(part).__name__)

    @staticmethod
    def _freeze() -> None:
        # Everything built so far lives as long as the process: keep it out of the collector's
        # full passes (a gen-2 collection measured 16 ms before, 2 ms after).
        gc.collect()
        gc.freeze()

    # -- the supervisor's listener -------------------------------------------------------------

    def slot_ready(self, slot: Slot) -> None:
        assert slot.url is not None
        origin = Origin(OriginKind.LOCAL, engine=slot.engine.kind, pid=slot.pid)
        self.router.add_replica(
            slot.pool, slot.url, slot.tier, name=slot.name, origin=origin, incarnation=slot.incarnation
        )

    def slot_down(self, slot: Slot) -> None:
        replica = self.router.replica_named(slot.name)
        if replica is not None:
            self.router.remove_replica(replica)

    async def slot_drain(self, slot: Slot) -> None:
        replica = self.router.replica_named(slot.name)
        if replica is not None:
            await self.router.drain(replica)  # removes it once drained

    # -- serving -----------------------------------------------------------------------------

    def uvicorn_server(self) -> uvicorn.Server:
        """uvicorn (uvloop + httptools) around the gateway, without signal handlers or lifespan
        of its own: the runtime starts and stops the parts and handles signals in both phases.
        Client connections are bounded by ``fortress.gateway.protocol`` (timeouts, header limits,
        the connection cap); X-Forwarded-For counts only from ``server.trusted_proxies``."""
        server = self.config.server
        ucfg = uvicorn.Config(
            self.gateway,
            host=server.host,
            port=server.port,
            loop="uvloop",
            http=guarded_protocol(ConnectionLimits.from_config(server), self.connections),
            lifespan="off",
            access_log=False,
            log_level=server.log_level,
            server_header=False,
            date_header=False,
            proxy_headers=bool(server.trusted_proxies),
            forwarded_allow_ips=list(server.trusted_proxies),
            timeout_keep_alive=server.keepalive_timeout,  # type: ignore[arg-type]  # a float works
            timeout_graceful_shutdown=10,
        )

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Any:
                yield

        return Server(ucfg)

    async def serve(
        self,
        sock: socket.socket,
        *,
        watch: StartWatcher | None = None,
        on_ready: OnReady | None = None,
        url: str = "",
    ) -> int:
        """Run until SIGINT/SIGTERM: start, run the local replicas, serve, stop. Returns the exit
        status (1 when every local replica failed to start).

        A signal while starting cancels the start and stops what runs; while serving it stops
        uvicorn (in-flight requests finish), then everything else. A second signal kills the
        replica processes at once.
        """
        server = self.server = self.uvicorn_server()
        server.config.load()  # before start(): what it builds is frozen out of the GC with the rest
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()
        assert main is not None
        serving = False
        signals = 0

        def on_signal(sig: signal.Signals) -> None:
            nonlocal signals
            signals += 1
            if signals > 1:  # asked twice: do not wait for drains or slow replicas
                log.warning("%s again: killing the replicas now", sig.name)
                kill_all_now()
                server.force_exit = True
                server.should_exit = True
                return
            log.warning("%s: stopping (drain, then stop the replicas)", sig.name)
            if serving:
                server.should_exit = True
            else:
                main.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        announce: asyncio.Task[None] | None = None
        try:
            try:
                await self.start()
            except Exception as exc:
                log.error("cannot start: %s", exc)
                return 1
            failed = await self.start_replicas(watch)
            if self.supervisor is not None and len(failed) == len(self.supervisor.slots):
                for slot in failed:
                    log.error("%s failed: %s; log: %s", slot.name, slot.detail, slot.log_path)
                    log.error("last output of %s:\n%s", slot.name, "\n".join(list(slot.tail)[-20:]))
                return 1
            serving = True
            if on_ready is not None:
                announce = asyncio.create_task(self._announce(server, on_ready, url))
            await server.serve(sockets=[sock])
            return 0
        except asyncio.CancelledError:
            if not signals:
                raise
            main.uncancel()
            return 0
        finally:
            if announce is not None:
                announce.cancel()
            await self.stop()
            sock.close()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def _announce(self, server: uvicorn.Server, on_ready: OnReady, url: str) -> None:
        """Call ``on_ready`` once the gateway listens and every model has a healthy replica (or
        after 60 s, with a warning)."""
        for _ in range(1200):
            if server.started and self.router.ready()[0]:
                break
            await asyncio.sleep(0.05)
        else:
            log.warning("not every model has a healthy replica yet")
        await on_ready(self, url)

    def run(self, sock: socket.socket, **kwargs: Any) -> int:
        """``serve`` on a uvloop event loop; the process's entry point."""
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:  # pragma: no cover - uvicorn[standard] brings it
            factory = asyncio.new_event_loop
        try:
            with asyncio.Runner(loop_factory=factory) as runner:
                return runner.run(self.serve(sock, **kwargs))
        except KeyboardInterrupt:  # a signal before our handlers were installed
            return 130
