"""Several gateway processes on one machine and port: ``server.workers``.

One Python process runs one event loop on one core; ``server.workers: N`` (``auto``: the
usable cores, for ``fortress serve``) runs N whole gateways side by side. The process the
command started becomes the **master**. It does no request work: it binds N listening
sockets to the same address with ``SO_REUSEPORT`` (the kernel spreads new connections over
them), makes what the workers share (the usage-plan table, the metrics board: shared memory
that outlives any one worker), forks the workers, and then only watches them:

* a worker that dies (a crash, ``kill -9``) is forked again with the same index after a short
  backoff (0.5 s, doubling while it keeps dying young, at most 10 s), and the master logs it.
  Worker ``i`` always gets socket ``i``, which the master keeps open: connections the kernel
  queued on it while the worker was down wait for its successor instead of being reset;
* SIGTERM and SIGINT are sent on to every worker, each drains (in-flight requests finish,
  its audit journal ships) and the master exits once all have; a second signal is sent on as
  well (the workers stop at once). SIGHUP is sent on: every worker reloads its config;
* a worker that fails before it ever served (a bad journal directory, a store it cannot
  migrate) stops the whole start with its exit status, as one process would.

Each worker is a whole gateway (router, health checks, relay, access, audit, observe) with a
config of its own (``worker_config``): its own gateway id (the machine's, plus ``-w<i>``) and
audit journal (``<journal_dir>-w<i>``), so each keeps one hash chain, and a worker that
replaces a killed one reopens its journal and ships what it had committed.

What runs once per machine cannot be split yet: local replicas (the supervisor) and the fleet
controller. With them, ``auto`` means one worker and an explicit N > 1 is refused
(``resolve_workers``).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fortress.access.shared_limits import SharedLimitTable
from fortress.audit.journal import load_gateway_id
from fortress.audit.layer import journal_dir
from fortress.config import FortressConfig, LocalReplicaConfig
from fortress.core.secret import load_secret
from fortress.observe.shared import MetricsBoard
from fortress.store.db import database_url

log = logging.getLogger("fortress.workers")

BACKOFF_FIRST = 0.5  # seconds before a dead worker is forked again
BACKOFF_MAX = 10.0
STABLE_AFTER = 10.0  # a worker that lived this long starts the backoff over
_PR_SET_PDEATHSIG = 1


class WorkersError(ValueError):
    """``server.workers`` cannot be honoured with this config; the message says why and what to do."""


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def machine_bound(config: FortressConfig) -> list[str]:
    """The parts of ``config`` that must run once per machine, each named with why."""
    out: list[str] = []
    local = [
        f"{pool.name or pool.model or 'default'} ({r.engine})"
        for pool in config.pools
        for r in pool.replicas
        if isinstance(r, LocalReplicaConfig)
    ]
    if local:
        out.append(f"local replicas ({', '.join(local)}) are supervised by one process per machine")
    fleets = [pool.name or pool.model or "default" for pool in config.pools if pool.fleet is not None]
    if fleets:
        out.append(f"the fleet controller of pool {', '.join(fleets)} runs once per machine")
    return out


def resolve_workers(config: FortressConfig, command: Literal["serve", "up"]) -> int:
    """How many gateway processes ``command`` runs for ``config``.

    ``auto``: the usable cores for ``serve``, 1 for ``up``; 1 (with an INFO line saying why)
    when the config has parts that run once per machine. An explicit N > 1 with such parts
    raises ``WorkersError``.
    """
    wanted = config.server.workers
    bound = machine_bound(config)
    if wanted == "auto":
        n = usable_cores() if command == "serve" else 1
        if n > 1 and bound:
            log.info("server.workers auto: 1 gateway worker, not %d: %s", n, "; ".join(bound))
            return 1
        return n
    if wanted > 1 and bound:
        raise WorkersError(
            f"server.workers is {wanted}, but {'; and '.join(bound)}, which cannot yet be split "
            "across gateway workers. Set server.workers to 1 or auto (FORTRESS__SERVER__WORKERS=1), "
            "or run the replicas apart and list their URLs in a config whose gateway has workers."
        )
    return wanted


def worker_config(config: FortressConfig, index: int) -> FortressConfig:
    """Worker ``index``'s config: ``config`` with a state dir of its own under the machine's
    (``<state_dir>/workers/w<i>``: its gateway id, its key-cache snapshot), its own audit
    journal (``<journal_dir>-w<i>``), and the machine's database and secret named outright
    (so they stay the machine's). Stable across restarts: worker ``i`` always gets the same."""
    state = Path(config.state_dir).expanduser()
    audit = config.audit.replace(journal_dir=f"{journal_dir(config)}-w{index}")
    database = config.database.replace(url=database_url(config))
    auth = config.auth
    if auth.secret is None and (auth.enabled or config.audit.enabled):
        auth = auth.replace(secret=load_secret(config).decode())
    return config.replace(
        state_dir=str(state / "workers" / f"w{index}"), audit=audit, database=database, auth=auth
    )


def prepare_worker_state(config: FortressConfig, count: int) -> None:
    """Create each worker's state dir with its gateway id: the machine's id plus ``-w<i>``
    (kept once written: a worker's chain keeps its id across restarts)."""
    machine = load_gateway_id(config.state_dir)
    for index in range(count):
        directory = Path(config.state_dir).expanduser() / "workers" / f"w{index}"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "gateway_id"
        if not path.exists() or not path.read_text().strip():
            tmp = directory / f".gateway_id.{os.getpid()}"
            tmp.write_text(f"{machine}-w{index}\n")
            tmp.replace(path)


def bind_workers(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` listening sockets on ``host:port`` with ``SO_REUSEPORT`` (port 0: the first
    one's). A port already in use fails here, at once: a plain bind (no ``SO_REUSEPORT``) is
    tried first, so a gateway already listening there is never joined."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        port = probe.getsockname()[1]
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    finally:
        probe.close()
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            sock.listen(2048)
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return socks


@dataclass
class Worker:
    """What worker ``index`` is handed in its process, and what the master knows of it."""

    index: int
    sock: socket.socket
    limits: SharedLimitTable | None
    metrics: MetricsBoard
    pid: int = 0
    started_at: float = 0.0
    served: bool = False  # it reported started once (any incarnation)
    restarts: int = 0
    backoff: float = BACKOFF_FIRST
    due: float | None = None  # when to fork it again
    _ready_w: int = field(default=-1, repr=False)

    def ready(self) -> None:
        """Tell the master this worker serves (called in the worker, once)."""
        if self._ready_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._ready_w, self.index.to_bytes(2, "little"))
            os.close(self._ready_w)
            self._ready_w = -1


RunWorker = Callable[[Worker], int]


class Master:
    """Forks ``count`` workers running ``run`` and keeps them running until told to stop.

    ``sockets`` are the bound listeners (``bind_workers``), one per worker. ``shared_limits``:
    make the usage-plan table the workers share (the memory backend with API keys on).
    """

    def __init__(
        self, count: int, sockets: list[socket.socket], run: RunWorker, *, shared_limits: bool
    ) -> None:
        if count < 2 or len(sockets) != count:
            raise ValueError("a master runs two or more workers, one socket each")
        self.count = count
        self.run_worker = run
        self.limits = SharedLimitTable.create(count) if shared_limits else None
        self.metrics = MetricsBoard.create(count)
        self.workers = [Worker(i, sockets[i], self.limits, self.metrics) for i in range(count)]
        self.stopping = 0  # signals received (SIGTERM/SIGINT)
        self.status = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._ready_r, self._ready_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._pending: list[int] = []  # signals to handle in the loop
        self._pid = os.getpid()

    # -- the master's loop ---------------------------------------------------------------------

    def run(self) -> int:
        """Fork the workers, supervise them, and return the exit status once all have exited."""
        old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)}
        for sig in old:
            signal.signal(sig, self._on_signal)
        old_wakeup = signal.set_wakeup_fd(self._wake_w)
        try:
            log.info("%d gateway workers (master pid %d)", self.count, os.getpid())
            for w in self.workers:
                self._fork(w)
            while any(w.pid for w in self.workers) or (not self.stopping and self._restarts_due()):
                self._step()
            return self.status
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old.items():
                signal.signal(sig, handler)

    def _restarts_due(self) -> bool:
        return any(w.due is not None for w in self.workers)

    def _step(self) -> None:
        now = time.monotonic()
        dues = [w.due for w in self.workers if w.due is not None and not self.stopping]
        timeout = max(0.0, min(dues) - now) if dues else 1.0
        with contextlib.suppress(InterruptedError):
            select.select([self._wake_r, self._ready_r], [], [], timeout)
        with contextlib.suppress(OSError):
            while os.read(self._wake_r, 512):
                pass
        with contextlib.suppress(OSError):
            data = os.read(self._ready_r, 512)  # 2 bytes per worker that serves: its index
            for at in range(0, len(data) - 1, 2):
                w = self.workers[int.from_bytes(data[at : at + 2], "little")]
                if w.pid and not w.served:
                    w.served = True
                    log.debug("worker %d (pid %d) serves", w.index, w.pid)
        pending, self._pending = self._pending, []
        for sig in pending:
            self._handle(sig)
        self._reap()
        now = time.monotonic()
        for w in self.workers:
            if w.due is not None and now >= w.due and not self.stopping:
                w.due = None
                self._fork(w)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._pending.append(signum)  # handled in the loop, never inside a handler

    def _handle(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            return  # _reap follows
        if signum == signal.SIGHUP:
            log.info("SIGHUP: every worker reloads")
            self._send(signal.SIGHUP)
            return
        self.stopping += 1
        name = signal.Signals(signum).name
        if self.stopping == 1:
            log.warning("%s: stopping the workers (each drains)", name)
        else:
            log.warning("%s again: the workers stop now", name)
        for w in self.workers:
            w.due = None
        self._send(signal.Signals(signum))
        self._close_sockets()

    def _close_sockets(self) -> None:
        # No worker is forked again: once the workers close theirs, new connections are refused
        # at once (a load balancer moves on) instead of waiting in a queue nobody accepts from.
        for w in self.workers:
            w.sock.close()

    def _send(self, sig: signal.Signals) -> None:
        for w in self.workers:
            if w.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, sig)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = next((w for w in self.workers if w.pid == pid), None)
            if w is None:
                continue
            w.pid = 0
            self._exited(w, status)

    def _exited(self, w: Worker, status: int) -> None:
        if os.WIFSIGNALED(status):
            how = f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
            code = 128 + os.WTERMSIG(status)
        else:
            code = os.waitstatus_to_exitcode(status)
            how = f"exited {code}"
        if self.stopping:
            log.info("worker %d %s", w.index, how)
            if code and not os.WIFSIGNALED(status):
                self.status = self.status or code
            return
        if not w.served:
            # It never served: its successor would fail the same way. Stop, as one process would.
            log.error("worker %d %s before it served: stopping every worker", w.index, how)
            self.status = code or 1
            self.stopping = 1
            self._send(signal.SIGTERM)
            self._close_sockets()
            return
        lived = time.monotonic() - w.started_at
        if lived >= STABLE_AFTER:  # it had settled: this is a new failure, not a crash loop
            w.backoff = BACKOFF_FIRST
        delay = w.backoff
        w.backoff = min(w.backoff * 2, BACKOFF_MAX)
        w.due = time.monotonic() + delay
        w.restarts += 1
        log.warning(
            "worker %d %s after %.1f s; restarting it in %.1f s (restart %d)",
            w.index,
            how,
            lived,
            delay,
            w.restarts,
        )

    # -- a worker's process --------------------------------------------------------------------

    def _fork(self, w: Worker) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            w.pid = pid
            w.started_at = time.monotonic()
            return
        code = 1
        try:
            self._become_worker(w)
            code = self.run_worker(w)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            log.exception("worker %d failed", w.index)
        finally:
            with contextlib.suppress(Exception):
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _become_worker(self, w: Worker) -> None:
        """In the forked child: its own signals, its own socket, and death with the master."""
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        # A process group of its own: Ctrl-C reaches the master only, which sends it on once.
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
        _die_with_parent(self._pid)
        os.close(self._wake_r)
        os.close(self._wake_w)
        os.close(self._ready_r)
        w._ready_w = self._ready_w
        for other in self.workers:
            if other is not w:
                other.sock.close()


def _die_with_parent(master: int) -> None:
    """SIGTERM this process when the master dies (even by kill -9): it drains and exits."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != master:  # the master died before the call: do not outlive it
        os.kill(os.getpid(), signal.SIGTERM)


__all__ = [
    "Master",
    "Worker",
    "WorkersError",
    "bind_workers",
    "machine_bound",
    "prepare_worker_state",
    "resolve_workers",
    "usable_cores",
    "worker_config",
]
