"""Resuming a finished stream (issue 13, part 3): nothing left after Last-Event-ID is
``204 No Content``, the EventSource signal to stop reconnecting; a client that missed the
terminal event still gets it. Chromium's own EventSource: tests/browser/test_eventsource_end.py."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from support.client import chat_body, read_stream
from support.gateway import Gateway

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(params=["memory", "redis"])
async def journal_env(request) -> AsyncIterator[dict[str, str]]:
    """Gateway env for each journal backend; the Redis prefix is private and cleaned up."""
    if request.param == "memory":
        yield {}
        return
    prefix = f"tokenrelay-test-{uuid.uuid4().hex[:12]}:"
    yield {"TOKENRELAY_REDIS_URL": REDIS_URL, "TOKENRELAY_REDIS_PREFIX": prefix}
    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def gateway(
    gateway_factory: Callable[..., Any], journal_env: dict[str, str]
) -> AsyncIterator[Gateway]:
    async with gateway_factory(**journal_env) as gw:
        yield gw


async def _finished_stream(http: aiohttp.ClientSession, base_url: str) -> tuple[str, int]:
    async with http.post(base_url + "/api/chat",
                         json=chat_body("short", "sim-fast", sim={"tokens": 5})) as r:
        stream = await read_stream(r)
    assert stream.terminal and stream.terminal[0].event == "done"
    return r.headers["X-Stream-Id"], stream.last_id


async def test_resume_at_or_past_the_terminal_event_is_204(gateway, http):
    stream_id, last = await _finished_stream(http, gateway.base_url)
    url = f"{gateway.base_url}/api/streams/{stream_id}/events"
    for after in (last, last + 1, 10**9):
        async with http.get(url, headers={"Last-Event-ID": str(after)}) as r:
            assert r.status == 204, after
            assert await r.read() == b""
            assert "text/event-stream" not in r.headers.get("Content-Type", "")
    async with http.get(url + f"?last_event_id={last}") as r:  # the fetch clients' way
        assert r.status == 204


async def test_a_client_that_missed_the_terminal_event_still_gets_it(gateway, http):
    stream_id, last = await _finished_stream(http, gateway.base_url)
    url = f"{gateway.base_url}/api/streams/{stream_id}/events"
    async with http.get(url, headers={"Last-Event-ID": str(last - 1)}) as r:
        assert r.status == 200
        stream = await read_stream(r)
    assert [(e.id, e.event) for e in stream.events] == [(last, "done")]
    async with http.get(url) as r:  # no Last-Event-ID: everything, from the start
        stream = await read_stream(r)
    assert stream.events[0].event == "start" and stream.last_id == last


async def test_a_live_stream_resumed_at_its_last_event_keeps_following(gateway, http):
    body = chat_body("slow", "sim-chat", sim={"tokens": 40, "tokens_per_s": 20})
    async with http.post(gateway.base_url + "/api/chat", json=body) as r:
        first = await read_stream(r, stop_after=3)
        stream_id = r.headers["X-Stream-Id"]
    url = f"{gateway.base_url}/api/streams/{stream_id}/events"
    async with http.get(url, headers={"Last-Event-ID": str(first.last_id)}) as r:
        assert r.status == 200
        rest = await read_stream(r)
    assert rest.events[0].id == first.last_id + 1
    assert rest.terminal and rest.terminal[0].event == "done"


async def test_204_never_reveals_another_tenants_stream(gateway_factory, http):
    keys = "alice:alice-key-0123456789,bob:bob-key-0123456789"
    async with gateway_factory(TOKENRELAY_API_KEYS=keys) as gw:
        alice = {"Authorization": "Bearer alice-key-0123456789"}
        bob = {"Authorization": "Bearer bob-key-0123456789"}
        async with http.post(gw.base_url + "/api/chat", headers=alice,
                             json=chat_body("x", "sim-fast", sim={"tokens": 2})) as r:
            stream = await read_stream(r)
            stream_id = r.headers["X-Stream-Id"]
        url = f"{gw.base_url}/api/streams/{stream_id}/events"
        last = {"Last-Event-ID": str(stream.last_id)}
        async with http.get(url, headers={**bob, **last}) as r:
            assert r.status == 404
        async with http.get(url, headers={**alice, **last}) as r:
            assert r.status == 204
