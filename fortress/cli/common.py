"""What several CLI commands share: the -c option and loading the config with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

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
