"""What the CLI commands share: consoles, the -c option, loading the config with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

console = Console()
err_console = Console(stderr=True)

CONFIG_OPTION = typer.Option(
    None, "--config", "-c", help="fortress.yaml (default: built-in defaults + FORTRESS__* env)."
)


def load_cli_config(path: Path | None) -> Any:
    """The config from ``path``, or defaults plus FORTRESS__* overrides; exit 2 on errors."""
    from fortress.config import ConfigError, load_config, parse_config

    try:
        return load_config(path) if path is not None else parse_config("", "(no config file)")
    except ConfigError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


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
        err_console.print(f"[red]error:[/red] {url} answered {exc.code}: {exc.read().decode()[:200]}")
        raise typer.Exit(1) from None
    except (urllib.error.URLError, OSError) as exc:
        err_console.print(f"[red]error:[/red] cannot reach the gateway at {url}: {exc}")
        raise typer.Exit(1) from None
