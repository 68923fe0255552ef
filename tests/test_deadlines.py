"""The coarse timers behind the relay's watchdog and the connections' timeouts."""

from __future__ import annotations

import asyncio

from fortress.gateway.deadlines import Deadlines


async def test_fires_after_its_time_and_within_the_resolution() -> None:
    loop = asyncio.get_running_loop()
    dl = Deadlines(resolution=0.05)
    fired: list[tuple[str, float]] = []
    t0 = loop.time()
    for name, delay in (("c", 0.3), ("a", 0.1), ("b", 0.2)):
        dl.call_later(delay, lambda n=name: fired.append((n, loop.time() - t0)))
    await asyncio.sleep(0.5)
    assert [n for n, _ in fired] == ["a", "b", "c"]
    for (_, at), delay in zip(fired, (0.1, 0.2, 0.3), strict=True):
        assert delay <= at + 1e-3, (at, delay)  # never early
        assert at < delay + 0.05 + 0.05, (at, delay)  # late by at most the resolution (+ loop slack)
    assert len(dl) == 0


async def test_cancelled_ones_do_not_fire_and_leave_nothing_behind() -> None:
    dl = Deadlines(resolution=0.02)
    fired: list[int] = []
    handles = [dl.call_later(0.05, fired.append, i) for i in range(1000)]
    for h in handles[:999]:
        h.cancel()
    assert len(dl) == 1
    assert handles[0].cancelled and not handles[999].cancelled
    await asyncio.sleep(0.15)
    assert fired == [999]
    handles[999].cancel()  # cancelling a fired one is harmless
    assert len(dl) == 0


async def test_a_callback_may_arm_another_and_an_error_stops_nothing() -> None:
    loop = asyncio.get_running_loop()
    dl = Deadlines(resolution=0.02)
    fired: list[str] = []
    errors: list[object] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context.get("exception")))

    def first() -> None:
        fired.append("first")
        dl.call_later(0.05, fired.append, "second")

    def boom() -> None:
        raise ValueError("boom")

    dl.call_later(0.05, first)
    dl.call_later(0.05, boom)
    await asyncio.sleep(0.25)
    assert fired == ["first", "second"]
    assert len(errors) == 1 and isinstance(errors[0], ValueError)
    loop.set_exception_handler(None)


async def test_an_earlier_deadline_rearms_the_loop_timer() -> None:
    loop = asyncio.get_running_loop()
    dl = Deadlines(resolution=0.02)
    fired: list[float] = []
    t0 = loop.time()
    dl.call_later(5.0, fired.append, -1.0)
    dl.call_later(0.05, lambda: fired.append(loop.time() - t0))
    await asyncio.sleep(0.2)
    assert len(fired) == 1 and 0.05 <= fired[0] + 1e-3 < 0.15
    dl.close()
    assert len(dl) == 0
