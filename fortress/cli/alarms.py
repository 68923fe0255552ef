"""``fortress alarms``: list alarms and their state; export them for other monitoring systems."""

from __future__ import annotations

import json
import time
from enum import StrEnum
from pathlib import Path

import typer

from fortress.cli.common import (
    CONFIG_OPTION,
    JSON_OPTION,
    err_console,
    get_gateway_json,
    load_cli_config,
    out,
    print_json,
    resolve_gateway,
)

alarms_app = typer.Typer(
    help="Alarms: list them with their state, or export them (Prometheus, CloudWatch, Grafana).\n\n"
    "Example: [bold]fortress alarms[/bold] (the gateway of ./fortress.yaml), "
    "[bold]fortress alarms export -f prometheus -o rules.yaml[/bold]",
    invoke_without_command=True,
    no_args_is_help=False,
    rich_markup_mode="rich",
)

_COLOURS = {"ok": "green", "pending": "yellow", "firing": "red", "resolved": "cyan"}


class ExportFormat(StrEnum):
    prometheus = "prometheus"
    cloudwatch = "cloudwatch"
    grafana = "grafana"


URL_OPTION = typer.Option(
    None, "--url", "-u", help="The gateway's base URL (default: http://HOST:PORT of the config's server)."
)
TOKEN_OPTION = typer.Option(
    None, "--admin-token", envvar="FORTRESS_ADMIN_TOKEN", help="(default: the config's server.admin_token)"
)


@alarms_app.callback()
def alarms(
    ctx: typer.Context,
    url: str | None = URL_OPTION,
    admin_token: str | None = TOKEN_OPTION,
    config: Path | None = CONFIG_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Show every alarm of a running gateway with its state and current value (the same as
    `fortress alarms list`).

    Example: [bold]fortress alarms --url http://127.0.0.1:8080[/bold]
    """
    if ctx.invoked_subcommand is None:
        _list(url, admin_token, config, as_json)
    elif ctx.invoked_subcommand == "list":
        ctx.obj = (url, admin_token, config, as_json)  # options given before `list` still count


@alarms_app.command("list")
def list_alarms(
    ctx: typer.Context,
    url: str | None = URL_OPTION,
    admin_token: str | None = TOKEN_OPTION,
    config: Path | None = CONFIG_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Show every alarm of a running gateway with its state and current value.

    Example: [bold]fortress alarms list -c fortress.yaml --json[/bold]
    """
    g_url, g_token, g_config, g_json = ctx.obj or (None, None, None, False)
    _list(url or g_url, admin_token or g_token, config or g_config, as_json or g_json)


def _list(url: str | None, admin_token: str | None, config: Path | None, as_json: bool) -> None:
    from rich.table import Table

    url, admin_token = resolve_gateway(url, admin_token, config)
    data = get_gateway_json(url, "/alarms", admin_token)
    if as_json:
        print_json(data)
        return
    console = out()
    if not data.get("enabled", True):
        console.print("alarms are disabled (observe.alarms.enabled: false)")
        return
    table = Table(title=f"Alarms at {url}")
    for col in ("alarm", "state", "severity", "condition", "value", "since"):
        table.add_column(col)
    now = time.time()
    for a in data["alarms"]:
        unit = a.get("unit") or ""
        cond = f"{a['metric']} {a['op']} {a['threshold']:g}{unit}"
        if a["for_seconds"]:
            cond += f" for {a['for_seconds']:g}s"
        value = "no data" if a["value"] is None else f"{a['value']:.3g}{unit}"
        since = f"{now - a['since']:.0f}s ago" if a.get("since") else "-"
        state = a["state"]
        severity = a["severity"] + (f" → {a['action']}" if a.get("action") not in (None, "notify") else "")
        table.add_row(
            a["name"], f"[{_COLOURS.get(state, 'white')}]{state.upper()}[/]", severity, cond, value, since
        )
    console.print(table)


@alarms_app.command("export")
def export(
    fmt: ExportFormat = typer.Option(ExportFormat.prometheus, "--format", "-f", help="What to write."),
    config: Path | None = CONFIG_OPTION,
    output: Path | None = typer.Option(None, "--output", "-o", help="Write here instead of stdout."),
) -> None:
    """Print the alarm rules as Prometheus alerting rules (YAML) or CloudWatch alarms (JSON), or the dashboard as a Grafana dashboard (JSON).

    Example: [bold]fortress alarms export --format cloudwatch -c fortress.yaml[/bold]
    """  # noqa: E501
    from fortress.observe.grafana import grafana_dashboard
    from fortress.observe.rules_export import cloudwatch_alarms, prometheus_yaml

    cfg = load_cli_config(config)
    if fmt is ExportFormat.prometheus:
        text = prometheus_yaml(cfg)
    elif fmt is ExportFormat.cloudwatch:
        text = json.dumps(cloudwatch_alarms(cfg), indent=2) + "\n"
    else:
        text = json.dumps(grafana_dashboard(), indent=2) + "\n"
    if output is not None:
        output.write_text(text)
        err_console.print(f"wrote {output}")
    else:
        typer.echo(text, nl=False)
