"""The ``fortress`` command as an operator meets it: finding config and state, read-only
commands that create nothing, JSON output, help, piped tables, one gateway per state dir,
and what ``fortress up`` prints where."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from conftest import Cluster
from helpers import AUDIT_HEADERS, fortress_argv, free_port, http_post, wait_for, wait_http

from fortress.cli.common import ExitCode
from fortress.cli.main import app
from fortress.config.loader import find_config

KEY_RE = re.compile(r"fk_\w+")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any FORTRESS_* setting of the caller's: each test says its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORTRESS")}
    return {**env, **extra}


def fortress(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        fortress_argv(*args),
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def write_config(directory: Path, name: str = "fortress.yaml", **doc: Any) -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(doc))
    return path


# -- finding the config ----------------------------------------------------------------------


def test_config_discovery_order(tmp_path: Path) -> None:
    local = write_config(tmp_path, state_dir="local")
    named = write_config(tmp_path, "named.yaml", state_dir="named")
    given = write_config(tmp_path, "given.yaml", state_dir="given")
    env = {"FORTRESS_CONFIG": str(named)}
    assert find_config(given, env, tmp_path) == (given, "-c")
    assert find_config(None, env, tmp_path) == (named, "FORTRESS_CONFIG")
    assert find_config(None, {}, tmp_path) == (local, "./fortress.yaml")
    local.unlink()
    assert find_config(None, {}, tmp_path) == (None, "defaults")


def test_every_command_finds_the_same_state_by_the_same_order(tmp_path: Path) -> None:
    """-c beats FORTRESS_CONFIG beats ./fortress.yaml beats the defaults; FORTRESS__* applies to
    each: the key lands in the store the discovered config names."""
    for name in ("local", "named", "given", "env"):
        (tmp_path / name).mkdir()
    write_config(tmp_path, state_dir=str(tmp_path / "local" / "state"))
    named = write_config(tmp_path, "named.yaml", state_dir=str(tmp_path / "named" / "state"))
    given = write_config(tmp_path, "given.yaml", state_dir=str(tmp_path / "given" / "state"))
    env = clean_env(FORTRESS_CONFIG=str(named))

    def create(name: str, *args: str, env: dict[str, str] | None = None) -> None:
        out = fortress(tmp_path, "keys", "create", "--name", name, "--json", *args, env=env)
        assert out.returncode == 0, out.stderr

    create("by-c", "-c", str(given), env=env)
    create("by-env", env=env)
    create("by-cwd")
    override = clean_env(FORTRESS__STATE_DIR=str(tmp_path / "env" / "state"))
    create("by-override", env=override)  # ./fortress.yaml, its state_dir overridden
    for where, name in (("given", "by-c"), ("named", "by-env"), ("local", "by-cwd"), ("env", "by-override")):
        cfg = write_config(tmp_path / where, "check.yaml", state_dir=str(tmp_path / where / "state"))
        listed = fortress(tmp_path, "keys", "list", "--json", "-c", str(cfg))
        assert listed.returncode == 0, listed.stderr
        assert [k["name"] for k in json.loads(listed.stdout)] == [name]
    # No file anywhere: the defaults, i.e. ./.fortress of the working directory.
    bare = tmp_path / "bare"
    bare.mkdir()
    out = fortress(bare, "keys", "create", "--name", "by-default", "--json")
    assert out.returncode == 0, out.stderr
    assert (bare / ".fortress" / "fortress.db").exists()


def test_keys_create_then_list_without_c_from_the_config_directory(tmp_path: Path) -> None:
    """The finding of issue 11: `keys create -c fortress.yaml` then `keys list` (no -c) in the
    same directory must see the same key, and no second .fortress/ appears."""
    write_config(tmp_path, state_dir=str(tmp_path / "state"))
    created = fortress(tmp_path, "keys", "create", "-c", "fortress.yaml", "--name", "bot", "--json")
    assert created.returncode == 0, created.stderr
    rec = json.loads(created.stdout)
    assert KEY_RE.fullmatch(rec["key"]) and rec["plan"] == "default"
    listed = fortress(tmp_path, "keys", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [(k["id"], k["name"]) for k in json.loads(listed.stdout)] == [(rec["id"], "bot")]
    assert "key" not in json.loads(listed.stdout)[0]  # the plaintext only once, at creation
    assert not (tmp_path / ".fortress").exists()


# -- read-only commands create nothing -----------------------------------------------------------


@pytest.mark.parametrize("with_file", [True, False], ids=["fortress.yaml", "defaults"])
def test_read_only_commands_create_no_state(tmp_path: Path, with_file: bool) -> None:
    state = tmp_path / "state" if with_file else tmp_path / ".fortress"
    if with_file:
        write_config(tmp_path, state_dir=str(state))
    dead = f"http://127.0.0.1:{free_port()}"
    no_store = [
        ("keys", "list"),
        ("keys", "list", "--json"),
        ("keys", "show", "key_0123456789abcdef"),
        ("keys", "revoke", "key_0123456789abcdef"),
        ("keys", "rotate", "key_0123456789abcdef"),
        ("audit", "query"),
        ("audit", "query", "--json"),
        ("audit", "export"),
        ("audit", "verify"),
    ]
    for args in no_store:
        out = fortress(tmp_path, *args)
        assert out.returncode == ExitCode.NO_STORE, (args, out.stdout, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: no store at"), (args, out.stderr)
        assert "Traceback" not in out.stderr
    for args in (("status",), ("status", "--url", dead), ("alarms",), ("alarms", "list", "--json")):
        out = fortress(tmp_path, *args, env=clean_env(FORTRESS__SERVER__PORT=dead.rsplit(":", 1)[1]))
        assert out.returncode == ExitCode.FAILED, (args, out.stderr)
        assert "cannot reach the gateway at " + dead in out.stderr
    assert not state.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["fortress.yaml"] if with_file else [])


# -- output for people and for scripts -----------------------------------------------------------


def test_json_output_parses_and_piped_tables_are_not_cut(tmp_path: Path) -> None:
    write_config(tmp_path, state_dir=str(tmp_path / "state"))
    long_name = "a-key-with-a-name-far-longer-than-any-terminal-is-wide-" + "x" * 80
    env = clean_env(COLUMNS="40")  # a pipe must not inherit a narrow width either
    created = fortress(tmp_path, "keys", "create", "--name", long_name, "--model", "m1", "--json", env=env)
    assert created.returncode == 0, created.stderr
    rec = json.loads(created.stdout)
    assert rec["name"] == long_name and rec["models"] == ["m1"] and rec["key"].startswith("fk_")

    shown = json.loads(fortress(tmp_path, "keys", "show", rec["id"], "--json").stdout)
    assert shown["id"] == rec["id"] and shown["usage"] is None and "key" not in shown
    assert json.loads(fortress(tmp_path, "audit", "query", "--json").stdout) == []

    for args in (("keys", "list"), ("keys", "show", rec["id"])):
        table = fortress(tmp_path, *args, env=env)
        assert table.returncode == 0, table.stderr
        assert long_name in table.stdout, table.stdout  # on one line, not folded or cut with …
        assert "\x1b[" not in table.stdout  # no colour codes into a pipe

    rotated = fortress(tmp_path, "keys", "rotate", rec["id"], "--grace", "0", "--json")
    assert rotated.returncode == 0, rotated.stderr
    assert json.loads(rotated.stdout)["key"] not in (None, rec["key"])
    assert fortress(tmp_path, "keys", "create", "--name", "x", "--plan", "nope").returncode == ExitCode.USAGE


def test_version() -> None:
    out = subprocess.run(fortress_argv("--version"), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"fortress {version('fortress')}"


def _walk(command: Any, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
    yield path
    for name, sub in getattr(command, "commands", {}).items():  # a group's subcommands
        yield from _walk(sub, (*path, name))


def test_every_command_and_group_has_an_example_in_its_help() -> None:
    from typer.testing import CliRunner

    paths = list(_walk(typer.main.get_command(app), ()))
    assert {("keys",), ("audit",), ("alarms",), ("alarms", "list"), ("keys", "create")} <= set(paths)
    missing = []
    for path in paths:
        result = CliRunner().invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        if "Example" not in result.output:
            missing.append(" ".join(("fortress", *path)))
    assert not missing, f"no example in the help of: {', '.join(missing)}"


# -- one gateway per state dir -------------------------------------------------------------------


def test_a_second_gateway_on_a_used_state_dir_stops_before_loading_anything(
    cluster: Cluster, tmp_path: Path
) -> None:
    sim, _ = cluster.sim()
    state = tmp_path / "state"
    config = (
        f"state_dir: {state}\nauth: {{enabled: false}}\naudit: {{enabled: false}}\n"
        f"pools: [{{model: sim-model, replicas: [{{url: '{sim}'}}]}}]\n"
    )
    gw, first = cluster.gateway(config)
    assert (state / "gateway.lock").read_text().strip() == str(first.pid)
    path = tmp_path / "second.yaml"
    path.write_text(config)
    t0 = time.monotonic()
    second = fortress(tmp_path, "serve", "-c", str(path), "--port", str(free_port()))
    assert second.returncode == ExitCode.STATE_DIR_IN_USE, second.stderr
    assert time.monotonic() - t0 < 20
    assert second.stderr.strip() == (
        f"error: state dir {state.resolve()} is in use by pid {first.pid} (another gateway runs on it); "
        "stop it, or give this one another state_dir"
    )
    assert second.stdout == ""
    # `up` on the same dir stops before its replica starts: no simulator process, no log.
    up_cfg = write_config(
        tmp_path,
        "up.yaml",
        state_dir=str(state),
        auth={"enabled": False},
        audit={"enabled": False},
        pools=[{"model": "sim-model", "replicas": [{"engine": "sim"}]}],
    )
    up = fortress(tmp_path, "up", "-c", str(up_cfg), "--port", str(free_port()), "-q")
    assert up.returncode == ExitCode.STATE_DIR_IN_USE, up.stderr
    assert len(up.stderr.strip().splitlines()) == 1 and "Traceback" not in up.stderr
    assert not (state / "logs").exists()
    wait_http(gw + "/health", timeout=5)  # the first one is untouched
    # The lock goes with the process: once the first stops, the dir is free again.
    first.stop()
    again = subprocess.Popen(
        fortress_argv("serve", "-c", str(path), "--port", str(port := free_port())),
        env=clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", timeout=20)
    finally:
        os.killpg(again.pid, signal.SIGTERM)
        again.wait(20)


# -- fortress up: what goes where ----------------------------------------------------------------


class Up:
    """`fortress up` with stdout and stderr kept apart (both files, so neither is a terminal)."""

    def __init__(self, tmp: Path, config: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        n = len(list(tmp.glob("up-*.out")))
        self.out, self.err = tmp / f"up-{n}.out", tmp / f"up-{n}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.p = subprocess.Popen(
                fortress_argv("up", "-c", str(config), "--port", str(self.port), "-q", *extra),
                stdout=out,
                stderr=err,
                env=clean_env(),
                start_new_session=True,
            )
        try:
            wait_for(lambda: "print(reply.choices" in self.stderr(), timeout=30, what="the banner")
        except AssertionError:
            self.stop()
            raise AssertionError("fortress up did not start:\n" + self.stderr()[-3000:]) from None

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def stop(self) -> None:
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGINT)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(5)


def test_up_banner_goes_to_stderr_and_the_first_key_only_where_someone_reads_it(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        state_dir=str(tmp_path / "state"),
        pools=[{"model": "sim-model", "replicas": [{"engine": "sim"}]}],
    )
    # stderr is a file: the banner is there, stdout has none of it, and no key is made.
    up = Up(tmp_path, config)
    try:
        err, out = up.stderr(), up.stdout()
        assert f"Fortress is ready: {up.url}/v1" in err and "Fortress is ready" not in out
        assert "curl " not in out and "from openai import OpenAI" not in out
        assert not KEY_RE.search(err) and not KEY_RE.search(out)
        assert "fortress keys create --name me --plan operator -c " + str(config) in err
        assert '"max_tokens": 64' in err and "max_tokens=64" in err
    finally:
        up.stop()
    listed = fortress(tmp_path, "keys", "list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr

    # --show-key: the first key, on the unlimited operator plan, printed once on stderr.
    up = Up(tmp_path, config, "--show-key")
    try:
        err = up.stderr()
        shown = re.search(r"^    (fk_\w+)$", err, re.M)
        assert shown is not None, err[-3000:]
        key = shown.group(1)
        assert key not in up.stdout() and "plan operator" in err
        assert f"Authorization: Bearer {key}" in err and f'api_key="{key}"' in err
        # The seed's plan (5/s, burst 10) would answer some of these 429; the operator's does not.
        body = json.dumps(
            {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        ).encode()
        headers = {"Authorization": f"Bearer {key}", **AUDIT_HEADERS}
        with ThreadPoolExecutor(16) as pool:
            statuses = list(
                pool.map(lambda _: http_post(up.url + "/v1/chat/completions", body, headers)[0], range(32))
            )
        assert statuses == [200] * 32, statuses
        # stdout is left to the access log: JSON lines only, no banner among them.
        assert all(json.loads(line) for line in up.stdout().splitlines())
    finally:
        up.stop()
    (rec,) = json.loads(fortress(tmp_path, "keys", "list", "--json").stdout)
    assert rec["plan"] == "operator" and rec["name"] == "first-key"
    # Other keys still get the seed's plan.
    other = json.loads(fortress(tmp_path, "keys", "create", "--name", "app", "--json").stdout)
    assert other["plan"] == "default"
