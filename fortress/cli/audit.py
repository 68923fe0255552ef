"""``fortress audit``: query, export and verify the audit trail in the store.

Read-only: every command here needs a store that exists (exit 4 otherwise) and creates nothing.
"""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import Any

import typer

from fortress.cli.common import (
    CONFIG_OPTION,
    ExitCode,
    err_console,
    fail,
    load_cli_config,
    open_store,
    out,
)

audit_app = typer.Typer(
    help="Query, export and verify the audit trail (the store named by database.url).\n\n"
    "Example: [bold]fortress audit query --since 1h[/bold], [bold]fortress audit verify[/bold]",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


def _engine(cfg: Any) -> Any:
    return open_store(cfg, create=False)


def _filters(
    since: str | None,
    until: str | None,
    key: str | None,
    user: str | None,
    source: str | None,
    model: str | None,
    status: str | None,
    request_id: str | None,
    gateway: str | None,
) -> Any:
    from fortress.audit.query import Filters, parse_time

    try:
        f = Filters(
            since=parse_time(since) if since else None,
            until=parse_time(until) if until else None,
            key=key,
            user=user,
            source=source,
            model=model,
            status=status,
            request_id=request_id,
            gateway=gateway,
        )
        f.where()  # validates --status
    except ValueError as exc:
        fail(str(exc), ExitCode.USAGE)
    return f


_SINCE = typer.Option(None, "--since", help="From this time: 15m, 2h, 7d, 2025-01-31 or ISO time (UTC).")
_UNTIL = typer.Option(None, "--until", help="Before this time (same forms as --since).")
_KEY = typer.Option(None, "--key", help="API key id or name.")
_USER = typer.Option(None, "--user", help="x-llm-user value.")
_SOURCE = typer.Option(None, "--source", help="x-llm-source value.")
_MODEL = typer.Option(None, "--model", help="Model name the client asked for.")
_STATUS = typer.Option(None, "--status", help="HTTP status (429) or class (4xx, 5xx).")
_REQUEST = typer.Option(None, "--request-id", help="One request's x-request-id.")
_GATEWAY = typer.Option(None, "--gateway", help="Only this gateway id.")


def _n(v: int | None) -> str:
    return "-" if v is None else str(v)


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


@audit_app.command()
def query(
    config: Path | None = CONFIG_OPTION,
    since: str | None = _SINCE,
    until: str | None = _UNTIL,
    key: str | None = _KEY,
    user: str | None = _USER,
    source: str | None = _SOURCE,
    model: str | None = _MODEL,
    status: str | None = _STATUS,
    request_id: str | None = _REQUEST,
    gateway: str | None = _GATEWAY,
    limit: int = typer.Option(50, "--limit", "-n", min=1, help="Newest N records."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show the newest audit records matching the filters.

    Example: [bold]fortress audit query -c fortress.yaml --since 1h --user alice --status 5xx[/bold]
    """
    import orjson
    from rich.table import Table

    from fortress.audit.query import query_records

    cfg = load_cli_config(config)
    f = _filters(since, until, key, user, source, model, status, request_id, gateway)
    rows = query_records(_engine(cfg), f, limit)
    if as_json:
        sys.stdout.write(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    table = Table(title=f"{len(rows)} audit record{'s' if len(rows) != 1 else ''} (newest first)")
    for col in ("time (UTC)", "request id", "key", "user", "source / type", "model", "replica", "status"):
        table.add_column(col, overflow="fold")
    for col in ("ms", "ttft", "tokens in/out", "retries"):
        table.add_column(col, justify="right")
    for r in rows:
        colour = "green" if r["status"] and r["status"] < 400 else "red"
        table.add_row(
            _when(r["ts"]),
            r["request_id"],
            r["key_name"] or r["key_id"] or "-",
            r["user"] or "-",
            f"{r['source'] or '-'} / {r['request_type'] or '-'}",
            r["model"] or "-",
            r["replica"] or "-",
            f"[{colour}]{r['status']}[/]",
            f"{r['latency_ms']:.0f}" if r["latency_ms"] is not None else "-",
            f"{r['ttft_ms']:.0f}" if r["ttft_ms"] is not None else "-",
            f"{_n(r['input_tokens'])}/{_n(r['output_tokens'])}",
            str(r["retries"]),
        )
    out().print(table)  # piped or redirected: full width, nothing cut


@audit_app.command()
def export(
    config: Path | None = CONFIG_OPTION,
    fmt: str = typer.Option("jsonl", "--format", "-f", help="jsonl or csv."),
    output: Path | None = typer.Option(None, "--output", "-o", help="File to write (default: stdout)."),
    since: str | None = _SINCE,
    until: str | None = _UNTIL,
    key: str | None = _KEY,
    user: str | None = _USER,
    source: str | None = _SOURCE,
    model: str | None = _MODEL,
    status: str | None = _STATUS,
    request_id: str | None = _REQUEST,
    gateway: str | None = _GATEWAY,
) -> None:
    """Export matching records, oldest first, as JSON lines or CSV.

    Example: [bold]fortress audit export -c fortress.yaml --since 2025-01-01 -f csv -o jan.csv[/bold]
    """
    from fortress.audit.query import export as run_export

    if fmt not in ("jsonl", "csv"):
        fail(f"unknown format {fmt!r}: use jsonl or csv", ExitCode.USAGE)
    cfg = load_cli_config(config)
    f = _filters(since, until, key, user, source, model, status, request_id, gateway)
    engine = _engine(cfg)
    if output is None:
        run_export(engine, f, fmt, sys.stdout)
        return
    with open(output, "w", newline="") as fh:
        n = run_export(engine, f, fmt, fh)
    err_console.print(f"wrote {n} record{'s' if n != 1 else ''} to {output}")


@audit_app.command()
def verify(
    config: Path | None = CONFIG_OPTION,
    gateway: str | None = _GATEWAY,
    anchors: Path | None = typer.Option(
        None,
        "--anchors",
        help="Local anchors file to check too (default: <journal_dir>/anchors.jsonl, and each "
        "gateway worker's <journal_dir>-w<i>/anchors.jsonl).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Check the hash chain of every gateway's records in the store.

    Exits 1 naming each record that was changed, deleted, inserted or reordered. Needs the
    secret the records were sealed with: auth.secret (FORTRESS__AUTH__SECRET) or
    <state_dir>/secret.

    Example: [bold]fortress audit verify -c fortress.yaml[/bold]
    """
    import tempfile

    import orjson

    from fortress.audit.chain import summarize
    from fortress.audit.layer import journal_dir
    from fortress.audit.query import verify as run_verify
    from fortress.core.secret import SecretMissing, load_secret

    cfg = load_cli_config(config)
    engine = _engine(cfg)  # no store: nothing to verify (exit 4)
    try:
        secret = load_secret(cfg, create=False)
    except SecretMissing as exc:
        fail(str(exc), ExitCode.USAGE)
    combined = None
    if anchors is None:
        # The journal's anchors, and each gateway worker's (server.workers > 1: <journal_dir>-w<i>).
        base = journal_dir(cfg)
        found = [base / "anchors.jsonl", *sorted(base.parent.glob(f"{base.name}-w*/anchors.jsonl"))]
        found = [p for p in found if p.is_file()]
        if len(found) == 1:
            anchors = found[0]
        elif found:
            combined = tempfile.NamedTemporaryFile(prefix="fortress-anchors-", suffix=".jsonl")
            for p in found:
                combined.write(p.read_bytes().rstrip(b"\n") + b"\n")
            combined.flush()
            anchors = Path(combined.name)
    try:
        report = run_verify(engine, secret, gateway, anchors)
    finally:
        if combined is not None:
            combined.close()
    if as_json:
        data = {
            "ok": report.ok,
            "records": report.records,
            "anchors": report.anchors,
            "problems": [
                {"gateway_id": p.gateway_id, "seq": p.seq, "kind": p.kind, "detail": p.detail}
                for p in report.problems
            ],
        }
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        console = out()
        for g, n in report.records.items():
            console.print(f"gateway {g}: {n} records, {report.anchors.get(g, 0)} anchors")
        if report.ok:
            console.print("[green]OK[/green]: every chain verifies")
        else:
            for line in summarize(report.problems):
                console.print(f"[red]FAIL[/red] {line}", highlight=False)
    if not report.ok:
        raise typer.Exit(1)
