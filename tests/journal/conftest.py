"""Fixtures of the journal contract suite: one parameter per backend.

``make_journal(**limits)`` builds journals of the backend under test. With Redis every
journal of one test shares a random key prefix on the shared server (127.0.0.1:6379), so
two journal objects behave like two instances; the keys are deleted afterwards (SCAN +
DEL of that prefix only, never FLUSHDB).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from support.processes import free_port
from support.redis_server import RedisServer, delete_prefix
from tokenrelay.config import JournalLimits
from tokenrelay.journal import open_journal
from tokenrelay.journal.base import Journal
from tokenrelay.journal.memory import MemoryJournal
from tokenrelay.journal.redis import RedisJournal

SHARED_REDIS = "redis://127.0.0.1:6379/0"

MakeJournal = Callable[..., Journal]


@pytest.fixture(params=["memory", "redis"])
async def make_journal(request: pytest.FixtureRequest) -> AsyncIterator[MakeJournal]:
    backend: str = request.param
    prefix = f"trtest:{secrets.token_hex(6)}:"
    built: list[Journal] = []
    memory: dict[JournalLimits, MemoryJournal] = {}

    def make(*, lease_s: float = 5.0, **limits: Any) -> Journal:
        journal_limits = JournalLimits(**limits)
        if backend == "memory":
            # One process shares one in-memory journal: "two instances" are the same object.
            if journal_limits not in memory:
                memory[journal_limits] = MemoryJournal(journal_limits)
                built.append(memory[journal_limits])
            return memory[journal_limits]
        journal = open_journal(SHARED_REDIS, journal_limits, prefix=prefix, lease_s=lease_s)
        built.append(journal)
        return journal

    yield make
    for journal in built:
        await journal.aclose()
    if backend == "redis":
        await delete_prefix(SHARED_REDIS, prefix)


async def until(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    """Poll a condition (sync or async) until true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def waiting(journal: Journal, stream_id: str, readers: int = 1) -> bool:
    """True once ``readers`` readers of ``stream_id`` are parked (white-box, per backend)."""
    if isinstance(journal, MemoryJournal):
        stream = journal._streams.get(stream_id)
        return stream is not None and len(stream.waiters) >= readers
    assert isinstance(journal, RedisJournal)
    channel = journal._notifier._channels.get(journal._channel(stream_id))
    return (
        channel is not None
        and channel.confirmed.done()
        and channel.fetching is None
        and len(channel.waiters) >= readers
    )


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
