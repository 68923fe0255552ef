"""Replicas: a URL Fortress routes to, or a local engine it starts, with typed options per engine.

A replica's ``engine`` picks its schema (a discriminated union; no ``engine`` means
``external``). Local engines (``llamacpp``, ``vllm``, ``sim``, ``bedrock``) take typed ``options``; each
engine's name is written once, as the ``engine`` literal of its class here, and everything else
(the union's tags, ``LOCAL_ENGINES``, the engine registry in ``fortress.engines``) derives from
the classes. Option keys may be written with ``-`` or ``_`` (``ctx-size`` == ``ctx_size``);
unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self

from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from fortress.config.base import NAME_PATTERN, ConfigModel, HttpUrl, Tier, seconds

__all__ = [
    "ENGINE_NAMES",
    "LOCAL_ENGINES",
    "LOCAL_REPLICA_CLASSES",
    "REPLICA_CLASSES",
    "BedrockOptions",
    "BedrockReplicaConfig",
    "ExternalReplicaConfig",
    "LlamaCppOptions",
    "LlamaCppReplicaConfig",
    "LocalOptions",
    "LocalReplicaConfig",
    "ReplicaConfig",
    "ReplicaConfigBase",
    "SimOptions",
    "SimReplicaConfig",
    "VllmOptions",
    "VllmReplicaConfig",
]


# -- options ---------------------------------------------------------------------------------


class LocalOptions(ConfigModel):
    """Options every local engine understands, and the supervisor's restart settings.

    ``binary`` is the program to run (default: the engine's own lookup), ``env`` is added to
    Fortress's environment, ``extra_args`` are appended to the command line (a string is split
    on whitespace), ``ready_timeout`` is how long a fresh process may take to answer its health
    check (None: the engine's default, which allows for its model load).
    """

    binary: str | None = Field(None, min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    extra_args: list[str] = Field(default_factory=list)
    ready_timeout: float | None = Field(None, gt=0, description="seconds; None: the engine's default")
    # The supervisor's restart policy (see fortress.fleet.supervisor.RestartPolicy).
    stop_timeout: float = Field(15.0, gt=0, description="seconds from SIGTERM to SIGKILL on stop")
    max_crashes: int = Field(5, ge=1, description="crashes within crash_window that mean: give up")
    crash_window: float = Field(60.0, gt=0, description="seconds")
    backoff_initial: float = Field(1.0, ge=0, description="seconds before the first restart")
    backoff_max: float = Field(30.0, ge=0, description="cap of the doubling restart delay")
    # Seconds a process must run for its next crash to start over at backoff_initial
    # (None: crash_window).
    stable_after: float | None = Field(None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _dashes_to_underscores(cls, v: Any) -> Any:
        # ctx-size == ctx_size: YAML writers use both, the flags themselves use dashes.
        if isinstance(v, Mapping):
            return {str(k).replace("-", "_"): val for k, val in v.items()}
        return v

    @field_validator("extra_args", mode="before")
    @classmethod
    def _split_args(cls, v: Any) -> Any:
        if isinstance(v, str):
            return v.split()
        if isinstance(v, list | tuple):  # YAML gives numbers for `[--tokens, 0]`
            return [a if isinstance(a, str) else _scalar_text(a) for a in v]
        return v

    @field_validator("env", mode="before")
    @classmethod
    def _env_text(cls, v: Any) -> Any:
        if isinstance(v, Mapping):  # YAML gives numbers for `CUDA_VISIBLE_DEVICES: 0`
            return {str(k): val if isinstance(val, str) else _scalar_text(val) for k, val in v.items()}
        return v

    @field_validator(
        "ready_timeout", "stop_timeout", "crash_window", "backoff_initial", "backoff_max", "stable_after",
        mode="before",
    )  # fmt: skip
    @classmethod
    def _durations(cls, v: Any) -> Any:
        return seconds(v)

    @model_validator(mode="after")
    def _backoff_order(self) -> Self:
        if self.backoff_max < self.backoff_initial:
            raise ValueError("backoff_max must be at least backoff_initial")
        return self


def _scalar_text(v: Any) -> Any:
    """Numbers and booleans as their command-line text; anything else is left to fail validation."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    return v


class LlamaCppOptions(LocalOptions):
    """``llama-server`` with one GGUF; CPU-friendly defaults (1 thread, 2 slots, 2048 context)."""

    model: str | None = Field(None, min_length=1, description="path of a .gguf; None: the embedded model")
    alias: str | None = Field(None, min_length=1, description="served name; default: the pool's model")
    threads: int = Field(1, ge=1)
    ctx_size: int = Field(2048, ge=1)
    parallel: int = Field(2, ge=1, description="slots: requests decoded at once")
    metrics: bool = Field(True, description="serve /metrics (engine load for routing)")
    # llama-server's --embeddings serves /v1/embeddings only (no chat): give it its own pool.
    embeddings: bool = Field(False, description="an embeddings server (--embeddings --pooling mean)")


class VllmOptions(LocalOptions):
    """``vllm serve MODEL`` with defaults for one GPU; weights cached in ``cache_dir``."""

    model: str = Field(..., min_length=1, description="a Hugging Face model id or a local directory")
    served_model_name: str | None = Field(None, min_length=1, description="default: the pool's model")
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int | None = Field(8192, ge=1, description="None: the model's own")
    gpu_memory_utilization: float = Field(0.90, ge=0.05, le=1.0)
    enable_chunked_prefill: bool = True
    max_num_batched_tokens: int | None = Field(8192, ge=1, description="None: vLLM's default")
    cache_dir: str | None = Field(None, min_length=1, description="default: HF_HOME or ~/.cache/huggingface")

    @model_validator(mode="before")
    @classmethod
    def _model_required(cls, v: Any) -> Any:
        # Say what to write, rather than pydantic's bare "Field required".
        if isinstance(v, Mapping) and not any(str(k) == "model" for k in v):
            raise ValueError(
                "a vllm replica needs options.model: a Hugging Face model id "
                "(e.g. Qwen/Qwen2.5-7B-Instruct) or a local model directory"
            )
        return v


class SimOptions(LocalOptions):
    """``fortress sim`` flags; None leaves the simulator's own default."""

    model: str | None = Field(None, min_length=1, description="default: the pool's model")
    ttft: float | None = Field(None, ge=0, description="seconds to the first token")
    itl: float | None = Field(None, ge=0, description="seconds between tokens")
    tokens: int | None = Field(None, ge=1, description="output length")
    startup_delay: float | None = Field(None, ge=0, description="seconds of 503 'Loading model'")
    error_rate: float | None = Field(None, ge=0, le=1, description="fraction answered 500")
    hang_rate: float | None = Field(None, ge=0, le=1, description="fraction that never answer")
    crash_after: int | None = Field(None, ge=1, description="exit after this many stream chunks")
    metrics_flavor: Literal["vllm", "llamacpp"] | None = None
    seed: int | None = None

    @field_validator("ttft", "itl", "startup_delay", mode="before")
    @classmethod
    def _sim_durations(cls, v: Any) -> Any:
        return seconds(v)


class BedrockOptions(LocalOptions):
    """``python -m fortress.bedrock``: an OpenAI-compatible adapter in front of one Bedrock model.

    Credentials are never options: the adapter uses the standard AWS chain (environment, shared
    profile via ``env: {AWS_PROFILE: ...}``, container or instance role).
    """

    model_id: str = Field(..., min_length=1, description="a Bedrock model id or inference profile")
    region: str | None = Field(None, min_length=1, description="default: the AWS chain's region")
    endpoint_url: HttpUrl | None = Field(None, description="a VPC endpoint or a test server")
    served_model_name: str | None = Field(None, min_length=1, description="default: the pool's model")
    max_concurrency: int = Field(32, ge=1, description="Bedrock calls in flight; more wait their turn")
    max_attempts: int = Field(3, ge=1, description="botocore attempts per call (throttling retries)")
    read_timeout: float = Field(300.0, gt=0, description="seconds without a byte from Bedrock")

    @model_validator(mode="before")
    @classmethod
    def _model_id_required(cls, v: Any) -> Any:
        if isinstance(v, Mapping) and not any(str(k).replace("-", "_") == "model_id" for k in v):
            raise ValueError(
                "a bedrock replica needs options.model_id: a Bedrock model id "
                "(e.g. anthropic.claude-3-haiku-20240307-v1:0) or an inference profile id"
            )
        return v

    @field_validator("read_timeout", mode="before")
    @classmethod
    def _read_timeout(cls, v: Any) -> Any:
        return seconds(v)


# -- replicas ----------------------------------------------------------------------------------


class ReplicaConfigBase(ConfigModel):
    """What every replica has: an optional stable name and a tier."""

    engine: str
    name: str | None = Field(None, pattern=NAME_PATTERN, description="default: derived from pool and index")
    tier: Tier = Tier.PRIMARY


class ExternalReplicaConfig(ReplicaConfigBase):
    """A running OpenAI-compatible server that Fortress routes to but does not start."""

    engine: Literal["external"] = "external"
    url: HttpUrl


class LocalReplicaConfig(ReplicaConfigBase):
    """A replica Fortress starts on this machine: ``count`` processes, each on a port it picks."""

    count: int = Field(1, ge=1, description="how many processes to start")
    options: LocalOptions = Field(default_factory=LocalOptions)

    @model_validator(mode="before")
    @classmethod
    def _no_url(cls, v: Any) -> Any:
        if isinstance(v, Mapping) and v.get("url") is not None:
            engine = v.get("engine") or cls.model_fields["engine"].default
            raise ValueError(f"a local {engine} replica gets its port from Fortress: remove its url")
        return v

    @model_validator(mode="before")
    @classmethod
    def _options_present(cls, v: Any) -> Any:
        # Missing options: the engine's options say what is required (vllm's model, bedrock's
        # model_id), rather than a bare "field required".
        if isinstance(v, Mapping) and v.get("options") is None:
            return {**v, "options": {}}
        return v


class LlamaCppReplicaConfig(LocalReplicaConfig):
    """Local ``llama-server`` processes (default: the embedded SmolLM2 model)."""

    engine: Literal["llamacpp"] = "llamacpp"
    options: LlamaCppOptions = Field(default_factory=LlamaCppOptions)


class VllmReplicaConfig(LocalReplicaConfig):
    """Local ``vllm serve`` processes; ``options.model`` is required."""

    engine: Literal["vllm"] = "vllm"
    options: VllmOptions


class SimReplicaConfig(LocalReplicaConfig):
    """Local ``fortress sim`` processes: simulated replicas for tests and drills, never a model."""

    engine: Literal["sim"] = "sim"
    options: SimOptions = Field(default_factory=SimOptions)


class BedrockReplicaConfig(LocalReplicaConfig):
    """Local adapter processes that serve one Bedrock model over the OpenAI API."""

    engine: Literal["bedrock"] = "bedrock"
    options: BedrockOptions


def _engine_name(cls: type[ReplicaConfigBase]) -> str:
    name: str = cls.model_fields["engine"].default
    return name


REPLICA_CLASSES: tuple[type[ReplicaConfigBase], ...] = (
    ExternalReplicaConfig,
    LlamaCppReplicaConfig,
    VllmReplicaConfig,
    SimReplicaConfig,
    BedrockReplicaConfig,
)
LOCAL_REPLICA_CLASSES: tuple[type[LocalReplicaConfig], ...] = (
    LlamaCppReplicaConfig,
    VllmReplicaConfig,
    SimReplicaConfig,
    BedrockReplicaConfig,
)
# The engines Fortress starts itself.
LOCAL_ENGINES: frozenset[str] = frozenset(_engine_name(c) for c in LOCAL_REPLICA_CLASSES)
# Every engine name, for the union's tags and error messages.
ENGINE_NAMES: tuple[str, ...] = tuple(_engine_name(c) for c in REPLICA_CLASSES)


def _engine_of(v: Any) -> Any:
    """The union's discriminator: a mapping's ``engine`` key (missing: external), or the
    ``engine`` of a config object."""
    if isinstance(v, Mapping):
        return v.get("engine") or _engine_name(ExternalReplicaConfig)
    return getattr(v, "engine", None)


ReplicaConfig = Annotated[
    Annotated[ExternalReplicaConfig, Tag(_engine_name(ExternalReplicaConfig))]
    | Annotated[LlamaCppReplicaConfig, Tag(_engine_name(LlamaCppReplicaConfig))]
    | Annotated[VllmReplicaConfig, Tag(_engine_name(VllmReplicaConfig))]
    | Annotated[SimReplicaConfig, Tag(_engine_name(SimReplicaConfig))]
    | Annotated[BedrockReplicaConfig, Tag(_engine_name(BedrockReplicaConfig))],
    Discriminator(_engine_of),
]
"""One configured replica: the config class is chosen by its ``engine``."""
