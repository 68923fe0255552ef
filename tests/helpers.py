"""Shared test helpers: free ports, processes, waiting for HTTP, OpenAI schema validation."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = json.loads((ROOT / "tests" / "conformance" / "openai-schemas.json").read_text())
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator({"$ref": f"#/$defs/{name}", "$defs": SCHEMAS["$defs"]})


def assert_schema(obj: Any, name: str) -> None:
    """Fail with every schema violation listed."""
    errs = sorted(validator(name).iter_errors(obj), key=lambda e: list(e.path))
    assert not errs, f"{name} violations: " + "; ".join(
        f"{'/'.join(map(str, e.path))}: {e.message}" for e in errs[:5]
    )


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_post(
    url: str, body: bytes, headers: dict[str, str] | None = None, timeout: float = 30.0
) -> tuple[int, bytes]:
    """POST a JSON body; (status, body) for any status."""
    req = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


AUDIT_HEADERS = {"x-llm-source": "tests", "x-llm-user": "alice", "x-llm-request-type": "chat"}


def wait_http(url: str, status: int = 200, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            code, _ = http_get(url, timeout=1.0)
            if code == status:
                return
            last = code
        except OSError as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer {status} within {timeout}s (last: {last})")


def wait_for(pred: Any, timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Proc:
    """A child process started for a test, killed (with its group) at the end."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.log = log
        self._fh = open(log, "ab")
        self.p = subprocess.Popen(
            argv,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
            cwd=ROOT,
        )

    @property
    def pid(self) -> int:
        return self.p.pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.p.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.p.wait(5)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.kill(signal.SIGTERM)
        if self.p.poll() is None:
            self.kill(signal.SIGKILL)
        self._fh.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def sim_argv(port: int, model: str = "sim-model", *extra: str) -> list[str]:
    return [PYTHON, "-m", "fortress.sim", "--port", str(port), "--model", model, *extra]


def fortress_argv(*args: str) -> list[str]:
    return [PYTHON, "-m", "fortress.cli.main", *args]


@contextlib.contextmanager
def processes() -> Iterator[list[Proc]]:
    procs: list[Proc] = []
    try:
        yield procs
    finally:
        for p in procs:
            p.stop()


def replica_table(gateway_url: str) -> dict[str, dict[str, Any]]:
    """name → replica snapshot from the gateway's admin API."""
    _, body = http_get(gateway_url + "/admin/replicas")
    data = json.loads(body)
    return {r["url"]: r for pool in data["pools"] for r in pool["replicas"]}


# -- processes seen through /proc (no psutil) ---------------------------------------------


def proc_state(pid: int) -> str | None:
    """The kernel's state letter of ``pid`` (R, S, Z, ...), or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat[stat.rindex(")") + 2]


def alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone."""
    state = proc_state(pid)
    return state is not None and state not in ("Z", "X")


def children_of(pid: int) -> list[int]:
    """Live direct children of ``pid``, from /proc/*/stat."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            out.append(int(entry.name))
    return out


def write_up_config(
    directory: Path, model: str, replica: dict[str, Any], keys_and_audit: bool = False, **pool: Any
) -> Path:
    """A fortress.yaml for ``fortress up -c``: one pool of local replicas, state under
    ``directory``; API keys and audit off unless asked for (the tests send neither)."""
    doc: dict[str, Any] = {
        "state_dir": str(directory / "state"),
        "pools": [{"model": model, **pool, "replicas": [replica]}],
    }
    if not keys_and_audit:
        doc["auth"] = {"enabled": False}
        doc["audit"] = {"enabled": False}
    path = directory / "fortress.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path
