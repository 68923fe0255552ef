"""The ``fortress`` command. Thin: parse options, call the package, print.

Exit codes are ``fortress.cli.common.ExitCode``: 0 ok, 1 runtime failure, 2 usage or config
error, 3 state dir in use by another gateway, 4 no store yet (read-only commands), 130 Ctrl-C.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from fortress.cli.alarms import alarms_app
from fortress.cli.audit import audit_app
from fortress.cli.common import (
    CONFIG_OPTION,
    JSON_OPTION,
    ExitCode,
    fail,
    find_cli_config,
    load_cli_config,
    out,
    print_json,
    resolve_gateway,
)
from fortress.cli.cost import cost_app
from fortress.cli.deploy import deploy_app
from fortress.cli.fleet import fleet_app
from fortress.cli.keys import keys_app
from fortress.cli.up import hold_state_dir, up
from fortress.cli.workers import WORKERS_OPTION, count_workers, parse_workers, run_workers, with_workers
from fortress.sim.command import sim

app = typer.Typer(
    name="fortress",
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"fortress {version('fortress')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("fortress (not installed)")
        raise typer.Exit()


@app.callback()
def fortress(
    _: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Fortress: an always-on, OpenAI-compatible front door for self-hosted LLMs.

    Every command finds its config the same way: -c FILE, else $FORTRESS_CONFIG, else ./fortress.yaml if it exists, else the built-in defaults; FORTRESS__* environment overrides apply in every case. Exit codes: 0 ok, 1 failure, 2 usage or config error, 3 state dir in use by another gateway, 4 no store yet.

    Example: [bold]fortress up[/bold], then [bold]fortress status[/bold] and [bold]fortress keys list[/bold]
    """  # noqa: E501


app.command("sim")(sim)
app.command("up")(up)
app.add_typer(alarms_app, name="alarms")
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")
app.add_typer(fleet_app, name="fleet")
app.add_typer(cost_app, name="cost")
app.add_typer(deploy_app, name="deploy")


def _flags(
    cfg: Any,
    replicas: list[str],
    secondary: list[str],
    standby: list[str],
    host: str | None,
    port: int | None,
    workers: int | str | None = None,
) -> Any:
    """``cfg`` with serve's command-line replicas, listener and workers: at start, and again on
    every reload of the file (SIGHUP), so a reload keeps them."""
    from fortress.config import ExternalReplicaConfig, PoolConfig, Tier

    extra = (
        [ExternalReplicaConfig(url=u, tier=Tier.PRIMARY) for u in replicas]
        + [ExternalReplicaConfig(url=u, tier=Tier.SECONDARY) for u in secondary]
        + [ExternalReplicaConfig(url=u, tier=Tier.STANDBY) for u in standby]
    )
    if extra:
        pools = list(cfg.pools)
        auto = next((p for p in pools if p.model is None), None)
        if auto is None:
            pools.append(PoolConfig(replicas=extra))
        else:
            pools[pools.index(auto)] = auto.replace(replicas=[*auto.replicas, *extra])
        cfg = cfg.replace(pools=pools)
    if host is not None or port is not None:
        changes = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
        cfg = cfg.replace(server=cfg.server.replace(**changes))
    return with_workers(cfg, workers)


def _load(
    config: Path | None,
    replicas: list[str],
    secondary: list[str],
    standby: list[str],
    host: str | None,
    port: int | None,
    workers: int | str | None = None,
):
    from fortress.config import LocalReplicaConfig

    cfg = load_cli_config(config)
    try:
        cfg = _flags(cfg, replicas, secondary, standby, host, port, workers)
    except ValueError as exc:  # a --replica URL that is not http(s), a port out of range
        fail(str(exc), ExitCode.USAGE)
    # A pool with an aws fleet has no replicas listed: its instances are its replicas.
    if not any(p.replicas or (p.fleet is not None and p.fleet.provider == "aws") for p in cfg.pools):
        fail("no replicas: give a config file (-c fortress.yaml) or --replica URL", ExitCode.USAGE)
    local = [
        f"pools[{i}] ({pool.model or 'any model'}) replicas[{j}]: engine {r.engine}"
        for i, pool in enumerate(cfg.pools)
        for j, r in enumerate(pool.replicas)
        if isinstance(r, LocalReplicaConfig)
    ]
    if local:
        # A replica nobody starts would sit in the config doing nothing: say so instead.
        found, _ = find_cli_config(config)
        fail(
            "`fortress serve` routes to replicas that already run, but the config "
            f"asks for local engines ({'; '.join(local)}). Start them with the gateway: "
            f"fortress up -c {found or 'fortress.yaml'}",
            ExitCode.USAGE,
        )
    return cfg


