"""Chaos suite: every fault mode of a real misbehaving upstream, through the real gateway.

For each mode: what the client receives (events in order, exactly one terminal event), what
the upstream saw (attempts, waits not shorter than Retry-After), and the final state.
"""

from __future__ import annotations

import asyncio
import email.utils
import time

import pytest

from support.client import Stream, chat_body, read_stream
from support.fault_upstream import (
    FaultUpstream,
    corrupt,
    huge_chunk,
    in_stream_error,
    no_done,
    no_finish,
    ok,
    refuse,
    reset_after,
    slow,
    split_bytes,
    stall_after,
    stall_first,
    status,
)
from support.gateway import Gateway, running_gateway

TOKENS = ["Hel", "lo", ", ", "wor", "ld", " — ", "ça ", "va", " 😀", "!"]
TEXT = "".join(TOKENS)

ENV = {
    "TOKENRELAY_RETRY_BASE_DELAY_S": "0.01",
    "TOKENRELAY_RETRY_MAX_DELAY_S": "0.05",
    "TOKENRELAY_RETRY_MAX_ATTEMPTS": "3",
    "TOKENRELAY_FIRST_TOKEN_TIMEOUT_S": "1",
    "TOKENRELAY_IDLE_TIMEOUT_S": "0.5",
    "TOKENRELAY_HEARTBEAT_S": "0.2",
}

gateways: dict[int, Gateway] = {}  # the gateway in front of each live fault upstream


@pytest.fixture
async def chaos(http):
    """(upstream, ask) where ask() runs one chat through a gateway in front of upstream."""
    async with FaultUpstream() as upstream, running_gateway(
        TOKENRELAY_UPSTREAM_URL=upstream.base_url, **ENV
    ) as gw:
        gateways[id(upstream)] = gw

        async def ask() -> Stream:
            async with http.post(gw.base_url + "/api/chat", json=chat_body("q", "m")) as r:
                assert r.status == 200
                stream = await read_stream(r)
            assert len(stream.terminal) == 1, "exactly one terminal event"
            assert stream.events[-1] is stream.terminal[0], "and it is the last one"
            assert [e.id for e in stream.events] == list(range(1, len(stream.events) + 1))
            return stream

        yield upstream, ask
        del gateways[id(upstream)]


async def stored_text(upstream: FaultUpstream, stream: Stream, http) -> tuple[str, str]:
    """(state, content) of the assistant message the gateway stored for this stream."""
    gw = gateways[id(upstream)]
    conversation = stream.events[0].data["conversation_id"]
    async with http.get(f"{gw.base_url}/api/conversations/{conversation}") as r:
        data = await r.json()
    message = data["messages"][-1]
    assert message["role"] == "assistant"
    return message["state"], message["content"]


def complete(stream: Stream) -> None:
    end = stream.events[-1]
    assert end.event == "done" and end.data["state"] == "complete", end.data


def failed(stream: Stream, code: str) -> dict:
    end = stream.events[-1]
    assert end.event == "error" and end.data["state"] == "error", end.data
    assert end.data["error"]["code"] == code, end.data
    return end.data["error"]


async def test_429_with_retry_after_seconds_then_success(chaos, http):
    upstream, ask = chaos
    upstream.script(status(429, {"error": {"message": "slow down"}}, {"Retry-After": "1"}),
                    ok(TOKENS))
    stream = await ask()
    complete(stream)
    assert stream.text == TEXT
    (retry,) = stream.named("retry")
    assert retry.data["status"] == 429 and retry.data["wait_ms"] == 1000
    assert retry.data["reason"] == "upstream_rate_limited"
    first, second = upstream.requests
    assert second.arrived - first.arrived >= 1.0
    assert await stored_text(upstream, stream, http) == ("complete", TEXT)


async def test_429_with_retry_after_http_date_then_success(chaos):
    upstream, ask = chaos
    when = email.utils.formatdate(time.time() + 2, usegmt=True)
    upstream.script(status(429, {"error": {"message": "later"}}, {"Retry-After": when}),
                    ok(TOKENS))
    stream = await ask()
    complete(stream)
    (retry,) = stream.named("retry")
    assert 0 < retry.data["wait_ms"] <= 2000
    first, second = upstream.requests
    assert second.arrived - first.arrived >= retry.data["wait_ms"] / 1000 - 0.01


@pytest.mark.parametrize("code", [500, 503])
async def test_5xx_then_success(chaos, code):
    upstream, ask = chaos
    upstream.script(status(code, {"error": {"message": "oops"}}), ok(TOKENS))
    stream = await ask()
    complete(stream)
    assert stream.text == TEXT
    assert [e.data["status"] for e in stream.named("retry")] == [code]
    assert len(upstream.requests) == 2


async def test_connection_refused_then_success(chaos):
    upstream, ask = chaos
    upstream.script(refuse(), refuse(), ok(TOKENS))
    stream = await ask()
    complete(stream)
    assert stream.text == TEXT
    assert [e.data["reason"] for e in stream.named("retry")] == ["upstream_unavailable"] * 2


