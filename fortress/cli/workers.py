"""Running ``fortress serve`` (or ``up``) as several gateway workers: ``server.workers`` > 1.

The CLI is where a worker's runtime is put together (``fortress.workers`` runs processes and
knows nothing of the runtime; the runtime knows nothing of workers but what it is handed).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from fortress.cli.common import ExitCode, fail

log = logging.getLogger("fortress.workers")

WORKERS_OPTION = typer.Option(
    None,
    "--workers",
    "-w",
    help="Gateway processes sharing the port: a number, or auto (the usable cores for serve, "
    "1 for up). Default: server.workers (auto).",
)


def parse_workers(value: str | None) -> int | str | None:
    """``--workers``: None (the config's), ``auto``, or a number >= 1 (else exit 2)."""
    if value is None:
        return None
    v = value.strip().lower()
    if v == "auto":
        return "auto"
    if v.isdigit() and int(v) >= 1:
        return int(v)
    fail(f"--workers must be a number >= 1 or auto, not {value!r}", ExitCode.USAGE)


def with_workers(cfg: Any, workers: int | str | None) -> Any:
    """``cfg`` with ``--workers`` applied (when given)."""
    if workers is None:
        return cfg
    return cfg.replace(server=cfg.server.replace(workers=workers))


def count_workers(cfg: Any, command: str) -> int:
    """``server.workers`` resolved for ``command``; a config that cannot have workers exits 2."""
    from fortress.workers import WorkersError, resolve_workers

    try:
        return resolve_workers(cfg, command)  # type: ignore[arg-type]
    except WorkersError as exc:
        fail(str(exc), ExitCode.USAGE)


def run_workers(
    cfg: Any,
    count: int,
    config_path: Path | None,
    overrides: Callable[[Any], Any] | None,
    worker_kwargs: Callable[[int, Any], dict[str, Any]] | None = None,
) -> int:
    """Run ``count`` gateway workers for ``cfg`` under a master; its exit status.

    ``worker_kwargs(index, socket)`` adds arguments to that worker's ``Runtime.run`` (``up``
    gives worker 0 its banner).
    """
    from fortress.routing.pool import NamingError, Router
    from fortress.runtime import Runtime, setup_logging
    from fortress.store.db import database_url
    from fortress.workers import Master, bind_workers, prepare_worker_state, worker_config

    try:
        Router(cfg)  # names clash: fail here, once, with the usage status
    except NamingError as exc:
        fail(str(exc), ExitCode.USAGE)
    if cfg.auth.enabled and not cfg.auth.secret and not database_url(cfg).startswith("sqlite"):
        # The workers are handed the machine's secret outright, so the access layer's own
        # warning about it stays silent: say it once here.
        log.warning(
            "auth.secret is not set: keys are hashed with %s/secret. Gateways sharing this database "
            "must share that secret (set auth.secret / FORTRESS__AUTH__SECRET on each).",
            cfg.state_dir,
        )
    try:
        prepare_worker_state(cfg, count)
        socks = bind_workers(cfg.server.host, cfg.server.port, count)
    except OSError as exc:
        fail(str(exc), ExitCode.FAILED)

    def run(w: Any) -> int:
        setup_logging(cfg, w.index)

        def own(c: Any) -> Any:
            return worker_config(overrides(c) if overrides is not None else c, w.index)

        runtime = Runtime(
            worker_config(cfg, w.index),
            config_path=config_path,
            overrides=own,
            worker=w.index,
            limit_table=w.limits,
            metrics_board=w.metrics,
        )
        extra = worker_kwargs(w.index, w.sock) if worker_kwargs is not None else {}
        return int(runtime.run(w.sock, on_started=w.ready, **extra))

    # With API keys and the memory backend, the workers share one table of plan usage.
    shared = bool(cfg.auth.enabled and cfg.limits.backend == "memory")
    return Master(count, socks, run, shared_limits=shared).run()
