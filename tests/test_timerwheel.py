"""tokenrelay.timerwheel: coarse deadlines sharing one loop timer per tick."""

from __future__ import annotations

import asyncio

from tokenrelay import timerwheel


async def test_a_deadline_fires_after_its_time_never_before():
    loop = asyncio.get_running_loop()
    fired = loop.create_future()
    when = loop.time() + 0.03
    timerwheel.call_at(loop, when, lambda: fired.set_result(loop.time()))
    at = await asyncio.wait_for(fired, 5)
    assert at >= when - 0.001  # the loop clock's own resolution is a millisecond


async def test_deadlines_of_one_tick_share_one_loop_timer(monkeypatch):
    loop = asyncio.get_running_loop()
    timers = []
    real_call_at = loop.call_at

    def counting_call_at(when, callback, *args, **kwargs):
        if getattr(callback, "__name__", "") == "_fire":  # the wheel's, not wait_for's
            timers.append(when)
        return real_call_at(when, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", counting_call_at)
    base = (int(loop.time() / timerwheel.TICK) + 2) * timerwheel.TICK
    fired: list[int] = []
    done = loop.create_future()
    for i in range(100):  # all inside one tick
        timerwheel.call_at(loop, base + 0.0001 + i * 0.0003, fired.append, i)
    timerwheel.call_at(loop, base + timerwheel.TICK + 0.001, done.set_result, None)
    await asyncio.wait_for(done, 5)
    assert fired == list(range(100))  # in the order they were set
    assert len(timers) == 2


async def test_a_cancelled_deadline_does_not_fire_and_others_do():
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    done = loop.create_future()
    when = loop.time() + 0.02
    timerwheel.call_at(loop, when, fired.append, "a")
    timerwheel.call_at(loop, when, fired.append, "b").cancel()
    timerwheel.call_at(loop, when, done.set_result, None)
    await asyncio.wait_for(done, 5)
    assert fired == ["a"]


async def test_a_failing_callback_is_reported_and_the_rest_still_run():
    loop = asyncio.get_running_loop()
    reported: list[dict] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    done = loop.create_future()
    when = loop.time() + 0.02

    def boom() -> None:
        raise RuntimeError("boom")

    timerwheel.call_at(loop, when, boom)
    timerwheel.call_at(loop, when, done.set_result, "ran")
    assert await asyncio.wait_for(done, 5) == "ran"
    assert [type(c["exception"]) for c in reported] == [RuntimeError]


def test_each_loop_has_its_own_wheel():
    results = []
    for _ in range(2):
        async def main() -> None:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            timerwheel.call_at(loop, loop.time(), fut.set_result, "fired")
            results.append(await asyncio.wait_for(fut, 5))

        asyncio.run(main())
    assert results == ["fired", "fired"]


async def test_cancelled_deadlines_do_not_pile_up_until_their_tick():
    # Most deadlines are cancelled long before their time; kept until their tick they
    # were objects for the garbage collector to walk, ~8 per short request.
    loop = asyncio.get_running_loop()
    fired: list[int] = []
    done = loop.create_future()
    when = loop.time() + 0.2
    deadlines = [timerwheel.call_at(loop, when, fired.append, i) for i in range(200)]
    timerwheel.call_at(loop, when + timerwheel.TICK, done.set_result, None)
    for i, deadline in enumerate(deadlines):
        if i % 20:
            deadline.cancel()
            deadline.cancel()  # twice counts once
    [due] = [t for t in timerwheel._wheels[loop]._ticks.values() if len(t) > 1]
    assert len(due) <= 2 * timerwheel._COMPACT_AT  # 10 live ones and the latest cancelled
    assert all(d.tick is None for i, d in enumerate(deadlines) if i % 20)
    await asyncio.wait_for(done, 5)
    assert fired == list(range(0, 200, 20))
    assert all(d.tick is None for d in deadlines)  # no cycle left with a fired tick
