"""Bedrock: ``python -m fortress.bedrock``, an OpenAI-compatible adapter in front of one Bedrock model.

The adapter is a local process like any engine, so the relay, health checks, outlier detection and
the supervisor treat a Bedrock model exactly like a self-hosted replica. AWS credentials are never
on the command line: the process inherits Fortress's environment (plus ``options.env``) and boto3
reads the standard credential chain.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Self

from fortress.config.engines import BedrockOptions, BedrockReplicaConfig
from fortress.engines.base import Launch, http_url

READY_TIMEOUT = 15.0  # nothing to load: the adapter answers /health once it listens


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


@dataclass(frozen=True)
class BedrockEngine:
    """``python -m fortress.bedrock --model-id ID`` serving the pool's model name; ``options.binary``
    replaces the Python interpreter."""

    kind: str
    options: BedrockOptions
    served_model: str

    @classmethod
    def from_config(cls, rc: BedrockReplicaConfig, pool_model: str | None = None) -> Self:
        """``pool_model`` is the name served unless ``options.served_model_name`` names one; the
        Bedrock model id is the last resort."""
        o = rc.options
        return cls(kind=rc.engine, options=o, served_model=o.served_model_name or pool_model or o.model_id)

    @property
    def model(self) -> str:
        return self.served_model

    @property
    def ready_timeout(self) -> float:
        return self.options.ready_timeout or READY_TIMEOUT

    def launch(self, port: int, host: str = "127.0.0.1") -> Launch:
        o = self.options
        argv = [o.binary or sys.executable, "-m", "fortress.bedrock", "--host", host, "--port", str(port)]
        argv += ["--model-id", o.model_id, "--served-model-name", self.served_model]
        if o.region is not None:
            argv += ["--region", o.region]
        if o.endpoint_url is not None:
            argv += ["--endpoint-url", o.endpoint_url]
        argv += ["--max-concurrency", str(o.max_concurrency), "--max-attempts", str(o.max_attempts)]
        argv += ["--read-timeout", _number(o.read_timeout)]
        argv.extend(o.extra_args)
        return Launch(tuple(argv), dict(o.env), http_url(host, port))
