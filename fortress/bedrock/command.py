"""The adapter's command line (``python -m fortress.bedrock --help``)."""

from __future__ import annotations

import argparse
import sys

from fortress.bedrock.server import BedrockSettings, make_client, run


def _positive(kind: type[int] | type[float]) -> object:
    def check(text: str) -> int | float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return check


def main(argv: list[str] | None = None) -> None:
    """Parse the flags, check that boto3 can build a client (a region is known), and serve."""
    ap = argparse.ArgumentParser(
        prog="python -m fortress.bedrock",
        description="An OpenAI-compatible server in front of one Amazon Bedrock model (Converse API). "
        "Credentials come from the standard AWS chain (environment, profile, role).",
    )
    ap.add_argument("--port", type=int, required=True, help="TCP port to listen on")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind")
    ap.add_argument("--model-id", required=True, help="Bedrock model id or inference profile id")
    ap.add_argument("--served-model-name", help="name in /v1/models and answers (default: the model id)")
    ap.add_argument("--region", help="AWS region (default: AWS_REGION, the profile's region)")
    ap.add_argument("--endpoint-url", help="another bedrock-runtime endpoint (a VPC endpoint)")
    ap.add_argument("--max-concurrency", type=_positive(int), default=32, help="Bedrock calls in flight")
    ap.add_argument("--max-attempts", type=_positive(int), default=3, help="botocore attempts per call")
    ap.add_argument("--read-timeout", type=_positive(float), default=300.0, help="seconds")
    args = ap.parse_args(argv)
    settings = BedrockSettings(
        model_id=args.model_id,
        served_model_name=args.served_model_name or args.model_id,
        region=args.region,
        endpoint_url=args.endpoint_url,
        max_concurrency=args.max_concurrency,
        max_attempts=args.max_attempts,
        read_timeout=args.read_timeout,
    )
    from botocore.exceptions import NoRegionError

    try:
        client = make_client(settings)
    except NoRegionError:
        print(
            "fortress bedrock: no AWS region: set options.region, or AWS_REGION in the environment",
            file=sys.stderr,
        )
        sys.exit(2)
    print(
        f"fortress bedrock: serving {settings.model_id!r} as {settings.served_model_name!r} "
        f"on http://{args.host}:{args.port}",
        file=sys.stderr,
    )
    try:
        run(settings, args.host, args.port, client)
    except OSError as exc:
        print(f"fortress bedrock: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        sys.exit(1)
