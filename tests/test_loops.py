"""fortress.core.loops: the running loop and task without asyncio's per-call lookup."""

from __future__ import annotations

import asyncio
import threading

import pytest
import uvloop

from fortress.core import loops


def test_running_loop_is_asyncios_in_each_loop_and_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = asyncio.get_running_loop

    def counting() -> asyncio.AbstractEventLoop:
        nonlocal calls
        calls += 1
        return real()

    monkeypatch.setattr(loops.asyncio, "get_running_loop", counting)

    async def main() -> tuple[asyncio.AbstractEventLoop, bool]:
        for _ in range(100):
            assert loops.running_loop() is real()
        task = loops.current_task()
        return loops.running_loop(), task is not None and task is asyncio.current_task(real())

    seen = []
    for run in (asyncio.run, uvloop.run, asyncio.run):  # a new loop each time, same thread
        before = calls
        loop, same_task = run(main())
        assert calls - before == 1  # looked up once per loop, then remembered
        assert same_task
        seen.append(loop)
    assert len({id(x) for x in seen}) == 3

    # Another thread's loop is its own, even while this thread's cache holds one.
    out: list[asyncio.AbstractEventLoop] = []
    thread = threading.Thread(target=lambda: out.append(asyncio.run(main())[0]))
    thread.start()
    thread.join()
    assert out and out[0] not in seen

    with pytest.raises(RuntimeError):
        loops.running_loop()  # no loop runs here now: asyncio's error
