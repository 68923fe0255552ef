"""``fortress cost``: what the config's AWS deployment costs a month."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from fortress.cli.common import CONFIG_OPTION, JSON_OPTION, ExitCode, fail, load_cli_config, out, print_json

cost_app = typer.Typer(
    help="The monthly cost of the config's AWS deployment (`deploy.aws`), line by line, with what "
    "spot, commitments and schedules would save.\n\n"
    "Example: [bold]fortress cost -c examples/aws-always-on.yaml[/bold], "
    "[bold]fortress cost -c fortress.yaml --json[/bold], "
    "[bold]fortress cost refresh -o prices.json[/bold]",
    invoke_without_command=True,
    rich_markup_mode="rich",
)

PRICES_OPTION = typer.Option(
    None, "--prices", help="A price table `fortress cost refresh` wrote (default: the bundled one)."
)
THROUGHPUT_OPTION = typer.Option(
    None,
    "--throughput",
    help="Output tokens/s of one instance, instead of the config's throughput_tokens_per_second: "
    "a number or the JSON file `bench/throughput.py --json` wrote; FILE_OR_NUMBER for every "
    "deployed pool, POOL=FILE_OR_NUMBER for one (repeatable).",
)


def _throughputs(specs: list[str] | None) -> dict[str | None, Any]:
    """``--throughput`` values by pool (``None``: every deployed pool); exit 2 on a bad one."""
    from fortress.deploy.cost import read_throughput

    found: dict[str | None, Any] = {}
    for spec in specs or []:
        pool: str | None = None
        value = spec
        # POOL=...: a pool name never holds "/" or starts a number, so a path or figure is not one.
        head, sep, tail = spec.partition("=")
        if sep and head and not Path(spec).exists():
            pool, value = head, tail
        try:
            found[pool] = read_throughput(value)
        except ValueError as exc:
            fail(f"--throughput {spec}: {exc}", ExitCode.USAGE)
    return found


def _prices(path: Path | None) -> Any:
    from fortress.deploy.pricing import PriceError, load_prices

    try:
        return load_prices(path)
    except PriceError as exc:
        fail(str(exc), ExitCode.USAGE)


@cost_app.callback()
def cost(
    ctx: typer.Context,
    config: Path | None = CONFIG_OPTION,
    prices: Path | None = PRICES_OPTION,
    throughput: list[str] | None = THROUGHPUT_OPTION,
    as_json: bool = JSON_OPTION,
) -> None:
    """The monthly cost of the config's `deploy.aws`: instances, volumes, gateway, network,
    state, archive, alarms, Bedrock tokens; totals, per token and per request, and what it
    could save.

    Example: [bold]fortress cost -c examples/aws-always-on-ha.yaml --throughput bench.json[/bold]
    """
    if ctx.invoked_subcommand is not None:
        return
    from fortress.deploy.cost import estimate
    from fortress.deploy.pricing import PriceError

    cfg = load_cli_config(config)
    if cfg.deploy.aws is None:
        fail("the config has no `deploy.aws` section: nothing to price (see docs/deploy.md)", ExitCode.USAGE)
    table = _prices(prices)
    given = _throughputs(throughput)
    try:
        est = estimate(cfg, table, given)
    except (PriceError, ValueError) as exc:
        fail(str(exc), ExitCode.USAGE)
    if as_json:
        print_json(est.to_dict())
        return
    _show(est)


def _usd(v: float) -> str:
    return f"${v:,.2f}" if abs(v) < 100 else f"${v:,.0f}"


def _show(est: Any) -> None:
    console = out()
    t = Table(title=f"Monthly cost, {est.region} ({est.commitment.replace('_', ' ')})", title_justify="left")
    t.add_column("resource")
    t.add_column("what")
    t.add_column("quantity", justify="right")
    t.add_column("$/month", justify="right")
    for i in est.items:
        t.add_row(escape(i.resource), escape(i.what), f"{i.quantity:,.4g} {i.unit}", _usd(i.monthly_usd))
    t.add_section()
    t.add_row("[bold]total[/bold]", "", "", f"[bold]{_usd(est.total_usd)}[/bold]")
    console.print(t)
    if any(p.bedrock_model is None for p in est.pools):
        console.print(f"model-server instances: {_usd(est.instances_usd)} of {_usd(est.total_usd)}")
    if est.bedrock_usd:
        console.print(f"Bedrock tokens: {_usd(est.bedrock_usd)} of {_usd(est.total_usd)}")
    for p in est.pools:
        if p.bedrock_model is not None:
            line = f"{escape(p.pool)}: Bedrock {escape(p.bedrock_model)}"
            line += f", ${p.usd_per_request:.5f} per request"
            line += f", ${p.usd_per_million_tokens:,.2f} per 1M output tokens (their input tokens included)"
            if p.requests_share is not None and p.requests_share < 1:
                line += f"; takes {p.requests_share:.0%} of the pool's requests"
            console.print(line)
            continue
        line = f"{escape(p.pool)}: {p.instances:.2f} x {p.instance_type} on average"
        if p.usd_per_instance_hour is not None:
            line += f", ${p.usd_per_instance_hour:,.4g}/instance-hour"
        if p.usd_per_million_tokens is not None:
            line += (
                f", ${p.usd_per_million_tokens:,.2f} per 1M output tokens at full use "
                f"of {p.throughput_tokens_per_second:,.4g} tokens/s ({escape(str(p.throughput_source))})"
            )
        console.print(line)
    if est.usd_per_request is not None:
        line = f"{est.requests_per_month:,} requests/month: ${est.usd_per_request:.5f} per request"
        if est.utilisation is not None:
            line += f"; they use {est.utilisation:.0%} of what the running instances generate"
        console.print(line)
    if est.savings:
        s = Table(title="What it could save", title_justify="left")
        s.add_column("option")
        s.add_column("what")
        s.add_column("$/month", justify="right")
        s.add_column("saves", justify="right")
        for sv in est.savings:
            pct = sv.saves_usd / est.total_usd if est.total_usd else 0.0
            s.add_row(
                escape(sv.name), escape(sv.what), _usd(sv.monthly_usd), f"{_usd(sv.saves_usd)} ({pct:.0%})"
            )
        console.print(s)
    for n in est.notes:
        console.print(f"[dim]note: {escape(n)}[/dim]")
    where = f"{est.prices_region}, {est.prices_date}; {est.prices_source}"
    console.print(f"[dim]prices: {escape(where)}[/dim]")


@cost_app.command("refresh")
def refresh(
    region: str = typer.Option("us-east-1", "--region", "-r", help="The region whose prices to fetch."),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Where to write the table (default: prices-REGION.json)."
    ),
    config: Path | None = CONFIG_OPTION,
) -> None:
    """Fetch current prices with the AWS Price List API and write a price table.

    EC2 (the bundled table's types and the config's `deploy.aws.pools`), RDS and ElastiCache
    hourly prices; the rest is carried over. Needs AWS credentials (pricing:GetProducts). Use the
    table with `fortress cost --prices FILE`.

    Example: [bold]fortress cost refresh --region eu-west-1 -o prices-eu-west-1.json[/bold]
    """
    from fortress.cli.common import find_cli_config
    from fortress.deploy.pricing import PriceError, PricingUnavailable, load_prices, refresh_prices

    types: list[str] = []
    found, _ = find_cli_config(config)
    if found is not None:
        cfg = load_cli_config(found)
        if cfg.deploy.aws is not None:
            types = [p.instance_type for p in cfg.deploy.aws.pools.values()]
    target = output or Path(f"prices-{region}.json")
    try:
        raw = refresh_prices(load_prices(), region=region, instance_types=types)
    except (PricingUnavailable, PriceError) as exc:
        fail(str(exc), ExitCode.USAGE)
    except Exception as exc:  # botocore's own setup errors (a bad profile): one line, no traceback
        fail(f"cannot ask the AWS Price List API: {exc}", ExitCode.USAGE)
    target.write_text(json.dumps(raw, indent=2) + "\n")
    out().print(
        f"wrote {escape(str(target))}: {len(raw['ec2_hour'])} instance types, {region}, {raw['date']}"
    )