@app.command()
def serve(
    config: Path | None = CONFIG_OPTION,
    replica: list[str] = typer.Option([], "--replica", help="URL of a primary replica (repeatable)."),
    secondary: list[str] = typer.Option([], "--secondary", help="URL of a hot secondary replica."),
    standby: list[str] = typer.Option([], "--standby", help="URL of a cold standby replica."),
    host: str | None = typer.Option(None, "--host", help="Listen address (default: 127.0.0.1)."),
    port: int | None = typer.Option(None, "--port", "-p", help="Listen port (default: 8080)."),
    workers: str | None = WORKERS_OPTION,
) -> None:
    """Run the gateway in front of replicas that already run.

    With server.workers (default auto: one per usable core) it runs that many gateway processes on the same port, under a master that restarts any that dies; SIGTERM drains them all.

    Example: [bold]fortress serve --replica http://127.0.0.1:8000 --secondary http://10.0.0.2:8000[/bold]

    or, with a config file: [bold]fortress serve -c fortress.yaml[/bold]

    or, with four gateway processes: [bold]fortress serve -c fortress.yaml --workers 4[/bold]
    """  # noqa: E501
    from fortress.routing.pool import NamingError
    from fortress.runtime import Runtime, StartError, bind, setup_logging

    n_workers = parse_workers(workers)
    cfg = _load(config, replica, secondary, standby, host, port, n_workers)
    with hold_state_dir(cfg):  # a second gateway on this state dir stops here (exit 3)
        setup_logging(cfg)
        found, _ = find_cli_config(config)  # what SIGHUP reads again
        count = count_workers(cfg, "serve")
        if count > 1:
            code = run_workers(
                cfg, count, found, lambda c: _flags(c, replica, secondary, standby, host, port, n_workers)
            )
            raise typer.Exit(code)
        try:
            runtime = Runtime(
                cfg,
                config_path=found,
                overrides=lambda c: _flags(c, replica, secondary, standby, host, port, n_workers),
            )
            sock = bind(cfg.server.host, cfg.server.port)
        except (NamingError, StartError) as exc:
            fail(str(exc), ExitCode.USAGE if isinstance(exc, NamingError) else ExitCode.FAILED)
        code = runtime.run(sock)
    raise typer.Exit(code)


@app.command()
def status(
    url: str | None = typer.Option(
        None, "--url", "-u", help="The gateway's base URL (default: http://HOST:PORT of the config's server)."
    ),
    admin_token: str | None = typer.Option(
        None,
        "--admin-token",
        envvar="FORTRESS_ADMIN_TOKEN",
        help="(default: the config's server.admin_token)",
    ),
    config: Path | None = CONFIG_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Show every replica: model, tier, state, in-flight, last check.

    The gateway is the one the config describes (server.host and server.port, FORTRESS__SERVER__PORT included) unless --url names another.

    Example: [bold]fortress status[/bold], or [bold]fortress status --url http://10.0.0.5:8080 --json[/bold]
    """  # noqa: E501
    import time

    from rich.table import Table

    from fortress.cli.common import get_gateway_json

    url, admin_token = resolve_gateway(url, admin_token, config)
    data = get_gateway_json(url, "/admin/replicas", admin_token)
    # Open WebSocket connections of every gateway sharing the store (the registry).
    data["connections"] = get_gateway_json(url, "/admin/connections", admin_token)
    if as_json:
        print_json(data)
        return
    console = out()
    table = Table(title=f"Fortress at {url} — {'ready' if data['ready'] else 'NOT READY'}")
    for col in ("model", "replica", "url", "tier", "state", "in-flight", "served", "last check"):
        table.add_column(col)
    colours = {"healthy": "green", "initial": "yellow", "unhealthy": "red", "draining": "magenta"}
    for pool in data["pools"]:
        for r in pool["replicas"]:
            model = pool["model"] or ", ".join(r["models"]) or "?"
            if r["last_check_at"]:
                ago = time.time() - r["last_check_at"]
                result = "ok" if r["last_check_ok"] else "FAIL"
                check = f"{result} {r['last_check_detail']} ({ago:.0f}s ago)"
            else:
                check = "-"
            state = r["state"]
            table.add_row(
                model,
                r["name"],
                r["url"],
                r["tier"],
                f"[{colours.get(state, 'white')}]{state}[/]",
                str(r["in_flight"]),
                str(r["served"]),
                check,
            )
    console.print(table)
    for model, why in (data.get("dormant") or {}).items():
        hint = {"asleep": "a request wakes it", "stopped": "fortress fleet start wakes it"}.get(why, "")
        console.print(f"{escape(model)}: {why}" + (f" ({hint})" if hint else ""))
    procs = data.get("processes")
    if procs:  # replicas `fortress up` started and supervises
        pt = Table(title="Local processes")
        for col in ("process", "engine", "state", "pid", "restarts", "replica", "log"):
            pt.add_column(col)
        pcolours = {"running": "green", "starting": "yellow", "backoff": "red", "failed": "red"}
        for p in procs:
            state = p["state"]
            detail = f" ({p['detail']})" if state != "running" and p.get("detail") else ""
            pt.add_row(
                p["name"],
                p["engine"],
                f"[{pcolours.get(state, 'white')}]{state}[/]{escape(detail)}",
                str(p["pid"] or "-"),
                str(p["restarts"]),
                p["replica"] or "-",
                p["log"],
            )
        console.print(pt)
    conns = data["connections"].get("connections") or []
    if conns:
        ct = Table(title=f"WebSocket connections ({len(conns)})")
        for col in ("connection", "gateway", "client", "key", "user", "source", "open for", "in-flight"):
            ct.add_column(col)
        for c in conns:
            ct.add_row(
                c["id"],
                c.get("gateway") or "-",
                c.get("client") or "-",
                escape(c.get("key_name") or c.get("key_id") or "-"),
                escape(c.get("user") or "-"),
                escape(c.get("source") or "-"),
                f"{time.time() - c['opened_at']:.0f}s",
                str(c.get("in_flight", "-")),  # known to the gateway that holds it
            )
        console.print(ct)


@app.command()
def init(
    path: Path = typer.Argument(Path("fortress.yaml"), help="Where to write the example."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a commented example fortress.yaml.

    Example: [bold]fortress init fortress.yaml[/bold]
    """
    from fortress.config import EXAMPLE_CONFIG, parse_config

    if path.exists() and not force:
        fail(f"{path} exists (use --force to overwrite)")
    parse_config(EXAMPLE_CONFIG, "example", env={})  # the example must always be valid
    path.write_text(EXAMPLE_CONFIG)
    out().print(f"wrote {path}; edit it, then: fortress serve -c {path}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
