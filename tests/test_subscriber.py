"""The subscriber's push path (frames written from inside the journal's append) and its
send deadline (a client that stops reading is dropped)."""

from __future__ import annotations

import asyncio

import pytest

from tokenrelay.journal.memory import MemoryJournal
from tokenrelay.subscriber import _Follower, _SendDeadline


async def test_a_push_that_completes_at_once_keeps_the_read_parked() -> None:
    loop = asyncio.get_running_loop()
    sent: list[bytes] = []

    async def send(message: dict) -> None:
        sent.append(message["body"])

    journal = MemoryJournal()
    await journal.create("s", {})
    follower = _Follower(0, send, None, _SendDeadline(loop, 5.0))
    read = loop.create_task(journal.read("s", 0, 30.0, follower=follower))
    await asyncio.sleep(0)  # let the read park
    await journal.append("s", [b"a", b"b"])
    await journal.append("s", [b"c"])
    assert sent == [b"ab", b"c"] and follower.pos == 3 and not read.done()
    await journal.finish("s", b"end", "complete")
    result = await read
    assert result.frames == [b"end"] and result.finished  # only what was not pushed


async def test_a_push_that_suspends_is_finished_by_the_send_loop_in_order() -> None:
    loop = asyncio.get_running_loop()
    sent: list[bytes] = []
    writable = asyncio.Event()

    async def send(message: dict) -> None:
        if message["body"] == b"b":
            await writable.wait()  # flow control: the client is not reading
        sent.append(message["body"])

    journal = MemoryJournal()
    await journal.create("s", {})
    follower = _Follower(0, send, None, _SendDeadline(loop, 5.0))
    read = loop.create_task(journal.read("s", 0, 30.0, follower=follower))
    await asyncio.sleep(0)
    await journal.append("s", [b"a"])
    await journal.append("s", [b"b"])  # suspends: the read returns to finish it
    result = await read
    assert follower.pending is not None and follower.pos == 2 and result.frames == []
    await journal.append("s", [b"c"])  # nobody parked: stays in the journal
    settle = loop.create_task(follower.settle())
    await asyncio.sleep(0)
    assert not settle.done() and sent == [b"a"]
    writable.set()
    await settle
    assert sent == [b"a", b"b"] and follower.pending is None
    rest = await journal.read("s", follower.pos, 0)
    assert rest.frames == [b"c"]


async def test_a_suspended_push_past_the_send_timeout_raises_timeout_error() -> None:
    loop = asyncio.get_running_loop()
    deadline = _SendDeadline(loop, 0.05)

    async def never_drains(message: dict) -> None:
        await loop.create_future()

    follower = _Follower(0, never_drains, None, deadline)
    assert follower.push([b"x"]) is False and follower.pending is not None

    async def send_loop() -> None:
        await follower.settle()

    deadline.task = task = loop.create_task(send_loop())
    with pytest.raises(TimeoutError):
        await task
    deadline.close()


async def test_a_failed_push_is_raised_by_the_send_loop() -> None:
    loop = asyncio.get_running_loop()

    async def broken(message: dict) -> None:
        raise ConnectionResetError("gone")

    follower = _Follower(0, broken, None, _SendDeadline(loop, 5.0))
    assert follower.push([b"x"]) is False
    assert follower.push([b"y"]) is False  # refuses more once failed
    with pytest.raises(ConnectionResetError):
        await follower.settle()


async def test_a_send_left_suspended_is_closed_when_the_loop_ends() -> None:
    loop = asyncio.get_running_loop()
    cleaned: list[bool] = []

    async def stuck(message: dict) -> None:
        try:
            await loop.create_future()
        finally:
            cleaned.append(True)  # e.g. uvicorn's drain waiter leaves its Event

    follower = _Follower(0, stuck, None, _SendDeadline(loop, 5.0))
    assert follower.push([b"x"]) is False and follower.pending is not None
    follower.close()
    assert cleaned == [True] and follower.pending is None


async def test_a_write_stuck_past_the_send_timeout_raises_timeout_error() -> None:
    loop = asyncio.get_running_loop()
    deadline = _SendDeadline(loop, 0.05)

    async def never_drains(message: dict) -> None:
        await loop.create_future()

    async def writer() -> None:
        await deadline.send(never_drains, {"type": "http.response.body", "body": b"x"})

    deadline.task = task = loop.create_task(writer())
    with pytest.raises(TimeoutError):
        await task
    deadline.close()


async def test_quick_writes_pass_and_other_cancels_stay_cancels() -> None:
    loop = asyncio.get_running_loop()
    deadline = _SendDeadline(loop, 30.0)
    sent: list[bytes] = []
    stuck = asyncio.Event()

    async def send(message: dict) -> None:
        sent.append(message["body"])
        if message["body"] == b"stuck":
            stuck.set()
            await loop.create_future()

    async def writer() -> None:
        for body in (b"a", b"b", b"stuck"):
            await deadline.send(send, {"type": "http.response.body", "body": body})

    deadline.task = task = loop.create_task(writer())
    await stuck.wait()
    assert sent == [b"a", b"b", b"stuck"] and deadline.started > 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert deadline.started == 0.0
    deadline.close()
