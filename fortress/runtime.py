"""The one composition root: builds every part of a running Fortress, starts and stops them.

``Runtime(config, config_path=...)`` builds, in this order and without I/O: the router (pools, stable replica
names), the health checker, the outlier detector, engine load, the access and audit layers,
observability, the relay, the gateway, and the supervisor of local replicas. Nothing is wired
after construction. ``start()`` starts them (audit, access, relay, health, load, observe) and
freezes what lives for the whole process out of the garbage collector; ``start_replicas()``
runs the local processes; ``stop()`` stops everything in reverse. ``serve()`` is the life of a
``fortress serve`` or ``fortress up`` process: signals, start, replicas, uvicorn, stop.

SIGHUP reloads (``reload``): the access-log file is reopened (logrotate), and the config file
the process was started with is read again and, when valid, applied: pools and their replicas
(``Router.reconcile``), usage plans, an immediate key-cache resync, the log level and format.
What only a restart can change is named in one warning; an invalid file changes nothing.

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
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import orjson
import uvicorn

from fortress.audit.journal import load_gateway_id
from fortress.config import ConfigError, FortressConfig, LocalReplicaConfig, load_config
from fortress.core.asgi import Send, respond_error
from fortress.core.errors import GatewayError
from fortress.core.layers import AccessLayer, AuditLayer
from fortress.fleet.controller import Fleet
from fortress.fleet.instances import FleetStore
from fortress.fleet.supervisor import Slot, Supervisor, kill_all_now
from fortress.gateway.admin import ReplicaAdmin
from fortress.gateway.app import Gateway
from fortress.gateway.protocol import ConnectionLimits, ConnectionStats, guarded_protocol
from fortress.gateway.relay import Relay
from fortress.observe.observability import Observability
from fortress.routing.health import HealthChecker
from fortress.routing.load import EngineLoad
from fortress.routing.outlier import OutlierDetector
from fortress.routing.pool import NamingError, Router, layout
from fortress.routing.replica import Origin, OriginKind
from fortress.store.db import database_url

if TYPE_CHECKING:
    from fortress.access.layer import AccessControl
    from fortress.access.shared_limits import SharedLimitTable
    from fortress.observe.shared import MetricsBoard

KEY_RESYNC_TIMEOUT = 10.0  # seconds a reload waits for the key store
WORKER_READY_WAIT = 5.0  # seconds a gateway worker waits for healthy replicas before it accepts
DUPLICATE_SIGNAL = 1.0  # seconds within which a worker takes a second SIGTERM/SIGINT as the first

# Allocations between two collections of the youngest generation (Python's default: 700).
# Every collection walks the objects of the requests in flight, so at Python's default the
# collector ran every few requests: 3 % of the event loop's CPU (perf); see _freeze.
GC_YOUNG = 10_000

log = logging.getLogger("fortress.runtime")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Shows progress while local replicas load: called with the supervisor and the awaitable that
# finishes when every slot is ready or failed; returns once that awaitable is done.
StartWatcher = Callable[[Supervisor, Awaitable[list[Slot]]], Awaitable[list[Slot]]]
# Called once the gateway listens and every model has a healthy replica (or after a minute).
OnReady = Callable[["Runtime", str], Awaitable[None]]


class StartError(RuntimeError):
    """Fortress cannot start as configured; the message says why."""


# What a reload applies; any other difference needs a restart (named in one warning).
RELOADABLE = {"pools", "plans", "server.log_level", "server.log_format"}


def restart_only_changes(old: FortressConfig, new: FortressConfig) -> list[str]:
    """The settings (``section.key``) that differ between ``old`` and ``new`` and that a reload
    does not apply: the listener, state_dir, the database, audit, timeouts, observe, ..."""
    a, b = old.model_dump(), new.model_dump()
    out = []
    for section in a.keys() | b.keys():
        x, y = a.get(section), b.get(section)
        if x == y or section in RELOADABLE:
            continue
        if isinstance(x, dict) and isinstance(y, dict):
            for key in x.keys() | y.keys():
                name = f"{section}.{key}"
                if x.get(key) != y.get(key) and name not in RELOADABLE:
                    out.append(name)
        else:
            out.append(section)
    return sorted(out)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (Unix seconds), ``level``, ``logger``, ``message``,
    ``worker`` (its index, with ``server.workers`` > 1), and ``exc_info`` (the formatted
    traceback) when there is one."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            doc["worker"] = self.worker
        if record.exc_info:
            doc["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc_info"] = record.exc_text
        if record.stack_info:
            doc["stack_info"] = self.formatStack(record.stack_info)
        return orjson.dumps(doc, default=str).decode()


def setup_logging(config: FortressConfig, worker: int | None = None) -> None:
    """Operational logs (Fortress's, uvicorn's, Python warnings) on stderr at
    ``server.log_level``, in one format: ``server.log_format`` text or json; a gateway worker
    (``worker``: its index) tags its lines. Called again (a reload) it replaces the handler it
    installed, leaving any other handler alone."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_fortress", False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    text = LOG_FORMAT if worker is None else LOG_FORMAT.replace("%(name)s", f"%(name)s[w{worker}]")
    handler.setFormatter(
        JsonFormatter(worker) if config.server.log_format == "json" else logging.Formatter(text)
    )
    handler._fortress = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(config.server.log_level.upper())
    # uvicorn's loggers keep no handlers of their own (uvicorn.Config(log_config=None)): their
    # records reach the handler above like every other.
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.captureWarnings(True)


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


