"""Run the gateway under uvicorn (uvloop + httptools, one process)."""

from __future__ import annotations

import logging

import uvicorn

from fortress.config import FortressConfig
from fortress.gateway.app import Gateway
from fortress.gateway.layers import build_layers
from fortress.observe import attach
from fortress.routing.pool import Router


def build_gateway(config: FortressConfig, router: Router | None = None) -> Gateway:
    """The gateway with every layer the config asks for: access, audit and observability."""
    access, audit = build_layers(config)
    gateway = Gateway(config, router, access=access, audit=audit)
    if config.observe.enabled:
        attach(gateway, config)  # metrics, alarms, dashboard, access log
    return gateway


def build_server(gateway: Gateway, config: FortressConfig) -> uvicorn.Server:
    """A uvicorn server for ``gateway``; the caller runs ``server.serve()``."""
    ucfg = uvicorn.Config(
        gateway,
        host=config.server.host,
        port=config.server.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level=config.server.log_level,
        server_header=False,
        date_header=False,
        timeout_keep_alive=75,
        timeout_graceful_shutdown=10,
    )
    return uvicorn.Server(ucfg)


def serve(config: FortressConfig) -> None:
    """Serve until interrupted."""
    logging.basicConfig(
        level=config.server.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    server = build_server(build_gateway(config), config)
    server.run()
