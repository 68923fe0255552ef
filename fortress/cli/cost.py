"""``fortress cost``: what the config's AWS deployment costs a month."""

from __future__ import annotations

import typer

cost_app = typer.Typer(
    help="The monthly cost of the config's AWS deployment (`deploy.aws`).\n\n"
    "Example: [bold]fortress cost -c examples/aws-always-on.yaml[/bold]",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
