"""``fortress deploy``: the config's AWS deployment as a CDK app."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import typer
from rich.table import Table

from fortress.cli.common import CONFIG_OPTION, ExitCode, fail, find_cli_config, load_cli_config, out

deploy_app = typer.Typer(
    help="Deploy the config to AWS: a CDK app generated from fortress.yaml (`deploy.aws`).\n\n"
    "Example: [bold]fortress deploy aws synth -c examples/aws-always-on.yaml -o cdk.out[/bold]",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
aws_app = typer.Typer(
    help="The AWS stack (CDK): synth writes CloudFormation here; diff, deploy and destroy run the CDK "
    "CLI (npx aws-cdk@2) and need Node, Docker and AWS credentials.\n\n"
    "Example: [bold]fortress deploy aws synth -c fortress.yaml -o cdk.out[/bold]",
    no_args_is_help=True,
    rich_markup_mode="rich",
)
deploy_app.add_typer(aws_app, name="aws")

OUT_OPTION = typer.Option(Path("cdk.out"), "--output", "-o", help="Folder of the cloud assembly.")
NAG_OPTION = typer.Option(True, "--nag/--no-nag", help="Apply cdk-nag's AWS Solutions checks.")


def _synth(config: Path | None, output: Path, nag: bool) -> tuple[Path | None, object]:
    cfg = load_cli_config(config)
    found, _ = find_cli_config(config)
    from fortress.deploy.aws import DeployError, synth, write_cdk_app

    try:
        result = synth(cfg, output, nag=nag)
    except DeployError as exc:
        fail(str(exc), ExitCode.USAGE)
    if result.nag_errors:
        for line in result.nag_errors:
            out().print(f"[red]cdk-nag:[/red] {line}", highlight=False)
        fail(f"{len(result.nag_errors)} cdk-nag finding(s) neither fixed nor suppressed")
    if found is not None:
        write_cdk_app(found, output)
    return found, result


@aws_app.command("synth")
def synth_cmd(config: Path | None = CONFIG_OPTION, output: Path = OUT_OPTION, nag: bool = NAG_OPTION) -> None:
    """Synthesize the stack's CloudFormation template into OUTPUT (no AWS account needed).

    Example: [bold]fortress deploy aws synth -c fortress.yaml -o cdk.out[/bold]
    """
    found, result = _synth(config, output, nag)
    table = Table(title=f"stack {result.stack_name}: {sum(result.resources.values())} resources")  # type: ignore[attr-defined]
    table.add_column("resource type")
    table.add_column("count", justify="right")
    for kind, n in sorted(result.resources.items()):  # type: ignore[attr-defined]
        table.add_row(kind, str(n))
    console = out()
    console.print(table)
    console.print(f"template: {result.template}")  # type: ignore[attr-defined]
    if found is not None:
        from fortress.deploy.aws.runner import app_dir

        console.print(f"CDK app (for the CDK CLI): {app_dir(output)}")


def _cdk(verb: str, config: Path | None, output: Path, dry_run: bool, extra: list[str] | None) -> None:
    cfg = load_cli_config(config)
    if cfg.deploy.aws is None:
        fail("the config has no deploy.aws section: nothing to deploy", ExitCode.USAGE)
    from fortress.deploy.aws import cdk_command

    argv = cdk_command(verb, cfg.deploy.aws.stack_name, output, extra)
    if dry_run:
        out().print(shlex.join(argv), highlight=False, markup=False)
        return
    found, _ = _synth(config, output, nag=True)
    if found is None:
        fail("the CDK CLI needs a config file (-c fortress.yaml)", ExitCode.USAGE)
    try:
        rc = subprocess.call(argv)
    except FileNotFoundError:
        fail("npx not found: install Node.js (the CDK CLI runs with npx aws-cdk@2)", ExitCode.USAGE)
    raise typer.Exit(rc)


DRY_OPTION = typer.Option(False, "--dry-run", help="Print the CDK CLI command line instead of running it.")


@aws_app.command("diff")
def diff_cmd(
    config: Path | None = CONFIG_OPTION,
    output: Path = OUT_OPTION,
    dry_run: bool = DRY_OPTION,
    extra: list[str] | None = typer.Argument(None, help="More arguments for the CDK CLI."),
) -> None:
    """Compare the stack with what is deployed (npx aws-cdk@2 diff; needs AWS credentials).

    Example: [bold]fortress deploy aws diff -c fortress.yaml[/bold]
    """
    _cdk("diff", config, output, dry_run, extra)


@aws_app.command("deploy")
def deploy_cmd(
    config: Path | None = CONFIG_OPTION,
    output: Path = OUT_OPTION,
    dry_run: bool = DRY_OPTION,
    extra: list[str] | None = typer.Argument(None, help="More arguments for the CDK CLI."),
) -> None:
    """Deploy the stack (npx aws-cdk@2 deploy; needs AWS credentials, a bootstrapped account and Docker).

    Example: [bold]fortress deploy aws deploy -c fortress.yaml --dry-run[/bold]
    """
    _cdk("deploy", config, output, dry_run, extra)


@aws_app.command("destroy")
def destroy_cmd(
    config: Path | None = CONFIG_OPTION,
    output: Path = OUT_OPTION,
    dry_run: bool = DRY_OPTION,
    extra: list[str] | None = typer.Argument(None, help="More arguments for the CDK CLI."),
) -> None:
    """Delete the stack (npx aws-cdk@2 destroy; the archive bucket and a database snapshot are kept).

    Example: [bold]fortress deploy aws destroy -c fortress.yaml --dry-run[/bold]
    """
    _cdk("destroy", config, output, dry_run, extra)
