"""Issue 15, points 4 and 6: when an answer is complete, and every request is an attempt.

A real gateway in front of the fault-injecting upstream, asked three ways: the page's
``/api/chat`` (events, stored message), ``/v1`` streaming and ``/v1`` not streaming. What
the provider saw (requests, connections, connections the gateway closed) comes from the
upstream's own log.

* A body that ends cleanly after a ``finish_reason`` is complete without ``[DONE]``;
  without a ``finish_reason`` it is cut short. Nothing after ``[DONE]`` counts.
* vLLM's error object and OpenRouter's ``finish_reason: "error"`` end the answer as an
  error carrying the provider's message.
* A request written on a kept-alive connection that the provider closes before answering
  is an attempt: counted, announced, backed off, never re-sent behind the policy's back.
  A connection the provider closed while it sat idle is replaced without an attempt.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from support.client import chat_body, read_stream
from support.fault_upstream import (
    FaultUpstream,
    after_done,
    close_after_request,
    close_when_idle,
    no_done,
    no_finish,
    ok,
    openrouter_error,
    vllm_error,
)
from support.gateway import running_gateway
from tokenrelay.sse import SSEDecoder

TOKENS = ["Hel", "lo", ", ", "wor", "ld", " — ", "ça ", "va", " 😀", "!"]
TEXT = "".join(TOKENS)
MAX_ATTEMPTS = 3
IDLE_S = 10.0
ENV = {
    "TOKENRELAY_RETRY_BASE_DELAY_S": "0.01",
    "TOKENRELAY_RETRY_MAX_DELAY_S": "0.05",
    "TOKENRELAY_RETRY_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
    "TOKENRELAY_FIRST_TOKEN_TIMEOUT_S": "5",
    "TOKENRELAY_IDLE_TIMEOUT_S": str(IDLE_S),
    "TOKENRELAY_HEARTBEAT_S": "0.2",
}


@dataclass
class Answer:
    """What one client got, whichever way it asked."""

    way: str
    text: str
    ok: bool  # complete (done, or HTTP 200 with [DONE] / a completion)
    error: dict[str, Any] | None  # code and message when not ok
    finish_reason: str | None
    usage: dict[str, Any] | None
    retries: int  # retry announcements (events on /api/chat, comments on /v1 streams)
    stored: tuple[str, str] | None = None  # (state, content) in history (/api/chat only)
    waits_ms: list[int] | None = None  # the announced waits (/api/chat only)


Ask = Callable[[str], Awaitable[Answer]]
WAYS = ["chat", "v1-stream", "v1"]


@pytest.fixture
async def rig(http: Any) -> AsyncIterator[tuple[FaultUpstream, Ask]]:
    async with FaultUpstream() as upstream, running_gateway(
        TOKENRELAY_UPSTREAM_URL=upstream.base_url, **ENV
    ) as gw:

        async def chat() -> Answer:
            async with http.post(gw.base_url + "/api/chat", json=chat_body("q", "m")) as r:
                assert r.status == 200
                stream = await read_stream(r)
            assert len(stream.terminal) == 1 and stream.events[-1] is stream.terminal[0]
            end = stream.events[-1].data
            conversation = stream.events[0].data["conversation_id"]
            async with http.get(f"{gw.base_url}/api/conversations/{conversation}") as r:
                message = (await r.json())["messages"][-1]
            done = stream.events[-1].event == "done" and end["state"] == "complete"
            return Answer("chat", stream.text, done, None if done else end["error"],
                          end.get("finish_reason"), end["usage"], len(stream.named("retry")),
                          (message["state"], message["content"]),
                          [e.data["wait_ms"] for e in stream.named("retry")])

        async def v1_stream() -> Answer:
            body = chat_body("q", "m", stream=True, stream_options={"include_usage": True})
            async with http.post(gw.base_url + "/v1/chat/completions", json=body) as r:
                if r.status != 200:  # rejected before any 200: the status says so (issue 13)
                    assert r.status == 502, await r.text()
                    return Answer("v1-stream", "", False, (await r.json())["error"], None,
                                  None, 0)
                raw = await r.read()
            return _v1_stream_answer(raw)

        async def v1() -> Answer:
            async with http.post(gw.base_url + "/v1/chat/completions",
                                 json=chat_body("q", "m")) as r:
                data = await r.json()
                status = r.status
            if status != 200:
                assert status == 502, data
                return Answer("v1", "", False, data["error"], None, None, 0)
            (choice,) = data["choices"]
            return Answer("v1", choice["message"]["content"], True, None,
                          choice["finish_reason"], data["usage"], 0)

        ways = {"chat": chat, "v1-stream": v1_stream, "v1": v1}

        async def ask(way: str) -> Answer:
            return await ways[way]()

        yield upstream, ask


def _v1_stream_answer(raw: bytes) -> Answer:
    """Parse an OpenAI stream as its SDK would: chunks, an error object, [DONE]."""
    text, finish, usage, error, done = "", None, None, None, False
    for event in SSEDecoder().decode(raw):
        if event.data == b"[DONE]":
            done = True
            continue
        chunk = orjson.loads(event.data)
        if "error" in chunk:
            error = chunk["error"]
            continue
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            text += choice["delta"].get("content") or ""
            finish = choice["finish_reason"] or finish
    retries = raw.count(b"\n: retry in ")
    return Answer("v1-stream", text, done and error is None, error, finish, usage, retries)


def assert_complete(answer: Answer, text: str = TEXT, completion_tokens: int = len(TOKENS)
                    ) -> None:
    assert answer.ok, answer
    assert answer.text == text
    assert answer.finish_reason == "stop"
    assert answer.usage is not None
    assert answer.usage["completion_tokens"] == completion_tokens  # the provider's, kept
    if answer.way == "chat":
        assert answer.usage["estimated"] is False
        assert answer.stored == ("complete", text)


def assert_failed(answer: Answer, text: str, code: str, message: str | None = None) -> None:
    assert not answer.ok, answer
    assert answer.error is not None and answer.error["code"] == code
    if message is not None:
        assert message in answer.error["message"]
    if answer.way != "v1":  # a failed non-streaming answer has no text, only its error
        assert answer.text == text
    if answer.way == "chat":
        assert answer.stored == ("error", text)


# -- point 4: completion rules -----------------------------------------------------------


@pytest.mark.parametrize("way", WAYS)
async def test_a_clean_end_after_the_finish_reason_is_complete_without_done(rig, way):
    upstream, ask = rig
    upstream.script(no_done(TOKENS))
    assert_complete(await ask(way))
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("way", WAYS)
async def test_a_clean_end_without_a_finish_reason_is_still_cut_short(rig, way):
    upstream, ask = rig
    upstream.script(no_finish(TOKENS))
    assert_failed(await ask(way), TEXT, "upstream_incomplete")
    assert len(upstream.requests) == 1  # text was relayed: never restarted


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("end", ["clean", "cut", "stall"])
async def test_whatever_follows_done_is_ignored(rig, way, end):
    upstream, ask = rig
    upstream.script(after_done(TOKENS, end=end), ok(TOKENS))
    started = time.monotonic()
    assert_complete(await ask(way))
    if end == "stall":
        # Complete well before the idle budget: after [DONE] the end of the body gets a
        # short grace, then the gateway closes the silent connection.
        assert time.monotonic() - started < IDLE_S
        await upstream.wait_client_closed(1)
    # The next answer: on the same connection only after a body that really ended.
    assert_complete(await ask(way))
    assert len(upstream.requests) == 2
    assert upstream.connections == (1 if end == "clean" else 2)


async def test_a_stray_event_after_done_that_looks_like_text_is_not_relayed(rig):
    upstream, ask = rig
    late = b'data: {"choices":[{"index":0,"delta":{"content":"LATE"},"finish_reason":null}]}\n\n'
    upstream.script(after_done(TOKENS, extra=late))
    for way in WAYS:
        assert_complete(await ask(way))


@pytest.mark.parametrize("way", WAYS)
async def test_vllm_error_object_mid_stream_is_an_error_with_its_message(rig, way):
    upstream, ask = rig
    upstream.script(vllm_error(TOKENS, 4, message="CUDA out of memory"))
    assert_failed(await ask(way), "".join(TOKENS[:4]), "upstream_error", "CUDA out of memory")
    assert len(upstream.requests) == 1


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize(("message", "expected"), [
    ("Provider disconnected unexpectedly", "Provider disconnected unexpectedly"),
    (None, 'finish_reason "error"'),
])
async def test_openrouter_finish_reason_error_is_an_error_with_its_message(
        rig, way, message, expected):
    upstream, ask = rig
    upstream.script(openrouter_error(TOKENS, 3, message=message))
    assert_failed(await ask(way), "".join(TOKENS[:3]), "upstream_error", expected)
    assert len(upstream.requests) == 1


async def test_an_error_before_any_text_is_retried_like_a_failed_attempt(rig):
    upstream, ask = rig
    upstream.script(openrouter_error(TOKENS, 0, message=None), ok(TOKENS))
    answer = await ask("chat")
    assert_complete(answer)
    assert answer.retries == 1 and len(upstream.requests) == 2


# -- point 6: no hidden resends ----------------------------------------------------------


@pytest.mark.parametrize("way", WAYS)
async def test_a_kept_alive_connection_closed_after_the_request_is_an_attempt(rig, way):
    upstream, ask = rig
    upstream.script(ok(TOKENS), close_after_request())
    assert_complete(await ask(way))  # leaves a kept-alive connection in the pool
    answer = await ask(way)
    assert_failed(answer, "", "upstream_unavailable", "closed the connection before answering")
    # Exactly max_attempts requests reached the provider, the first on the kept-alive
    # connection; the 2nd and 3rd were announced (backoff included) before they were sent.
    assert len(upstream.requests) == 1 + MAX_ATTEMPTS
    assert upstream.connections == MAX_ATTEMPTS
    if way == "chat":  # /v1 streams start (and show their retries) only once accepted
        assert answer.retries == MAX_ATTEMPTS - 1


async def test_after_two_closed_attempts_the_third_one_answers(rig):
    upstream, ask = rig
    upstream.script(ok(TOKENS), close_after_request(), close_after_request(), ok(TOKENS))
    await ask("chat")
    answer = await ask("chat")
    assert_complete(answer)  # the third attempt answered
    assert answer.retries == 2 and len(upstream.requests) == 4
    # Each attempt waited out the backoff it announced (rounded to the millisecond).
    assert answer.waits_ms is not None
    arrived = [r.arrived for r in upstream.requests[1:]]
    for wait_ms, before, after in zip(answer.waits_ms, arrived[:-1], arrived[1:], strict=True):
        assert after - before >= wait_ms / 1000 - 0.001


@pytest.mark.parametrize("way", WAYS)
async def test_a_connection_closed_while_idle_is_replaced_without_an_attempt(rig, way):
    upstream, ask = rig
    upstream.script(close_when_idle(TOKENS), ok(TOKENS))
    assert_complete(await ask(way))
    await upstream.wait_closed_idle(1)
    answer = await ask(way)
    assert_complete(answer)
    assert answer.retries == 0
    assert len(upstream.requests) == 2  # each request sent once
    assert upstream.connections == 2
