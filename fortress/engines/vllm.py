"""vLLM: ``vllm serve MODEL`` for GPU machines, with a persistent weight cache."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from fortress.config import VllmOptions, VllmReplicaConfig
from fortress.engines.base import Launch, http_url

# Generous: a first start may download tens of GB (the seed's ASG grace period was 600 s).
READY_TIMEOUT = 3600.0


def default_cache_dir() -> str:
    """The Hugging Face cache everyone else on this machine uses; it outlives Fortress restarts."""
    return os.environ.get("HF_HOME") or str(Path("~/.cache/huggingface").expanduser())


@dataclass(frozen=True)
class VllmEngine:
    """``vllm serve MODEL``; weights cached in ``cache_dir``.

    ``HF_HOME`` is set to ``cache_dir`` and ``--download-dir`` to its ``hub`` folder, the layout
    Hugging Face uses itself, so weights, tokenizer and config are downloaded once and reused by
    every restart (the seed deployment kept this cache on a persistent EBS volume: ~5 minutes to
    start warm against ~45 minutes downloading 72B weights).
    """

    kind: str
    options: VllmOptions
    served_model_name: str
    cache_dir: str

    @classmethod
    def from_config(cls, rc: VllmReplicaConfig, pool_model: str | None = None) -> Self:
        """``pool_model`` is the served name unless ``options.served_model_name`` gives one."""
        opts = rc.options
        return cls(
            kind=rc.engine,
            options=opts,
            served_model_name=opts.served_model_name or pool_model or opts.model,
            cache_dir=str(Path(opts.cache_dir or default_cache_dir()).expanduser()),
        )

    @property
    def binary(self) -> str:
        return self.options.binary or "vllm"

    @property
    def model(self) -> str:
        return self.served_model_name

    @property
    def ready_timeout(self) -> float:
        return self.options.ready_timeout or READY_TIMEOUT

    def launch(self, port: int, host: str = "127.0.0.1") -> Launch:
        o = self.options
        argv = [
            self.binary, "serve", o.model,
            "--host", host,
            "--port", str(port),
            "--served-model-name", self.served_model_name,
            "--tensor-parallel-size", str(o.tensor_parallel_size),
            "--gpu-memory-utilization", f"{o.gpu_memory_utilization:g}",
            "--download-dir", str(Path(self.cache_dir) / "hub"),
        ]  # fmt: skip
        if o.max_model_len is not None:
            argv += ["--max-model-len", str(o.max_model_len)]
        argv.append("--enable-chunked-prefill" if o.enable_chunked_prefill else "--no-enable-chunked-prefill")
        if o.max_num_batched_tokens is not None:
            argv += ["--max-num-batched-tokens", str(o.max_num_batched_tokens)]
        argv.extend(o.extra_args)
        env = {"HF_HOME": self.cache_dir, **o.env}
        return Launch(tuple(argv), env, http_url(host, port))