async def test_reset_after_tokens_keeps_partial_text(chaos, http):
    upstream, ask = chaos
    upstream.script(reset_after(TOKENS, 4), ok(TOKENS))
    stream = await ask()
    failed(stream, "upstream_incomplete")
    assert stream.text == "".join(TOKENS[:4])
    assert not stream.named("retry") and len(upstream.requests) == 1  # never restarted
    assert await stored_text(upstream, stream, http) == ("error", "".join(TOKENS[:4]))


async def test_corrupt_chunk_after_text_is_an_error_after_the_good_text(chaos, http):
    upstream, ask = chaos
    upstream.script(corrupt(TOKENS, 5))
    stream = await ask()
    error = failed(stream, "upstream_error")
    assert "corrupt" in error["message"]
    assert stream.text == "".join(TOKENS[:5])
    assert await stored_text(upstream, stream, http) == ("error", "".join(TOKENS[:5]))


async def test_bytes_split_one_by_one_lose_nothing(chaos):
    upstream, ask = chaos
    step = split_bytes()
    upstream.script(step)
    stream = await ask()
    complete(stream)
    assert stream.text == step.text


async def test_missing_done_after_a_finish_reason_is_success(chaos, http):
    # Several servers never send [DONE]: a clean end after the finish is the end (issue 15).
    upstream, ask = chaos
    upstream.script(no_done(TOKENS))
    stream = await ask()
    complete(stream)
    assert stream.text == TEXT
    assert await stored_text(upstream, stream, http) == ("complete", TEXT)


async def test_missing_done_and_finish_reason_is_not_success(chaos, http):
    upstream, ask = chaos
    upstream.script(no_finish(TOKENS))
    stream = await ask()
    failed(stream, "upstream_incomplete")
    assert stream.text == TEXT
    assert await stored_text(upstream, stream, http) == ("error", TEXT)


async def test_stall_before_first_token_is_retried_then_times_out(chaos):
    upstream, ask = chaos
    upstream.script(stall_first())
    started = time.monotonic()
    stream = await ask()
    error = failed(stream, "upstream_timeout")
    assert "first_token" in error["message"]
    assert len(upstream.requests) == 3  # every attempt was tried
    await asyncio.wait_for(upstream.wait_client_closed(3), 10)
    assert time.monotonic() - started >= 3 * 1.0
    # heartbeats kept the client connection alive meanwhile
    assert stream.raw.count(b": heartbeat") >= 3


async def test_stall_mid_stream_times_out_with_partial_text(chaos):
    upstream, ask = chaos
    upstream.script(stall_after(TOKENS, 3))
    stream = await ask()
    error = failed(stream, "upstream_timeout")
    assert "idle" in error["message"]
    assert stream.text == "".join(TOKENS[:3])
    await asyncio.wait_for(upstream.wait_client_closed(1), 10)


async def test_400_with_json_error_is_not_retried(chaos):
    upstream, ask = chaos
    upstream.script(status(400, {"error": {"message": "context too long", "code": "bad"}}))
    stream = await ask()
    error = failed(stream, "upstream_rejected")
    assert "context too long" in error["message"] and error["retryable"] is False
    assert len(upstream.requests) == 1 and not stream.named("retry")


async def test_huge_single_chunk(chaos):
    upstream, ask = chaos
    upstream.script(huge_chunk(2_000_000))
    stream = await ask()
    complete(stream)
    assert stream.text == "x" * 2_000_000


async def test_error_object_inside_the_stream(chaos):
    upstream, ask = chaos
    upstream.script(in_stream_error(TOKENS, 2, message="model crashed"))
    stream = await ask()
    error = failed(stream, "upstream_error")
    assert "model crashed" in error["message"]
    assert stream.text == "".join(TOKENS[:2])


async def test_slow_tokens_within_the_idle_budget_complete(chaos):
    upstream, ask = chaos
    upstream.script(slow(TOKENS[:4], 0.05))
    stream = await ask()
    complete(stream)
    assert stream.text == "".join(TOKENS[:4])


async def test_retries_are_exhausted_then_reported(chaos):
    upstream, ask = chaos
    upstream.script(status(503, {"error": {"message": "overloaded"}}))
    stream = await ask()
    failed(stream, "upstream_error")
    assert len(upstream.requests) == 3
    assert [e.data["attempt"] for e in stream.named("retry")] == [1, 2]


async def test_the_upstream_gets_the_request_it_should(chaos):
    upstream, ask = chaos
    upstream.script(ok(TOKENS))
    complete(await ask())
    body = upstream.requests[0].json
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "m" and body["messages"] == [{"role": "user", "content": "q"}]


async def test_answers_reuse_the_upstream_connection_unless_it_broke(chaos):
    upstream, ask = chaos
    upstream.script(ok(TOKENS), ok(TOKENS), reset_after(TOKENS, 2), ok(TOKENS))
    complete(await ask())
    complete(await ask())
    assert upstream.connections == 1  # kept alive after [DONE]
    broken = await ask()
    assert broken.terminal[0].event == "error"
    complete(await ask())
    assert upstream.connections == 2  # the broken one was not reused
