"""``fortress fleet``: the autoscaled pools of a running gateway: status, scale, stop, start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from fortress.cli.common import (
    CONFIG_OPTION,
    JSON_OPTION,
    ExitCode,
    call_gateway_json,
    fail,
    get_gateway_json,
    out,
    print_json,
    resolve_gateway,
)

fleet_app = typer.Typer(
    help="The fleet: pools whose replica count follows load and schedules (pools with `fleet:`).\n\n"
    "Example: [bold]fortress fleet status[/bold], [bold]fortress fleet scale chat 3[/bold], "
    "[bold]fortress fleet stop chat[/bold], [bold]fortress fleet start chat[/bold], "
    "[bold]fortress fleet roll chat[/bold]",
    no_args_is_help=True,
    rich_markup_mode="rich",
)

URL_OPTION = typer.Option(
    None, "--url", "-u", help="The gateway's base URL (default: http://HOST:PORT of the config's server)."
)
TOKEN_OPTION = typer.Option(
    None, "--admin-token", envvar="FORTRESS_ADMIN_TOKEN", help="(default: the config's server.admin_token)"
)
_COLOURS = {"running": "green", "starting": "yellow", "waking": "yellow", "asleep": "cyan", "stopped": "red"}


@fleet_app.command("status")
def status(
    url: str | None = URL_OPTION,
    admin_token: str | None = TOKEN_OPTION,
    config: Path | None = CONFIG_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Per pool: current/desired/min/max, each instance's state, the last decisions and the next
    scheduled action.

    Example: [bold]fortress fleet status[/bold], or [bold]fortress fleet status --json[/bold]
    """
    url, admin_token = resolve_gateway(url, admin_token, config)
    data = get_gateway_json(url, "/admin/fleet", admin_token)
    if as_json:
        print_json(data)
        return
    if not data["pools"]:
        out().print("no pool has a fleet (add `fleet:` to a pool with one local replica)")
        return
    for pool in data["pools"]:
        _show(pool)


