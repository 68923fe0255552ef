"""``fortress sim`` / ``python -m fortress.sim``: run a simulated replica (a test tool, never a model).

The command lives with the simulator, not in ``fortress.cli``, so that ``python -m fortress.sim``
needs nothing else of Fortress; ``fortress.cli.main`` only registers it.
"""

from __future__ import annotations

import math
import sys
from enum import StrEnum
from typing import Annotated

import typer


class MetricsFlavor(StrEnum):
    """Which engine's Prometheus metric names ``/metrics`` uses."""

    vllm = "vllm"
    llamacpp = "llamacpp"


def _seconds(value: float) -> float:
    if not (value >= 0 and math.isfinite(value)):
        raise typer.BadParameter(f"must be a non-negative number of seconds, got {value:g}")
    return value


def _fraction(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise typer.BadParameter(f"must be a fraction of requests between 0 and 1 (0.1 = 10%), got {value:g}")
    return value


def _model(value: str) -> str:
    if not value.strip():
        raise typer.BadParameter("must not be empty")
    return value


def _port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise typer.BadParameter(f"must be a TCP port between 1 and 65535, got {value}")
    return value


def _tokens(value: int) -> int:
    if value < 1:
        raise typer.BadParameter(f"must be at least 1, got {value}")
    return value


def _crash_after(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise typer.BadParameter(f"must be at least 1 stream chunk, got {value}")
    return value


def sim(
    port: Annotated[int, typer.Option("--port", "-p", callback=_port, help="TCP port to listen on.")],
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    model: Annotated[
        str,
        typer.Option(callback=_model, help="Model id served; every response names it, whatever was asked."),
    ] = "sim-model",
    ttft: Annotated[float, typer.Option(callback=_seconds, help="Seconds to the first token.")] = 0.0,
    itl: Annotated[float, typer.Option(callback=_seconds, help="Seconds between tokens.")] = 0.0,
    tokens: Annotated[
        int,
        typer.Option(callback=_tokens, help="Output length in tokens (max_tokens may lower it)."),
    ] = 16,
    startup_delay: Annotated[
        float,
        typer.Option(callback=_seconds, help="Seconds of 'Loading model' 503s after start."),
    ] = 0.0,
    error_rate: Annotated[
        float, typer.Option(callback=_fraction, help="Fraction of completions answered 500.")
    ] = 0.0,
    hang_rate: Annotated[
        float,
        typer.Option(callback=_fraction, help="Fraction of completions that never answer."),
    ] = 0.0,
    crash_after: Annotated[
        int | None,
        typer.Option(
            callback=_crash_after,
            help="Exit with status 1 after this many stream chunks in total (a mid-stream crash).",
        ),
    ] = None,
    metrics_flavor: Annotated[
        MetricsFlavor, typer.Option(help="Metric names on /metrics.")
    ] = MetricsFlavor.vllm,
    seed: Annotated[
        int | None, typer.Option(help="Seed for the error/hang draws (reproducible drills).")
    ] = None,
) -> None:
    """Run a SIMULATED replica for tests, load and chaos drills. It is never a real model.

    It speaks the OpenAI API and answers placeholder tokens on a fixed schedule.

    Change its behaviour at runtime with POST /sim/control; read counters at GET /sim/stats.

    A prompt containing \\[sim:500] is always answered 500 (code sim_poison), for outlier tests.

    Example:

    fortress sim --port 9001 --model demo --ttft 0.2 --itl 0.02 --tokens 64
    """
    # Lazy: aiohttp is not needed to parse options or print --help (`fortress --help` stays fast).
    from fortress.sim.server import SimSettings, run

    settings = SimSettings(
        model=model,
        ttft=ttft,
        itl=itl,
        tokens=tokens,
        startup_delay=startup_delay,
        error_rate=error_rate,
        hang_rate=hang_rate,
        crash_after=crash_after,
        metrics_flavor=metrics_flavor.value,
        seed=seed,
    )
    print(
        f"fortress sim: simulated replica (test tool, not a model) serving {model!r} on http://{host}:{port}",
        file=sys.stderr,
    )
    try:
        run(settings, host, port)
    except OSError as exc:
        print(f"fortress sim: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        raise typer.Exit(1) from None


def main() -> None:
    """``python -m fortress.sim``: the ``fortress sim`` command, standalone."""
    app = typer.Typer(add_completion=False)
    app.command()(sim)
    app()
