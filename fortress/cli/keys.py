"""``fortress keys``: create, list, show, revoke and rotate API keys, straight in the database.

Uses the same config as the gateway (``-c fortress.yaml``, or defaults plus FORTRESS__*
environment overrides) so that keys are hashed with the same secret and land in the same
database. Gateways pick changes up within ``auth.cache_refresh`` seconds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from fortress.cli.common import CONFIG_OPTION, console, err_console, load_cli_config

keys_app = typer.Typer(
    name="keys",
    help="Manage API keys: create, list, show, revoke, rotate.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


def _store(path: Path | None) -> tuple[Any, Any]:
    from fortress.access.keys import KeyStore
    from fortress.core.secret import load_secret, secret_path
    from fortress.store.db import database_url, migrate

    cfg = load_cli_config(path)
    if not cfg.auth.secret and not secret_path(cfg).exists():
        err_console.print(
            f"[yellow]note:[/yellow] creating a new server secret at {secret_path(cfg).resolve()}; "
            "gateways must use the same state_dir (or set auth.secret) to accept these keys"
        )
    try:
        engine = migrate(database_url(cfg))
    except Exception as exc:
        err_console.print(f"[red]error:[/red] cannot open the database {database_url(cfg)}: {exc}")
        raise typer.Exit(1) from None
    return cfg, KeyStore(engine, load_secret(cfg))


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _show_key_once(key: str) -> None:
    console.print(f"\n  [bold green]{key}[/bold green]\n")
    console.print("[yellow]This is the only time the key is shown. Store it now.[/yellow]")


def _record_table(rec: dict[str, Any], title: str) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("id", rec["id"])
    table.add_row("name", rec["name"])
    table.add_row("prefix", rec["prefix"])
    table.add_row("plan", rec["plan"])
    table.add_row("models", ", ".join(rec["models"]) or "(all)")
    table.add_row("status", rec["status"])
    table.add_row("created", _when(rec["created_at"]))
    if rec["revoked_at"]:
        table.add_row("revoked", _when(rec["revoked_at"]))
    if rec["previous_prefix"]:
        table.add_row(
            "previous key", f"{rec['previous_prefix']} works until {_when(rec['previous_expires_at'])}"
        )
    return table


@keys_app.command("create")
def create(
    name: str = typer.Option(..., "--name", "-n", help="Who or what the key is for."),
    plan: str = typer.Option("default", "--plan", "-p", help="Usage plan (a name under `plans:`)."),
    model: list[str] = typer.Option([], "--model", "-m", help="Allowed model (repeatable; none = all)."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Create a key and print it (once).

    Example: [bold]fortress keys create --name billing-bot --plan default --model smollm2[/bold]
    """
    cfg, store = _store(config)
    if plan not in cfg.plans:
        err_console.print(f"[red]error:[/red] no plan {plan!r}; plans: {', '.join(sorted(cfg.plans))}")
        raise typer.Exit(2)
    key, rec = store.create(name, plan, model)
    console.print(_record_table(rec, "New API key"))
    _show_key_once(key)


@keys_app.command("list")
def list_keys(
    all_: bool = typer.Option(False, "--all", "-a", help="Include revoked keys."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """List keys (prefix, plan, models, status; never the keys themselves).

    Example: [bold]fortress keys list -c fortress.yaml --all[/bold]
    """
    _, store = _store(config)
    rows = store.list(include_revoked=all_)
    table = Table(title=f"API keys ({len(rows)})")
    for col in ("id", "name", "prefix", "plan", "models", "status", "created"):
        table.add_column(col, no_wrap=col in ("id", "prefix"))
    for r in rows:
        status = "[red]revoked[/red]" if r["revoked_at"] else "[green]active[/green]"
        if r["previous_prefix"]:
            status += f" (old {r['previous_prefix']} until {_when(r['previous_expires_at'])})"
        table.add_row(
            r["id"],
            r["name"],
            r["prefix"],
            r["plan"],
            ", ".join(r["models"]) or "(all)",
            status,
            _when(r["created_at"]),
        )
    console.print(table)


@keys_app.command("show")
def show(
    key_id: str = typer.Argument(..., help="The key's id (key_...)."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Show one key with its usage today and this month.

    Usage comes from the limiter: Redis when `limits.backend: redis`; with the in-memory backend
    only the gateway knows it (GET /admin/keys/ID).

    Example: [bold]fortress keys show key_0123456789abcdef[/bold]
    """
    cfg, store = _store(config)
    rec = store.get(key_id)
    if rec is None:
        err_console.print(f"[red]error:[/red] no key {key_id!r}")
        raise typer.Exit(1)
    console.print(_record_table(rec, f"API key {key_id}"))
    usage = _usage(cfg, rec)
    if usage is None:
        console.print("usage: kept in the gateway's memory (limits.backend: memory); see GET /admin/keys/ID")
        return
    table = Table(title="Usage")
    for col in ("", "today", "this month"):
        table.add_column(col)
    for metric in ("requests", "input_tokens", "output_tokens"):
        v = usage.get(metric, {})
        table.add_row(metric.replace("_", " "), str(v.get("day", 0)), str(v.get("month", 0)))
    console.print(table)


def _usage(cfg: Any, rec: dict[str, Any]) -> dict[str, Any] | None:
    if cfg.limits.backend != "redis" or rec["plan"] not in cfg.plans:
        return None
    from fortress.access.plans import Plan
    from fortress.access.redis_limits import RedisLimiter

    async def read() -> dict[str, Any]:
        # A one-off read from a shell may reach a remote Redis: more patience than a request's.
        limiter = RedisLimiter(
            cfg.limits.redis_url, cfg.limits.key_prefix, timeout=max(cfg.limits.timeout, 2.0)
        )
        try:
            return await limiter.usage(rec["id"], Plan.compile(rec["plan"], cfg.plans[rec["plan"]]))
        finally:
            await limiter.stop()

    try:
        return asyncio.run(read())
    except Exception as exc:
        err_console.print(f"[yellow]usage unavailable:[/yellow] {exc}")
        return None


@keys_app.command("revoke")
def revoke(
    key_id: str = typer.Argument(..., help="The key's id (key_...)."),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Revoke a key: every gateway rejects it within auth.cache_refresh seconds.

    Example: [bold]fortress keys revoke key_0123456789abcdef[/bold]
    """
    _, store = _store(config)
    rec = store.revoke(key_id)
    if rec is None:
        err_console.print(f"[red]error:[/red] no key {key_id!r}")
        raise typer.Exit(1)
    console.print(f"revoked {rec['id']} ({rec['name']}, {rec['prefix']})")


@keys_app.command("rotate")
def rotate(
    key_id: str = typer.Argument(..., help="The key's id (key_...)."),
    grace: float | None = typer.Option(
        None, "--grace", help="Seconds the old key keeps working (default: auth.rotation_grace, 24 h)."
    ),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Give a key a new value; the old value keeps working for the grace period.

    Example: [bold]fortress keys rotate key_0123456789abcdef --grace 3600[/bold]
    """
    cfg, store = _store(config)
    if grace is not None and grace < 0:
        err_console.print("[red]error:[/red] --grace must be >= 0")
        raise typer.Exit(2)
    try:
        done = store.rotate(key_id, cfg.auth.rotation_grace if grace is None else grace)
    except ValueError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    if done is None:
        err_console.print(f"[red]error:[/red] no key {key_id!r}")
        raise typer.Exit(1)
    key, rec = done
    console.print(_record_table(rec, f"Rotated {key_id}"))
    _show_key_once(key)