class WorkerReplicaAdmin(ReplicaAdmin):
    """``/admin/replicas`` in a gateway worker: each worker has its own router, so adding or
    draining a replica through one would change a single worker's table. Refused (409), with
    the way that reaches every worker: the config file and SIGHUP."""

    async def handle(self, method: str, path: str, body: bytes, send: Send) -> bool:
        changes = (path == "/admin/replicas" and method == "POST") or (
            path.startswith("/admin/replicas/") and method == "DELETE"
        )
        if not changes:
            return await super().handle(method, path, body, send)
        await respond_error(
            send,
            GatewayError(
                409,
                "This gateway runs several workers (server.workers), each with its own replica table: "
                "add or remove replicas in the config file and send SIGHUP to the gateway (every "
                "worker reloads it).",
                "invalid_request_error",
                "not_supported_with_workers",
            ),
        )
        return True


class Runtime:
    """Every part of one Fortress process, built from one ``FortressConfig``.

    ``config_path`` is the file ``config`` was read from, read again on SIGHUP (without one a
    SIGHUP only reopens the access-log file); ``overrides`` is applied to every config read
    from it, as it was to ``config`` (command-line options such as ``--port`` or ``--replica``).

    A gateway worker (``server.workers`` > 1, ``fortress.workers``) is given its ``worker``
    index, the machine's ``limit_table`` (usage plans shared by the workers when
    ``limits.backend`` is memory) and ``metrics_board`` (``/metrics`` summed over the workers);
    ``config`` is then the worker's own (``fortress.workers.worker_config``).
    """

    def __init__(
        self,
        config: FortressConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        config_path: str | Path | None = None,
        overrides: Callable[[FortressConfig], FortressConfig] | None = None,
        worker: int | None = None,
        limit_table: SharedLimitTable | None = None,
        metrics_board: MetricsBoard | None = None,
    ) -> None:
        self.config = config
        self.worker = worker
        self.config_path = Path(config_path) if config_path is not None else None
        self.overrides = overrides
        self._reload_lock = asyncio.Lock()
        self.router = Router(config, clock=clock)
        self.health = HealthChecker(self.router)
        self.outlier = OutlierDetector(self.router, self.router.clock, on_eject=self.health.poke)
        self.load = EngineLoad(self.router.all_replicas, config.routing.engine_metrics_interval)
        self.access: AccessLayer | None = None
        self.audit: AuditLayer | None = None
        if config.auth.enabled:
            if limit_table is not None and worker is not None and config.limits.backend == "memory":
                # One plan per key across the workers of this machine, not one per worker.
                from fortress.access.layer import AccessControl
                from fortress.access.shared_limits import SharedLimiter

                self.access = AccessControl(config, limiter=SharedLimiter(limit_table, worker))
            else:
                from fortress.access.layer import build_access

                self.access = build_access(config)
        if config.audit.enabled:
            from fortress.audit.layer import build_audit

            self.audit = build_audit(config)
        # What the connection guard (gateway.protocol) counts: open, refused, timed out.
        self.connections = ConnectionStats()
        self.observe: Observability | None = None
        self.fleet: Fleet | None = None  # built below, read by observe when it asks
        if config.observe.enabled:
            stats = [layer.stats for layer in (self.audit, self.access) if layer is not None]
            # The supervisor is built below: a lambda reads it when observe asks.
            slots = lambda: self.supervisor.stats() if self.supervisor is not None else {}  # noqa: E731
            fleet = lambda: self.fleet.stats() if self.fleet is not None else {}  # noqa: E731
            peers = None
            if metrics_board is not None and worker is not None:
                from fortress.observe.shared import WorkerMetrics

                peers = WorkerMetrics(metrics_board, worker)
            self.observe = Observability(
                config, self.router, stats=[*stats, self.connections.snapshot, slots, fleet], workers=peers
            )
        # Local replica processes (engine: llamacpp | vllm | sim); engine errors surface here.
        self.supervisor: Supervisor | None = None
        if self.router.planned:
            self.supervisor = Supervisor(self.router.planned, self, state_dir=config.state_dir)
        # Pools with `fleet:`: their size follows load and schedules, and they sleep at zero.
        if any(p.config.fleet is not None for p in self.router.pools):
            evaluator = self.observe.evaluator if self.observe is not None else None
            self.fleet = Fleet(
                config,
                self.router,
                self.supervisor,
                templates=self._template,
                alarms=evaluator.states if evaluator is not None else None,
                # Instances and decisions persisted in the database (SQLite or PostgreSQL).
                store=FleetStore(database_url(config), load_gateway_id(config.state_dir)),
            )
        self.relay = Relay(
            config,
            self.router,
            self.outlier,
            finish=self.audit.record if self.audit is not None else None,
            capacity=self.fleet,
        )
        self.gateway = Gateway(
            config,
            self.router,
            self.relay,
            access=self.access,
            audit=self.audit,
            observers=self.observe.observers if self.observe is not None else (),
            routes=self.observe.routes if self.observe is not None else None,
            replica_admin=(ReplicaAdmin if worker is None else WorkerReplicaAdmin)(
                self.router, self.supervisor.status if self.supervisor is not None else None
            ),
            capacity=self.fleet,
            worker=worker,
        )
        self.server: uvicorn.Server | None = None
        self._running: list[Any] = []  # started parts, in start order

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the layers and the checkers (not the local replicas). On failure, what did
        start is stopped again before the error propagates."""
        if self.observe is not None and self.observe.access_log is not None:
            try:
                self.observe.access_log.open()
            except OSError as exc:
                raise StartError(f"cannot open the access log: {exc}") from None
        # The WebSocket endpoint last: it stops first, writing its registry's last rows.
        parts: list[Any] = [
            self.audit, self.access, self.relay, self.health, self.load, self.observe, self.gateway.websocket
        ]  # fmt: skip
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
        """Start the local replica processes (a fleet's pool: its minimum), then the fleet's
        control loops; returns the slots that failed."""
        failed: list[Slot] = []
        if self.supervisor is not None:
            self._running.append(self.supervisor)
            if self.fleet is not None:
                self.supervisor.set_asleep(self.fleet.asleep_slots())
            started = self.supervisor.start()
            failed = await (watch(self.supervisor, started) if watch is not None else started)
        # A fleet without local replicas (provider aws under `fortress serve`) starts all the same.
        if self.fleet is not None:
            await self.fleet.start()
            self._running.append(self.fleet)
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
        # full passes (a gen-2 collection measured 16 ms before, 2 ms after). From now on the
        # youngest generation is collected every GC_YOUNG allocations net of frees: requests
        # free nearly all they allocate, so it runs when something really accumulates.
        gc.collect()
        gc.freeze()
        gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])

    # -- reload ------------------------------------------------------------------------------

    async def reload(self) -> bool:
        """What SIGHUP does: reopen the access-log file, then read the config file again and
        apply what can change at run time. Returns True when a new config was applied.

        In-flight requests are not touched: replicas that leave drain first. An unreadable or
        invalid config (or one whose names clash with replicas added at run time) is reported
        in one ERROR line and changes nothing.
        """
        self._reopen_logs()  # never behind a slow reload: logrotate's SIGHUP must not wait
        async with self._reload_lock:
            path = self.config_path
            if path is None:
                log.warning("reload: no config file to read (started without -c); access log reopened")
                return False
            try:
                new = await asyncio.to_thread(load_config, path)
                if self.overrides is not None:
                    new = self.overrides(new)
                old = self.config
                applied = old.replace(
                    pools=new.pools,
                    plans=new.plans,
                    server=old.server.replace(
                        log_level=new.server.log_level, log_format=new.server.log_format
                    ),
                )
                reconciled = self.router.reconcile(applied)
            except (ConfigError, NamingError, ValueError) as exc:
                log.error("reload of %s failed, nothing changed: %s", path, "; ".join(str(exc).splitlines()))
                return False
            except Exception:  # a bug, not a bad file: say so with the traceback
                log.exception("reload of %s failed", path)
                return False
            self.config = applied
            try:
                await self._apply_rest(old, new, applied, reconciled, path)
            except Exception:  # the router changed already: say what failed after it
                log.exception("reload of %s: the pools were applied, the rest failed", path)
            return True

    async def _apply_rest(
        self, old: FortressConfig, new: FortressConfig, applied: FortressConfig, reconciled: Any, path: Path
    ) -> None:
        """The parts of a reload after the router's: checks, plans, keys, logs, the summary."""
        for replica in reconciled.rechecked:
            self.health.poke(replica)
        parts = reconciled.summary()
        if self.access is not None:
            access = cast("AccessControl", self.access)  # built by build_access
            plans = access.reload_plans(applied.plans)
            if plans:
                parts.append(f"plans changed: {', '.join(plans)}")
            try:
                # Bounded: a store that does not answer must not hold the reload lock.
                await asyncio.wait_for(access.resync_keys(), KEY_RESYNC_TIMEOUT)
                parts.append(f"keys resynced ({access.cache.size} active)")
            except Exception as exc:  # the cache keeps its keys and retries on its own
                parts.append(f"keys not resynced ({type(exc).__name__}: the store did not answer)")
        if (new.server.log_level, new.server.log_format) != (old.server.log_level, old.server.log_format):
            setup_logging(applied, self.worker)
            parts.append(f"logs: {new.server.log_level}, {new.server.log_format}")
        restart = restart_only_changes(old, new)
        if reconciled.local_changed:
            restart.append(f"local replicas of {', '.join(reconciled.local_changed)}")
        if restart:
            log.warning("reload: a restart is needed to apply: %s (ignored until then)", ", ".join(restart))
        log.info("reloaded %s: %s", path, "; ".join(parts) or "no changes")

    def _reopen_logs(self) -> None:
        if self.observe is None or self.observe.access_log is None:
            return
        try:
            reopened = self.observe.access_log.reopen()
        except OSError as exc:
            log.error("cannot reopen the access log, still writing to the old file: %s", exc)
            return
        if reopened:
            log.info("access log reopened: %s", ", ".join(reopened))

    def _template(self, pool: str) -> LocalReplicaConfig | None:
        """The pool's local replica as the config file says now (a roll's new version); None
        without a file. Blocking: the fleet calls it in a thread."""
        if self.config_path is None:
            return None
        new = load_config(self.config_path)
        if self.overrides is not None:
            new = self.overrides(new)
        for _, pc, members in layout(new.pools):
            for _, rc in members:
                if isinstance(rc, LocalReplicaConfig) and (pc.name or pc.model) == pool:
                    return rc
        raise ValueError(f"the config file has no local replica for pool {pool!r} any more")

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
            log_config=None,  # one format for every log: setup_logging's handler on the root
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
        on_started: Callable[[], None] | None = None,
    ) -> int:
        """Run until SIGINT/SIGTERM: start, run the local replicas, serve, stop. Returns the exit
        status (1 when every local replica failed to start). ``on_started`` is called once the
        parts and replicas have started, right before uvicorn serves (a worker tells its master).

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
        first_signal = 0.0

        def on_signal(sig: signal.Signals) -> None:
            nonlocal signals, first_signal
            now = time.monotonic()
            if self.worker is not None and signals and now - first_signal < DUPLICATE_SIGNAL:
                # The same stop twice: systemd signals every process of the unit, and the
                # master sends its own on. Only a later one means "now".
                return
            signals += 1
            first_signal = first_signal or now
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

        reloads: set[asyncio.Task[bool]] = set()
        hup_pending = False

        def on_hup() -> None:
            nonlocal hup_pending
            if not serving:  # reload once started: the parts it changes are not all there yet
                hup_pending = True
                return
            task = loop.create_task(self.reload(), name="fortress-reload")
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
        announce: asyncio.Task[None] | None = None
        try:
            try:
                await self.start()
            except Exception as exc:
                log.error("cannot start: %s", exc)
                return 1
            failed = await self.start_replicas(watch)
            started = [s for s in self.supervisor.slots if not s.asleep] if self.supervisor else []
            if started and len(failed) == len(started):
                for slot in failed:
                    log.error("%s failed: %s; log: %s", slot.name, slot.detail, slot.log_path)
                    log.error("last output of %s:\n%s", slot.name, "\n".join(list(slot.tail)[-20:]))
                return 1
            if self.worker is not None:
                await self._until_ready(WORKER_READY_WAIT)
            serving = True
            if on_started is not None:
                on_started()
            if hup_pending:
                on_hup()
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
            for task in list(reloads):
                task.cancel()
            await self.stop()
            sock.close()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def _until_ready(self, limit: float) -> None:
        """Wait (at most ``limit`` seconds) until every model has a healthy replica. A worker
        replacing a dead one waits for its first health checks before it accepts: the other
        workers serve meanwhile, and connections the kernel gives it wait in its queue rather
        than get a 503 from a router that has not checked a replica yet."""
        for _ in range(int(limit / 0.02)):
            if self.router.ready()[0]:
                return
            await asyncio.sleep(0.02)

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
