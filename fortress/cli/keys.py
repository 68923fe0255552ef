"""``fortress keys``: create, list, show, revoke and rotate API keys, straight in the database.

Finds the config as every command does (``-c``, ``$FORTRESS_CONFIG``, ``./fortress.yaml``,
defaults; FORTRESS__* overrides on top) so that keys are hashed with the gateway's secret and
land in its database. Only ``create`` may start a new store; the others need one that exists.
Gateways pick changes up within ``auth.cache_refresh`` seconds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from fortress.cli.common import (
    CONFIG_OPTION,
    JSON_OPTION,
    ExitCode,
    err_console,
    fail,
    load_cli_config,
    open_store,
    out,
    print_json,
)

keys_app = typer.Typer(
    name="keys",
    help="Manage API keys: create, list, show, revoke, rotate.\n\n"
    "Example: [bold]fortress keys create --name billing-bot[/bold], then [bold]fortress keys list[/bold]",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


def _store(path: Path | None, *, create: bool = False, hashes: bool = True) -> tuple[Any, Any]:
    """(config, KeyStore). ``create``: a missing state dir, database and secret are made (only
    ``keys create``); otherwise they must exist. ``hashes=False``: the command never hashes a
    key (list, show, revoke), so a missing secret does not stop it."""
    from fortress.access.keys import KeyStore
    from fortress.core.secret import SecretMissing, load_secret, secret_path

    cfg = load_cli_config(path)
    secret = b""
    if create:
        if not cfg.auth.secret and not secret_path(cfg).exists():
            err_console.print(
                f"[yellow]note:[/yellow] creating a new server secret at {secret_path(cfg).resolve()}; "
                "gateways must use the same state_dir (or set auth.secret) to accept these keys"
            )
        engine = open_store(cfg, create=True)
        secret = load_secret(cfg)
    else:
        engine = open_store(cfg, create=False)
        try:
            secret = load_secret(cfg, create=False)
        except SecretMissing as exc:
            if hashes:  # a key hashed under a new secret would never be accepted
                fail(str(exc), ExitCode.NO_STORE)
    return cfg, KeyStore(engine, secret)


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _show_key_once(key: str) -> None:
    console = out()
    console.print(f"\n  [bold green]{key}[/bold green]\n")
    console.print("[yellow]This is the only time the key is shown. Store it now.[/yellow]")


def _record_json(rec: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    return {"key": key, **rec} if key is not None else dict(rec)


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
    plan: str = typer.Option(
        "default", "--plan", "-p", help="Usage plan (a name under `plans:`; `operator`: no limits)."
    ),
    model: list[str] = typer.Option([], "--model", "-m", help="Allowed model (repeatable; none = all)."),
    config: Path | None = CONFIG_OPTION,
    as_json: bool = typer.Option(
        False, "--json", help="Print the record as JSON, with the plaintext key (once) under `key`."
    ),
) -> None:
    """Create a key and print it (once). The only keys command that creates a store (state dir,
    database, secret) when there is none yet.

    Example: [bold]fortress keys create --name billing-bot --plan default --model smollm2[/bold]
    """
    cfg = load_cli_config(config)
    if plan not in cfg.plans:  # before anything is created
        fail(f"no plan {plan!r}; plans: {', '.join(sorted(cfg.plans))}", ExitCode.USAGE)
    cfg, store = _store(config, create=True)
    key, rec = store.create(name, plan, model)
    if as_json:
        print_json(_record_json(rec, key))
        return
    out().print(_record_table(rec, "New API key"))
    _show_key_once(key)


@keys_app.command("list")
def list_keys(
    all_: bool = typer.Option(False, "--all", "-a", help="Include revoked keys."),
    config: Path | None = CONFIG_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """List keys (prefix, plan, models, status; never the keys themselves).

    Example: [bold]fortress keys list -c fortress.yaml --all[/bold]
    """
    _, store = _store(config, hashes=False)
    rows = store.list(include_revoked=all_)
    if as_json:
        print_json([_record_json(r) for r in rows])
        return
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
    out().print(table)


@keys_app.command("show")
def show(
    key_id: str = typer.Argument(..., help="The key's id (key_...)."),
    config: Path | None = CONFIG_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """Show one key with its usage today and this month.

    Usage comes from the limiter: Redis when `limits.backend: redis`; with the in-memory backend
    only the gateway knows it (GET /admin/keys/ID).

    Example: [bold]fortress keys show key_0123456789abcdef[/bold]
    """
    cfg, store = _store(config, hashes=False)
    rec = store.get(key_id)
    if rec is None:
        fail(f"no key {key_id!r}")
    usage = _usage(cfg, rec)
    if as_json:
        print_json({**_record_json(rec), "usage": usage})
        return
    console = out()
    console.print(_record_table(rec, f"API key {key_id}"))
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
    _, store = _store(config, hashes=False)
    rec = store.revoke(key_id)
    if rec is None:
        fail(f"no key {key_id!r}")
    out().print(f"revoked {rec['id']} ({rec['name']}, {rec['prefix']})")


@keys_app.command("rotate")
def rotate(
    key_id: str = typer.Argument(..., help="The key's id (key_...)."),
    grace: float | None = typer.Option(
        None, "--grace", help="Seconds the old key keeps working (default: auth.rotation_grace, 24 h)."
    ),
    config: Path | None = CONFIG_OPTION,
    as_json: bool = typer.Option(
        False, "--json", help="Print the record as JSON, with the new plaintext key under `key`."
    ),
) -> None:
    """Give a key a new value; the old value keeps working for the grace period.

    Example: [bold]fortress keys rotate key_0123456789abcdef --grace 3600[/bold]
    """
    if grace is not None and grace < 0:
        fail("--grace must be >= 0", ExitCode.USAGE)
    cfg, store = _store(config)
    try:
        done = store.rotate(key_id, cfg.auth.rotation_grace if grace is None else grace)
    except ValueError as exc:
        fail(str(exc))
    if done is None:
        fail(f"no key {key_id!r}")
    key, rec = done
    if as_json:
        print_json(_record_json(rec, key))
        return
    out().print(_record_table(rec, f"Rotated {key_id}"))
    _show_key_once(key)
