"""What the CLI commands share: consoles, exit codes, finding the config and the store.

Every command finds its config the same way (``-c``, else ``$FORTRESS_CONFIG``, else
``./fortress.yaml``, else defaults; ``FORTRESS__*`` overrides on top), so ``fortress keys``
and the gateway started from the same directory use the same state dir, secret and database.
Read-only commands open an existing store only: they never create the state dir, the
database or the secret.
"""

from __future__ import annotations

import sys
from enum import IntEnum
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape


class ExitCode(IntEnum):
    """The ``fortress`` command's exit statuses (documented in the README)."""

    OK = 0
    FAILED = 1  # a runtime failure: gateway unreachable, port busy, replicas failed, chain broken
    USAGE = 2  # a bad option or an invalid config (Click's own usage errors are 2 too)
    STATE_DIR_IN_USE = 3  # another gateway holds the state dir
    NO_STORE = 4  # a read-only command found no store (nothing has used this state dir yet)
    INTERRUPTED = 130  # Ctrl-C before the gateway's own signal handling was in place


# Piped or redirected output is for scripts and files: never cut or wrap it at 80 columns.
_WIDE = 10_000

# Errors are one line each, even when stderr is a file or a pipe.
err_console = Console(stderr=True, soft_wrap=True)


def out() -> Console:
    """A console on the current stdout: the terminal's width there, unlimited width otherwise
    (built per call: tests and pipes swap ``sys.stdout``)."""
    if sys.stdout.isatty():
        return Console()
    return Console(width=_WIDE, soft_wrap=True)


def fail(message: str, code: int = ExitCode.FAILED) -> NoReturn:
    """Print ``error: message`` on stderr (one line, no traceback) and exit with ``code``."""
    err_console.print(f"[red]error:[/red] {escape(message)}", highlight=False)
    raise typer.Exit(int(code))


def print_json(data: Any) -> None:
    """Machine-readable output: indented JSON on stdout, nothing else."""
    import json

    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


CONFIG_OPTION = typer.Option(
    None,
    "--config",
    "-c",
    help="fortress.yaml to use (default: $FORTRESS_CONFIG, else ./fortress.yaml if present, "
    "else built-in defaults; FORTRESS__* env overrides apply).",
)

JSON_OPTION = typer.Option(False, "--json", help="Print JSON on stdout instead of a table.")


def find_cli_config(path: Path | None) -> tuple[Path | None, str]:
    """(config file or None, how it was found): see ``fortress.config.loader.find_config``."""
    from fortress.config.loader import find_config

    return find_config(path)


def load_cli_config(path: Path | None) -> Any:
    """The config found from ``path`` (``-c``) as every command finds it; exit 2 on errors."""
    from fortress.config import ConfigError, load_config, parse_config

    found, _ = find_cli_config(path)
    try:
        return load_config(found) if found is not None else parse_config("", "(no config file)")
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(ExitCode.USAGE) from None


def open_store(cfg: Any, *, create: bool) -> Any:
    """The migrated database engine of ``cfg``.

    ``create=False`` (read-only commands): a SQLite store that does not exist is an error
    (exit 4), never created. A server database (PostgreSQL) is used as it is.
    """
    from sqlalchemy.engine import make_url

    from fortress.store.db import database_url, migrate

    url = database_url(cfg)
    u = make_url(url)
    if not create and u.get_backend_name() == "sqlite" and u.database and not Path(u.database).exists():
        fail(
            f"no store at {u.database}: no gateway or `fortress keys create` has used state_dir "
            f"{Path(cfg.state_dir).expanduser().resolve()} yet (wrong directory, -c or FORTRESS_CONFIG?)",
            ExitCode.NO_STORE,
        )
    try:
        return migrate(url)
    except Exception as exc:
        fail(f"cannot open the store {u.render_as_string(hide_password=True)}: {exc}")


def gateway_url(cfg: Any) -> str:
    """The base URL of the gateway ``cfg`` describes (its host and port, FORTRESS__* included)."""
    from fortress.engines.base import http_url

    host = cfg.server.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # a wildcard listener is reached on loopback from this machine
    return http_url(host, cfg.server.port)


def resolve_gateway(url: str | None, admin_token: str | None, config: Path | None) -> tuple[str, str | None]:
    """(base URL, admin token) for commands that call a running gateway: ``--url`` and
    ``--admin-token`` when given, else the found config's ``server`` (host, port, admin_token,
    FORTRESS__* included). With ``--url`` alone, a config is read only when ``-c`` names one."""
    if url is not None and config is None:
        return url, admin_token
    cfg = load_cli_config(config)
    return url or gateway_url(cfg), admin_token or cfg.server.admin_token


def get_gateway_json(url: str, path: str, admin_token: str | None) -> Any:
    """GET ``path`` from a running gateway (with the admin token if given); exit 1 on failure."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url.rstrip("/") + path)
    if admin_token:
        req.add_header("Authorization", f"Bearer {admin_token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        fail(f"{url} answered {exc.code}: {exc.read().decode(errors='replace')[:200]}")
    except (urllib.error.URLError, OSError) as exc:
        fail(f"cannot reach the gateway at {url}: {exc}")


def call_gateway_json(
    url: str, path: str, admin_token: str | None, body: dict[str, Any], timeout: float
) -> tuple[int, Any]:
    """POST ``body`` as JSON to ``path`` of a running gateway: (status, decoded answer). An
    error status is returned, not raised (the caller says what it means); an unreachable
    gateway exits 1."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        url.rstrip("/") + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    if admin_token:
        req.add_header("Authorization", f"Bearer {admin_token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            fail(f"{url} answered {exc.code}: {raw.decode(errors='replace')[:200]}")
    except (urllib.error.URLError, OSError) as exc:
        fail(f"cannot reach the gateway at {url}: {exc}")