@fleet_app.command("scale")
def scale(
    pool: str = typer.Argument(..., help="The pool's name."),
    replicas: str = typer.Argument(..., help="A count (held until `auto`), or `auto` to hand back."),
    url: str | None = URL_OPTION,
    admin_token: str | None = TOKEN_OPTION,
    config: Path | None = CONFIG_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Hold a pool at N replicas (the autoscaler pauses), or give it back to the autoscaler.

    Example: [bold]fortress fleet scale chat 3[/bold], then [bold]fortress fleet scale chat auto[/bold]
    """
    if replicas == "auto":
        body: dict[str, Any] = {"auto": True}
    elif replicas.isdigit():
        body = {"replicas": int(replicas)}
    else:
        fail(f"replicas must be a count or `auto`, not {replicas!r}", ExitCode.USAGE)
    _post(pool, "scale", body, url, admin_token, config, as_json, timeout=30)


@fleet_app.command("stop")
def stop(
    pool: str = typer.Argument(..., help="The pool's name."),
    timeout: float = typer.Option(300, "--timeout", help="Seconds to wait until nothing of it runs."),
    url: str | None = URL_OPTION,
    admin_token: str | None = TOKEN_OPTION,
    config: Path | None = CONFIG_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Scale a pool to zero and keep it there: drain, stop every replica, confirm nothing runs.
    Requests for it get 503 until `fortress fleet start`.

    Example: [bold]fortress fleet stop chat[/bold]
    """
    _post(pool, "stop", {"timeout": timeout}, url, admin_token, config, as_json, timeout=timeout + 10)


@fleet_app.command("start")
def start(
    pool: str = typer.Argument(..., help="The pool's name."),
    timeout: float = typer.Option(300, "--timeout", help="Seconds to wait for a healthy replica."),
    url: str | None = URL_OPTION,
    admin_token: str | None = TOKEN_OPTION,
    config: Path | None = CONFIG_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Give a pool back to its autoscaler and wake it: returns once a replica is healthy.

    Example: [bold]fortress fleet start chat --timeout 600[/bold]
    """
    _post(pool, "start", {"timeout": timeout}, url, admin_token, config, as_json, timeout=timeout + 10)


@fleet_app.command("roll")
def roll(
    pool: str = typer.Argument(..., help="The pool's name."),
    strategy: str = typer.Option("rolling", "--strategy", help="rolling (one at a time) or blue-green."),
    force: bool = typer.Option(False, "--force", help="Replace replicas that run the new version already."),
    timeout: float = typer.Option(300, "--timeout", help="Seconds each new replica has to become healthy."),
    shift: float = typer.Option(
        0, "--shift", help="blue-green: seconds over which the old replicas drain one at a time."
    ),
    url: str | None = URL_OPTION,
    admin_token: str | None = TOKEN_OPTION,
    config: Path | None = CONFIG_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Move a pool's replicas to what the config file says now (model, engine, flags): one at a
    time, each new one healthy before an old one drains. A new version that does not become
    healthy stops the roll and rolls back; the old replicas serve throughout. Exit 1 then.

    Example: edit the pool's replica options in fortress.yaml, then [bold]fortress fleet roll chat[/bold]
    """
    if strategy not in ("rolling", "blue-green"):
        fail(f"--strategy is rolling or blue-green, not {strategy!r}", ExitCode.USAGE)
    body = {"strategy": strategy, "force": force, "timeout": timeout, "shift": shift}
    _post(pool, "roll", body, url, admin_token, config, as_json, timeout=timeout * 4 + shift + 60)


def _post(
    pool: str,
    action: str,
    body: dict[str, Any],
    url: str | None,
    admin_token: str | None,
    config: Path | None,
    as_json: bool,
    timeout: float,
) -> None:
    url, admin_token = resolve_gateway(url, admin_token, config)
    code, data = call_gateway_json(url, f"/admin/fleet/{pool}/{action}", admin_token, body, timeout)
    if code >= 400 and "error" in data:
        fail(f"{action} {pool}: {data['error']['message']}")
    if as_json:
        print_json(data)
    else:
        _show(data)
    if code == 504:
        what = "something still runs" if action == "stop" else "no replica became healthy"
        fail(f"{action} {pool}: {what} within the timeout")
    if action == "roll" and data.get("roll", {}).get("rolled_back"):
        fail(f"roll {pool}: rolled back: {data['roll']['detail']}")
    if action == "roll" and not as_json:
        out().print(f"roll {pool}: {escape(data['roll']['detail'])}")


def _show(pool: dict[str, Any]) -> None:
    from rich.table import Table

    console = out()
    state = pool["state"]
    bounds = f"min {pool['min']} max {pool['max']}"
    if pool.get("bounds_from"):
        bounds += f" ({pool['bounds_from']})"
    held = f", held at {pool['pinned']}" if pool.get("pinned") is not None else ""
    console.print(
        f"[bold]{escape(pool['pool'])}[/bold] ({escape(pool['model'] or '?')}, {pool['provider']}): "
        f"[{_COLOURS.get(state, 'white')}]{state}[/] — current {pool['current']}, desired "
        f"{pool['desired']}, healthy {pool['healthy']}; {bounds}{held}"
    )
    if pool.get("last_reason"):
        console.print(f"  last evaluation: {escape(pool['last_reason'])}")
    if pool.get("next_scheduled"):
        nxt = pool["next_scheduled"]
        console.print(f"  next scheduled action: {nxt['at']} ({escape(nxt['schedule'])})")
    table = Table(show_header=True, box=None, pad_edge=False)
    for col in ("instance", "state", "capacity", "version", "url", "detail"):
        table.add_column(col)
    for i in pool["instances"]:
        version = i.get("version") or "-"
        table.add_row(i["id"], i["state"], i["capacity"], version, i["url"] or "-", escape(i["detail"] or ""))
    console.print(table)
    if pool["decisions"]:
        console.print("  decisions:")
        for d in pool["decisions"][-5:]:
            console.print(f"    {d['at']}  {d['from']} -> {d['to']}  {d['kind']}: {escape(d['reason'])}")
