"""``fortress deploy``: the config's AWS deployment as a CDK app."""

from __future__ import annotations

import typer

deploy_app = typer.Typer(
    help="Deploy the config to AWS: a CDK app generated from fortress.yaml (`deploy.aws`).\n\n"
    "Example: [bold]fortress deploy aws synth -c examples/aws-always-on.yaml -o cdk.out[/bold]",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
