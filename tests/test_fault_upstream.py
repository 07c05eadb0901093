"""The fault-injecting test upstream, checked step by step with a real aiohttp client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from support.fault_upstream import (
    GARBAGE_LINE,
    FaultUpstream,
    after_done,
    close_after_request,
    close_when_idle,
    corrupt,
    huge_chunk,
    in_stream_error,
    no_done,
    no_finish,
    ok,
    openrouter_error,
    refuse,
    reset_after,
    slow,
    split_bytes,
    stall_after,
    stall_first,
    status,
    vllm_error,
)
from support.openai_stream import events_of, read_events

TOKENS = ["Hel", "lo", " wör", "ld", " 😀"]
BODY = {"model": "m1", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
WAIT = 5.0


@pytest.fixture
async def up() -> AsyncIterator[tuple[FaultUpstream, aiohttp.ClientSession]]:
    async with FaultUpstream() as upstream, aiohttp.ClientSession() as session:
        yield upstream, session


def text_of(events: list[Any]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for e in events
        if isinstance(e, dict) and e.get("choices")
    )


async def fetch(session: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, Any, bytes]:
    async with session.post(url + "/chat/completions", json=kw.pop("json", BODY), **kw) as r:
        return r.status, r.headers, await r.read()


async def test_ok_streams_openai_chunks_and_records_the_request(up: Any) -> None:
    upstream, session = up
    upstream.script(ok(TOKENS, reasoning=["th", "ink"]))
    code, headers, raw = await fetch(session, upstream.base_url,
                                     headers={"Authorization": "Bearer k1"})
    assert code == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["Transfer-Encoding"] == "chunked"
    events = events_of(raw)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [e["choices"][0]["delta"]["reasoning_content"] for e in events[1:3]] == ["th", "ink"]
    assert text_of(events) == "".join(TOKENS)
    assert events[-3]["choices"][0]["finish_reason"] == "stop"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 7
    assert events[-1] == "[DONE]"
    assert all(e["model"] == "m1" for e in events[:-1])
    (req,) = upstream.requests
    assert (req.method, req.path) == ("POST", "/v1/chat/completions")
    assert req.headers["authorization"] == "Bearer k1"
    assert req.json == BODY
    assert req.arrived > 0
    assert upstream.closed_by_client == 0


async def test_script_runs_in_order_then_repeats_the_last_step(up: Any) -> None:
    upstream, session = up
    upstream.script(status(503), ok(["a"]), ok(["b"]))
    results = [await fetch(session, upstream.base_url) for _ in range(4)]
    assert [code for code, _, _ in results] == [503, 200, 200, 200]
    assert [text_of(events_of(raw)) for _, _, raw in results[1:]] == ["a", "b", "b"]
    assert len(upstream.requests) == 4


async def test_status_steps_carry_headers_and_bodies(up: Any) -> None:
    upstream, session = up
    error = {"error": {"message": "slow down", "type": "requests", "code": "rate_limit"}}
    upstream.script(
        status(429, error, {"Retry-After": "2"}),
        status(503, "overloaded", {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}),
    )
    code, headers, raw = await fetch(session, upstream.base_url)
    assert (code, headers["Retry-After"], orjson.loads(raw)) == (429, "2", error)
    code, headers, raw = await fetch(session, upstream.base_url)
    assert (code, raw) == (503, b"overloaded")
    assert headers["Retry-After"] == "Wed, 21 Oct 2015 07:28:00 GMT"


@pytest.mark.parametrize("reset", [True, False])
async def test_refuse_closes_without_a_response(up: Any, reset: bool) -> None:
    upstream, session = up
    upstream.script(refuse(reset=reset), ok(["fine"]))
    with pytest.raises(aiohttp.ClientError):
        await fetch(session, upstream.base_url)
    assert len(upstream.requests) == 1
    code, _, raw = await fetch(session, upstream.base_url)
    assert code == 200 and text_of(events_of(raw)) == "fine"


async def test_reset_after_cuts_the_body_after_n_tokens(up: Any) -> None:
    upstream, session = up
    upstream.script(reset_after(TOKENS, 2))
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.post(upstream.base_url + "/chat/completions", json=BODY) as resp:
            async for chunk in resp.content.iter_any():
                received += chunk
    assert text_of(events_of(received)) == "Hello"
    assert b"[DONE]" not in received and b"finish_reason\":\"stop" not in received


async def test_corrupt_puts_one_bad_line_at_the_position(up: Any) -> None:
    upstream, session = up
    upstream.script(corrupt(TOKENS, at=2))
    _, _, raw = await fetch(session, upstream.base_url)
    events = events_of(raw)
    bad = [i for i, e in enumerate(events) if isinstance(e, tuple)]
    assert bad == [3]  # role chunk, two tokens, then the corrupt line
    assert text_of(events) == "".join(TOKENS)
    assert events[-1] == "[DONE]"


async def test_split_bytes_arrives_one_byte_at_a_time(up: Any) -> None:
    upstream, session = up
    step = split_bytes(["H", "é", "😀", " ok"])
    upstream.script(step)
    reads: list[bytes] = []
    async with session.post(upstream.base_url + "/chat/completions", json=BODY) as resp:
        async for chunk in resp.content.iter_any():
            reads.append(chunk)
    raw = b"".join(reads)
    assert text_of(events_of(raw)) == "Hé😀 ok"
    assert len(reads) > len(raw) // 4  # many tiny reads, not one buffered body
    assert min(len(r) for r in reads) == 1
    with pytest.raises(UnicodeDecodeError):  # some read really ends inside a character
        for r in reads:
            r.decode()


async def test_no_done_ends_cleanly_without_done(up: Any) -> None:
    upstream, session = up
    upstream.script(no_done(TOKENS))
    code, _, raw = await fetch(session, upstream.base_url)
    events = events_of(raw)
    assert code == 200 and text_of(events) == "".join(TOKENS)
    assert "[DONE]" not in events
    assert any(e["choices"] and e["choices"][0]["finish_reason"] == "stop" for e in events)


async def test_stall_first_forever_until_the_client_leaves(up: Any) -> None:
    upstream, session = up
    upstream.script(stall_first())
    async with session.post(upstream.base_url + "/chat/completions", json=BODY) as resp:
        assert resp.status == 200
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(resp.content.readany(), 0.2)
        resp.close()
    await asyncio.wait_for(upstream.wait_client_closed(1), WAIT)
    assert upstream.closed_by_client == 1


async def test_stall_first_with_seconds_then_streams(up: Any) -> None:
    upstream, session = up
    upstream.script(stall_first(0.05, ["late", "!"]))
    _, _, raw = await fetch(session, upstream.base_url)
    assert text_of(events_of(raw)) == "late!"
    assert upstream.closed_by_client == 0


async def test_stall_after_sends_n_tokens_then_silence(up: Any) -> None:
    upstream, session = up
    upstream.script(stall_after(TOKENS, 2))
    async with session.post(upstream.base_url + "/chat/completions", json=BODY) as resp:
        events = await read_events(resp, 3)
        assert text_of(events) == "Hello"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(resp.content.readany(), 0.2)
        resp.close()
    await asyncio.wait_for(upstream.wait_client_closed(1), WAIT)


async def test_huge_chunk_is_one_delta(up: Any) -> None:
    upstream, session = up
    upstream.script(huge_chunk(1_000_000))
    _, _, raw = await fetch(session, upstream.base_url)
    events = events_of(raw)
    contents = [e for e in events if isinstance(e, dict) and e["choices"]
                and e["choices"][0]["delta"].get("content")]
    assert len(contents) == 1
    assert contents[0]["choices"][0]["delta"]["content"] == "x" * 1_000_000


async def test_slow_streams_everything_and_counts_a_client_abort(up: Any) -> None:
    upstream, session = up
    upstream.script(slow(TOKENS, 0.01), slow(TOKENS * 100, 0.05))
    _, _, raw = await fetch(session, upstream.base_url)
    assert text_of(events_of(raw)) == "".join(TOKENS)
    async with session.post(upstream.base_url + "/chat/completions", json=BODY) as resp:
        await read_events(resp, 2)
        resp.close()
    await asyncio.wait_for(upstream.wait_client_closed(1), WAIT)
    assert upstream.closed_by_client == 1


async def test_in_stream_error_follows_n_tokens(up: Any) -> None:
    upstream, session = up
    upstream.script(in_stream_error(TOKENS, 3, "model overloaded"))
    code, _, raw = await fetch(session, upstream.base_url)
    events = events_of(raw)
    assert code == 200
    assert text_of(events) == "Hello wör"
    assert events[-1]["error"]["message"] == "model overloaded"
    assert "[DONE]" not in events


async def test_non_streaming_request_gets_a_completion(up: Any) -> None:
    upstream, session = up
    upstream.script(ok(TOKENS))
    code, _, raw = await fetch(session, upstream.base_url, json={**BODY, "stream": False})
    data = orjson.loads(raw)
    assert code == 200 and data["object"] == "chat.completion"
    assert data["choices"][0]["message"]["content"] == "".join(TOKENS)


async def test_wait_requests_resolves_when_the_request_arrives(up: Any) -> None:
    upstream, session = up
    waiter = asyncio.create_task(upstream.wait_requests(2))
    await fetch(session, upstream.base_url)
    await asyncio.sleep(0)
    assert not waiter.done()
    await fetch(session, upstream.base_url)
    await asyncio.wait_for(waiter, WAIT)


# -- the issue-15 block: completion rules and hidden resends -------------------------------


async def test_no_finish_ends_cleanly_without_finish_or_done(up: Any) -> None:
    upstream, session = up
    upstream.script(no_finish(TOKENS))
    code, _, raw = await fetch(session, upstream.base_url)
    events = events_of(raw)
    assert code == 200 and text_of(events) == "".join(TOKENS)
    assert "[DONE]" not in events
    assert not any(e["choices"][0]["finish_reason"] for e in events if e.get("choices"))


@pytest.mark.parametrize("extra", [GARBAGE_LINE, b'data: {"choices":[]}\n\n'])
async def test_after_done_sends_its_bytes_after_done_then_ends_cleanly(up: Any, extra: bytes
                                                                       ) -> None:
    upstream, session = up
    upstream.script(after_done(TOKENS, extra=extra))
    code, _, raw = await fetch(session, upstream.base_url)
    assert code == 200 and raw.endswith(b"data: [DONE]\n\n" + extra)
    assert text_of(events_of(raw)) == "".join(TOKENS)


async def test_after_done_cut_closes_without_the_terminator(up: Any) -> None:
    upstream, session = up
    upstream.script(after_done(TOKENS, end="cut"))
    async with session.post(upstream.base_url + "/chat/completions", json=BODY) as resp:
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_vllm_error_is_the_bare_error_object_then_done(up: Any) -> None:
    upstream, session = up
    upstream.script(vllm_error(TOKENS, 2, message="boom", code=500))
    code, _, raw = await fetch(session, upstream.base_url)
    events = events_of(raw)
    assert code == 200 and text_of(events) == "".join(TOKENS[:2])
    assert events[-2] == {"object": "error", "message": "boom", "type": "InternalServerError",
                          "param": None, "code": 500}
    assert events[-1] == "[DONE]"


@pytest.mark.parametrize("message", ["Provider disconnected", None])
async def test_openrouter_error_is_a_finish_reason_error_chunk(up: Any, message: str | None
                                                               ) -> None:
    upstream, session = up
    upstream.script(openrouter_error(TOKENS, 3, message=message))
    code, _, raw = await fetch(session, upstream.base_url)
    events = events_of(raw)
    assert code == 200 and text_of(events) == "".join(TOKENS[:3])
    last = events[-2]
    assert last["choices"][0]["finish_reason"] == "error"
    assert last.get("error") == (None if message is None else {"code": 502, "message": message})


async def test_close_after_request_records_the_request_and_answers_nothing(up: Any) -> None:
    upstream, session = up
    upstream.script(close_after_request())
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await fetch(session, upstream.base_url)
    assert len(upstream.requests) == 1 and upstream.requests[0].json == BODY


async def test_close_when_idle_answers_then_closes_the_kept_alive_connection(up: Any) -> None:
    upstream, session = up
    upstream.script(close_when_idle(TOKENS))
    code, _, raw = await fetch(session, upstream.base_url)
    assert code == 200 and text_of(events_of(raw)) == "".join(TOKENS)
    await asyncio.wait_for(upstream.wait_closed_idle(1), WAIT)
    assert upstream.closed_idle == 1
