"""The supervisor: restart policy (fake clock), and real ``fortress sim`` processes that it
starts, restarts, gives up on, stops, and never leaves behind."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import (
    Proc,
    alive,
    children_of,
    fortress_argv,
    free_port,
    http_get,
    wait_for,
    wait_http,
    write_up_config,
)
from pydantic import ValidationError

from fortress.config import SimOptions, parse_config
from fortress.fleet.supervisor import ProcState, RestartPolicy, Supervisor, SupervisorError
from fortress.routing.pool import Router
from fortress.routing.replica import OriginKind, State
from fortress.runtime import Runtime

# -- the restart policy, with a fake clock -------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_backoff_doubles_then_gives_up_after_too_many_crashes_in_window() -> None:
    clock = FakeClock()
    p = RestartPolicy(backoff_initial=1, backoff_max=30, max_crashes=5, window=60, clock=clock)
    delays = []
    for _ in range(4):
        p.started()
        clock.now += 0.5  # crashes half a second after each start
        delays.append(p.crashed())
        clock.now += delays[-1]
    assert delays == [1, 2, 4, 8]
    assert not p.failed and p.recent_crashes == 4
    p.started()
    clock.now += 0.5
    assert p.crashed() is None  # the 5th crash within 60 s
    assert p.failed


def test_backoff_is_capped() -> None:
    clock = FakeClock()
    p = RestartPolicy(backoff_initial=1, backoff_max=30, max_crashes=1000, window=60, clock=clock)
    delays = []
    for _ in range(8):
        p.started()
        delays.append(p.crashed())
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]


def test_crashes_spread_beyond_the_window_never_give_up() -> None:
    clock = FakeClock()
    p = RestartPolicy(backoff_initial=1, backoff_max=30, max_crashes=3, window=60, clock=clock)
    for _ in range(20):
        p.started()
        clock.now += 31  # two crashes per window at most
        assert p.crashed() is not None
    assert not p.failed and p.recent_crashes == 2


def test_a_stable_run_resets_the_backoff() -> None:
    clock = FakeClock()
    p = RestartPolicy(
        backoff_initial=1, backoff_max=30, max_crashes=10, window=60, stable_after=60, clock=clock
    )
    p.started()
    assert p.crashed() == 1
    p.started()
    assert p.crashed() == 2
    p.started()
    clock.now += 120  # ran fine for two minutes
    assert p.crashed() == 1
    p.started()
    clock.now += 5
    assert p.crashed() == 2


def test_policy_from_replica_options() -> None:
    opts = SimOptions.model_validate(
        {"max_crashes": 3, "crash-window": "10s", "backoff_initial": 0.5, "backoff_max": 4, "stable_after": 7}
    )
    p = RestartPolicy.from_config(opts)
    assert (p.max_crashes, p.window, p.backoff_initial, p.backoff_max, p.stable_after) == (3, 10, 0.5, 4, 7)
    assert RestartPolicy.from_config(SimOptions()).stable_after == 60  # the crash window by default
    with pytest.raises(ValidationError, match="max_crashes"):  # bad values fail in the config
        SimOptions.model_validate({"max_crashes": "many"})


# -- real processes ------------------------------------------------------------------------

FAST = {"backoff_initial": 0.1, "backoff_max": 0.5, "stop_timeout": 5}


def make_supervisor(
    tmp: Path,
    options: dict[str, Any],
    count: int = 1,
    deregistration_delay: float = 5.0,
    **supervisor_kw: Any,
) -> tuple[Router, Supervisor]:
    doc = {
        "pools": [
            {
                "model": "sim-model",
                "deregistration_delay": deregistration_delay,
                "replicas": [{"engine": "sim", "count": count, "options": {**FAST, **options}}],
            }
        ]
    }
    doc |= {"auth": {"enabled": False}, "audit": {"enabled": False}, "observe": {"enabled": False}}
    # The runtime is the supervisor's listener, as in `fortress up`: it keeps the router in step.
    runtime = Runtime(parse_config(yaml.safe_dump(doc), env={}))
    router = runtime.router
    sup = Supervisor(router.planned, runtime, state_dir=tmp, poll_interval=0.05, **supervisor_kw)
    return router, sup


@pytest.fixture
async def supervised(tmp_path: Path) -> AsyncIterator[Callable[..., tuple[Router, Supervisor]]]:
    made: list[Supervisor] = []

    def make(options: dict[str, Any] | None = None, **kw: Any) -> tuple[Router, Supervisor]:
        router, sup = make_supervisor(tmp_path, options or {}, **kw)
        made.append(sup)
        return router, sup

    yield make
    for sup in made:
        await sup.stop()


async def until(pred: Callable[[], bool], within: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


def replica_urls(router: Router) -> list[str]:
    return [r.url for r in router.all_replicas()]


async def test_start_registers_ready_processes_as_initial(
    supervised: Callable[..., Any], tmp_path: Path
) -> None:
    router, sup = supervised(count=2)
    assert await sup.start() == []
    a, b = sup.slots
    assert a.name == "sim-model-1" and b.name == "sim-model-2"
    assert a.state is ProcState.RUNNING and b.state is ProcState.RUNNING
    assert a.port != b.port
    assert sorted(replica_urls(router)) == sorted([a.url, b.url])
    for slot in sup.slots:
        assert alive(slot.pid)
        replica = router.replica_named(slot.name)
        assert replica is not None and replica.url == slot.url
        assert replica.origin.kind is OriginKind.LOCAL and replica.origin.pid == slot.pid
        assert replica.origin.engine == "sim" and replica.incarnation == slot.incarnation == 1
        assert replica.state is State.INITIAL  # traffic only once the health checker agrees
        assert http_get(slot.url + "/health")[0] == 200
        assert (tmp_path / "logs" / f"{slot.name}.log").exists()
    status = {row["name"]: row for row in sup.status()}
    assert status["sim-model-1"]["state"] == "running" and status["sim-model-1"]["pid"] == a.pid


async def test_restarts_a_killed_replica_under_its_name_as_the_next_incarnation(
    supervised: Callable[..., Any],
) -> None:
    router, sup = supervised()
    await sup.start()
    slot = sup.slots[0]
    old_pid, old_replica = slot.pid, router.replica_named(slot.name)
    assert old_replica is not None
    old_replica.served = 5
    os.kill(old_pid, signal.SIGKILL)
    await until(lambda: slot.restarts == 1 and slot.state is ProcState.RUNNING, what="a restart")
    assert slot.pid != old_pid and alive(slot.pid) and not alive(old_pid)
    assert slot.exit_codes[-1] == -signal.SIGKILL
    assert old_replica not in list(router.all_replicas())  # the dead process's replica is gone
    new = router.replica_named(slot.name)
    assert new is not None and new is not old_replica and list(router.all_replicas()) == [new]
    assert (new.name, new.incarnation, slot.incarnation, new.origin.pid) == (slot.name, 2, 2, slot.pid)
    assert new.served == 5  # its counters carry over: one series per name
    assert new.state is State.INITIAL  # the new process must pass a check again
    assert http_get(slot.url + "/health")[0] == 200
    log = slot.log_path.read_text()
    assert f"pid {old_pid} exited with status -9" in log and log.count("=== fortress: starting") == 2


async def test_restarts_a_replica_that_crashes_mid_stream(supervised: Callable[..., Any]) -> None:
    _, sup = supervised({"crash_after": 2, "itl": 0.01})
    await sup.start()
    slot = sup.slots[0]
    old_pid = slot.pid
    body = json.dumps({"model": "sim-model", "prompt": "x", "stream": True}).encode()
    req = urllib.request.Request(slot.url + "/v1/completions", body, {"Content-Type": "application/json"})

    def stream() -> None:
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                resp.read()
        except (OSError, http.client.HTTPException):
            pass  # the replica dies mid-stream: that is the point

    await asyncio.to_thread(stream)
    await until(lambda: slot.restarts == 1 and slot.state is ProcState.RUNNING, what="a restart")
    assert slot.exit_codes[-1] == 1 and slot.pid != old_pid


async def test_gives_up_after_too_many_crashes_and_marks_failed(supervised: Callable[..., Any]) -> None:
    # `--tokens 0` is refused by the simulator's CLI: the process exits with status 2 at once,
    # every time, as a misconfigured engine would.
    router, sup = supervised({"extra_args": ["--tokens", "0"], "max_crashes": 3, "crash_window": 60})
    t0 = time.monotonic()
    failed = await sup.start()
    slot = sup.slots[0]
    assert failed == [slot]
    assert slot.state is ProcState.FAILED
    assert "gave up after 3 crashes in 60s" in slot.detail and "status 2" in slot.detail
    assert list(slot.exit_codes) == [2, 2, 2]
    assert slot.restarts == 2
    assert list(router.all_replicas()) == []  # never registered
    assert sup.status()[0]["state"] == "failed" and sup.status()[0]["pid"] is None
    assert time.monotonic() - t0 < 15
    await asyncio.sleep(0.5)
    assert slot.restarts == 2 and list(slot.exit_codes) == [2, 2, 2]  # and it stays given up


async def test_logs_rotate_by_size(supervised: Callable[..., Any], tmp_path: Path) -> None:
    # Each failed start writes the simulator's usage error (~1 kB): 4 starts, 1.5 kB per file.
    options = {"extra_args": ["--tokens", "0"], "max_crashes": 4}
    _, sup = supervised(options, log_max_bytes=1500, log_backups=2)
    await sup.start()
    logs = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert logs == ["sim-model-1.log", "sim-model-1.log.1", "sim-model-1.log.2"]  # only 2 kept
    for name in logs:
        assert (tmp_path / "logs" / name).stat().st_size <= 1500 + 1024
    assert "exited with status 2" in (tmp_path / "logs" / "sim-model-1.log").read_text()


async def test_graceful_stop_drains_first_and_leaves_no_process(supervised: Callable[..., Any]) -> None:
    router, sup = supervised(count=2, deregistration_delay=0.6)
    await sup.start()
    pids = [s.pid for s in sup.slots]
    replica = router.replica_named(sup.slots[0].name)
    assert replica is not None
    replica.in_flight = 1  # a request still running: the drain waits up to the delay for it
    stop = asyncio.create_task(sup.stop())
    await until(lambda: replica.state is State.DRAINING, within=2, what="draining")
    assert alive(pids[0]), "the process must keep serving while it drains"
    t0 = time.monotonic()
    await stop
    assert time.monotonic() - t0 >= 0.4
    assert all(s.state is ProcState.STOPPED for s in sup.slots)
    assert list(router.all_replicas()) == []
    for pid in pids:
        assert not alive(pid)
        with pytest.raises(ProcessLookupError):  # reaped too: not even a zombie
            os.kill(pid, 0)
    # SIGTERM was enough: the simulator shut down on its own (status 0), no SIGKILL needed.
    assert [s.exit_codes[-1] for s in sup.slots] == [0, 0]


async def test_stop_slot_drains_and_stops_one_and_start_slot_brings_it_back(
    supervised: Callable[..., Any],
) -> None:
    router, sup = supervised(count=2, deregistration_delay=0.5)
    await sup.start()
    one, two = sup.slots
    pid_one, pid_two = one.pid, two.pid
    replica = router.replica_named(one.name)
    assert replica is not None
    replica.in_flight = 1  # the drain waits for it (up to the deregistration delay)
    stop = asyncio.create_task(sup.stop_slot(one.name))
    await until(lambda: replica.state is State.DRAINING, within=2, what="draining")
    assert alive(pid_one)
    await stop
    assert one.state is ProcState.STOPPED and not alive(pid_one)
    assert [r.name for r in router.all_replicas()] == [two.name]  # the other keeps serving
    await asyncio.sleep(0.5)
    assert one.state is ProcState.STOPPED and one.restarts == 0  # a stop is not a crash
    assert two.state is ProcState.RUNNING and two.pid == pid_two and alive(pid_two)
    assert await sup.start_slot(one.name)
    back = router.replica_named(one.name)
    assert back is not None and back.incarnation == 2 and alive(one.pid) and one.pid != pid_one
    with pytest.raises(SupervisorError, match="no local replica slot"):
        await sup.stop_slot("nope")
    await sup.stop()
    with pytest.raises(SupervisorError, match="stopping"):
        await sup.start_slot(one.name)
    assert not alive(one.pid) and not alive(pid_two)


async def test_sigkill_after_stop_timeout_when_sigterm_is_ignored(
    supervised: Callable[..., Any], tmp_path: Path
) -> None:
    # A simulator that ignores SIGTERM, like a server stuck in a CUDA call.
    wrapper = tmp_path / "stubborn-python"
    wrapper.write_text(
        f"#!{sys.executable}\n"
        "import functools, signal, sys\n"
        "from aiohttp import web\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "web.run_app = functools.partial(web.run_app, handle_signals=False)\n"
        "sys.argv = ['sim', *sys.argv[3:]]  # drop '-m fortress.sim'\n"
        "from fortress.sim.command import main\n"
        "main()\n"
    )
    wrapper.chmod(0o755)
    _, sup = supervised({"binary": str(wrapper), "stop_timeout": 1})
    assert await sup.start() == []
    pid = sup.slots[0].pid
    t0 = time.monotonic()
    await sup.stop()
    assert 0.9 <= time.monotonic() - t0 < 5
    assert not alive(pid) and sup.slots[0].exit_codes[-1] == -signal.SIGKILL


# -- `fortress up` as the parent process ---------------------------------------------------


def up_config(tmp: Path, count: int) -> Path:
    return write_up_config(
        tmp, "sim-model", {"engine": "sim", "count": count}, health_check={"interval": 0.5, "timeout": 0.5}
    )


def start_up(tmp: Path, count: int = 2) -> tuple[Proc, str, list[int]]:
    port = free_port()
    proc = Proc(
        fortress_argv("up", "-c", str(up_config(tmp, count)), "--port", str(port), "-q"), tmp / "up.log"
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/ready", timeout=30)
        wait_for(lambda: len(children_of(proc.pid)) == count, timeout=5, what="replica processes")
    except AssertionError:
        proc.stop()
        raise AssertionError("fortress up did not start:\n" + proc.output()[-3000:]) from None
    return proc, url, children_of(proc.pid)


def test_sigkill_of_fortress_leaves_no_orphan_replicas(tmp_path: Path) -> None:
    proc, _, kids = start_up(tmp_path)
    try:
        assert all(alive(k) for k in kids)
        os.kill(proc.pid, signal.SIGKILL)  # no handler can run: the kernel must clean up
        wait_for(lambda: not any(alive(k) for k in kids), timeout=5, what="the replicas to die with fortress")
    finally:
        proc.stop()
        for k in kids:  # never leak them into the rest of the session, even on failure
            if alive(k):
                os.kill(k, signal.SIGKILL)


def test_sigterm_of_fortress_stops_everything_cleanly(tmp_path: Path) -> None:
    proc, url, kids = start_up(tmp_path)
    try:
        assert http_get(url + "/v1/models")[0] == 200
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.p.wait(15) == 0
        assert not any(alive(k) for k in kids)
        out = proc.output()
        assert "SIGTERM: stopping" in out and "Traceback" not in out
    finally:
        proc.stop()


def test_status_shows_the_supervised_processes_and_their_restarts(tmp_path: Path) -> None:
    proc, url, kids = start_up(tmp_path)
    try:
        os.kill(kids[0], signal.SIGKILL)

        def processes() -> list[dict]:
            out = subprocess.run(
                fortress_argv("status", "--url", url, "--json"), capture_output=True, text=True, timeout=30
            )
            assert out.returncode == 0, out.stderr
            return json.loads(out.stdout)["processes"]

        wait_for(
            lambda: (
                sum(p["restarts"] for p in processes()) == 1
                and all(p["state"] == "running" for p in processes())
            ),
            timeout=20,
            what="the killed replica to be restarted",
        )
        procs = processes()
        assert sorted(p["name"] for p in procs) == ["sim-model-1", "sim-model-2"]
        assert {p["pid"] for p in procs} == set(children_of(proc.pid)) and kids[0] not in {
            p["pid"] for p in procs
        }
        table = subprocess.run(
            fortress_argv("status", "--url", url), capture_output=True, text=True, timeout=30
        )
        assert "Local processes" in table.stdout and "sim-model-1" in table.stdout, table.stdout
    finally:
        proc.stop()
