"""The built-in simulator, over a real uvicorn server on 127.0.0.1 (tokenrelay.simulator)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest

from support.openai_stream import events_of, read_events
from support.servers import running_asgi
from tokenrelay.simulator import (
    DEFAULT_MODELS,
    Simulator,
    SimulatorConfig,
    build_reasoning,
    build_text,
    build_tool_calls,
    create_simulator,
)

FAST = SimulatorConfig(speed=50.0, first_token_delay_scale=0.0)
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "How do   server-sent events\nwork in a <b>browser</b>?"},
]
WAIT = 5.0  # seconds before a wait for the simulator's own events counts as a failure


@pytest.fixture
async def sim() -> AsyncIterator[tuple[Simulator, str, aiohttp.ClientSession]]:
    app = create_simulator(FAST)
    async with running_asgi(app) as url, aiohttp.ClientSession() as session:
        yield app, url + "/v1", session


def content_of(events: list[Any]) -> str:
    return "".join(
        e["choices"][0]["delta"].get("content") or ""
        for e in events
        if isinstance(e, dict) and e["choices"]
    )


def content_chunks(events: list[Any]) -> list[str]:
    return [
        e["choices"][0]["delta"]["content"]
        for e in events
        if isinstance(e, dict) and e["choices"] and e["choices"][0]["delta"].get("content")
    ]


async def post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], **kw: Any
) -> tuple[int, dict[str, str], bytes]:
    async with session.post(url + "/chat/completions", json=body, **kw) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def stream(session: aiohttp.ClientSession, url: str, **body: Any) -> list[Any]:
    body = {"model": "sim-chat", "messages": MESSAGES, "stream": True, **body}
    status, headers, raw = await post(session, url, body)
    assert status == 200, raw
    assert headers["Content-Type"].startswith("text/event-stream")
    return events_of(raw)


async def test_models_list_names_every_model_as_simulated(sim: Any) -> None:
    _, url, session = sim
    async with session.get(url + "/models") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [spec.name for spec in DEFAULT_MODELS]
    for model in body["data"]:
        assert model["object"] == "model"
        assert model["owned_by"] == "tokenrelay-simulator"
        assert model["simulated"] is True
        assert model["description"]
        assert isinstance(model["created"], int)


async def test_stream_looks_like_openai_and_matches_build_text(sim: Any) -> None:
    _, url, session = sim
    events = await stream(session, url, seed=7)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    ids = {c["id"] for c in chunks}
    assert len(ids) == 1 and ids.pop().startswith("chatcmpl-")
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == "sim-chat"
        assert isinstance(c["created"], int)
        assert [ch["index"] for ch in c["choices"]] == [0]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    expected = build_text("sim-chat", MESSAGES, 7)
    assert content_chunks(events) == expected
    assert 150 <= len(expected) <= 450  # ~150-400 by design
    assert all(1 <= len(tok.lstrip(" ")) <= 6 for tok in expected if tok.strip())
    text = content_of(events)
    assert text.startswith("## ")
    assert "How do server-sent events work in a <b>browser</b>?" in text  # quoted, not escaped
    assert "\n- " in text and "```" in text


async def test_same_request_same_text_other_seed_other_text(sim: Any) -> None:
    _, url, session = sim
    first = content_of(await stream(session, url, seed=1))
    again = content_of(await stream(session, url, seed=1))
    other = content_of(await stream(session, url, seed=2))
    assert first == again
    assert first != other
    assert other == "".join(build_text("sim-chat", MESSAGES, 2))


async def test_max_tokens_truncates_to_a_prefix_with_finish_length(sim: Any) -> None:
    _, url, session = sim
    full = build_text("sim-chat", MESSAGES, 3)
    for field in ("max_tokens", "max_completion_tokens"):
        events = await stream(session, url, seed=3, **{field: 9})
        assert content_chunks(events) == full[:9]
        assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert build_text("sim-chat", MESSAGES, 3, 9) == full[:9]


async def test_include_usage_adds_a_final_usage_chunk(sim: Any) -> None:
    _, url, session = sim
    events = await stream(session, url, stream_options={"include_usage": True}, max_tokens=12)
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert usage["completion_tokens"] == 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + 12
    assert all(e["usage"] is None for e in events[:-2])
    plain = await stream(session, url, max_tokens=12)
    assert all("usage" not in e for e in plain[:-1])


async def test_non_streaming_returns_a_chat_completion(sim: Any) -> None:
    app, url, session = sim
    body = {"model": "sim-chat", "messages": MESSAGES, "seed": 4}
    status, headers, raw = await post(session, url, body)
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    data = orjson.loads(raw)
    assert data["object"] == "chat.completion"
    choice = data["choices"][0]
    assert choice["message"]["role"] == "assistant"
    expected = build_text("sim-chat", MESSAGES, 4)
    assert choice["message"]["content"] == "".join(expected)
    assert choice["finish_reason"] == "stop"
    assert data["usage"]["completion_tokens"] == len(expected)
    assert app.stats.completed == 1


async def test_reasoner_sends_all_reasoning_before_content(sim: Any) -> None:
    _, url, session = sim
    events = await stream(session, url, model="sim-reasoner")
    kinds = [
        "r" if "reasoning_content" in e["choices"][0]["delta"] else "c"
        for e in events[1:-2]
    ]
    assert kinds.count("r") > 50 and kinds.count("c") > 50
    assert kinds == sorted(kinds, reverse=True)  # every "r" before every "c"
    reasoning = "".join(
        e["choices"][0]["delta"].get("reasoning_content", "") for e in events[1:-1]
    )
    assert reasoning == "".join(build_reasoning("sim-reasoner", MESSAGES))
    assert content_of(events) == "".join(build_text("sim-reasoner", MESSAGES))


async def test_think_model_puts_a_think_block_first(sim: Any) -> None:
    _, url, session = sim
    text = content_of(await stream(session, url, model="sim-think"))
    assert text.startswith("<think>\n")
    thoughts, answer = text.split("</think>", 1)
    assert len(thoughts) > 100
    assert answer.lstrip().startswith("## ")
    assert text == "".join(build_text("sim-think", MESSAGES))


async def test_tools_model_streams_two_parallel_calls(sim: Any) -> None:
    _, url, session = sim
    tools = [{"type": "function", "function": {
        "name": "lookup", "parameters": {"type": "object", "properties": {"city": {}}}}}]
    events = await stream(session, url, model="sim-tools", tools=tools)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"
    calls: dict[int, dict[str, Any]] = {}
    for e in events[1:-2]:
        delta = e["choices"][0]["delta"]
        assert set(delta) == {"tool_calls"}
        (frag,) = delta["tool_calls"]
        if frag["index"] not in calls:
            assert frag["id"].startswith("call_") and frag["function"]["name"] == "lookup"
            calls[frag["index"]] = {"id": frag["id"], "arguments": ""}
        else:
            assert "id" not in frag
        calls[frag["index"]]["arguments"] += frag["function"]["arguments"]
    assert sorted(calls) == [0, 1]
    expected = build_tool_calls("sim-tools", MESSAGES, None, tools)
    for index, (call_id, _, args) in enumerate(expected):
        assert calls[index] == {"id": call_id, "arguments": args}
        assert set(orjson.loads(args)) == {"city"}
    # Once the tool answered, the model replies with text.
    follow_up = [*MESSAGES, {"role": "tool", "tool_call_id": "x", "content": "sunny"}]
    assert content_of(await stream(session, url, model="sim-tools", messages=follow_up))


async def test_flaky_model_429_then_success(sim: Any) -> None:
    app, url, session = sim
    body = {"model": "sim-flaky", "messages": MESSAGES, "stream": True}
    status, headers, raw = await post(session, url, body)
    assert status == 429
    assert headers["Retry-After"] == "1"
    error = orjson.loads(raw)["error"]
    assert error["code"] == "rate_limit_exceeded" and error["message"] and error["type"]
    status, _, raw = await post(session, url, body)
    assert status == 200
    assert events_of(raw)[-1] == "[DONE]"
    other = {**body, "messages": [{"role": "user", "content": "another prompt"}]}
    assert (await post(session, url, other))[0] == 429  # the counter is per prompt
    assert app.stats.rejected == 2 and app.stats.completed == 1


async def test_drop_model_cuts_the_body_without_done(sim: Any) -> None:
    app, url, session = sim
    body = {"model": "sim-drop", "messages": MESSAGES, "stream": True}
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async with session.post(url + "/chat/completions", json=body) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_any():
                received += chunk
    assert b"[DONE]" not in received
    assert b'"finish_reason":"stop"' not in received
    events = events_of(received[: received.rindex(b"\n\n") + 2])
    assert content_chunks(events) == build_text("sim-drop", MESSAGES)[:20]
    assert app.stats.faults == 1 and app.stats.completed == 0


async def test_client_disconnect_is_detected_and_generation_stops(sim: Any) -> None:
    app, url, session = sim
    body = {"model": "sim-chat", "messages": MESSAGES, "stream": True,
            "sim": {"tokens_per_s": 20}}  # ~15 s of answer: it cannot finish first
    async with session.post(url + "/chat/completions", json=body) as resp:
        events = await read_events(resp, 3)
        assert app.stats.active == 1
        resp.close()
    await asyncio.wait_for(app.wait_disconnected(1), WAIT)
    assert len(events) >= 3
    assert app.stats.active == 0
    assert app.stats.completed == 0


async def test_stall_model_goes_silent_until_the_client_leaves(sim: Any) -> None:
    app, url, session = sim
    body = {"model": "sim-stall", "messages": MESSAGES, "stream": True}
    async with session.post(url + "/chat/completions", json=body) as resp:
        events = await read_events(resp, 11)  # role chunk + 10 tokens
        assert content_chunks(events) == build_text("sim-stall", MESSAGES)[:10]
        with pytest.raises(TimeoutError):  # and then nothing at all
            await asyncio.wait_for(resp.content.readany(), 0.2)
        resp.close()
    await asyncio.wait_for(app.wait_disconnected(1), WAIT)
    assert app.stats.active == 0 and app.stats.faults == 1


async def test_bad_requests_get_openai_style_errors(sim: Any) -> None:
    app, url, session = sim
    cases: list[tuple[Any, int, str | None]] = [
        (b"{not json", 400, None),
        ({"model": "sim-chat"}, 400, None),
        ({"model": "sim-chat", "messages": []}, 400, None),
        ({"messages": MESSAGES}, 400, None),
        ({"model": "gpt-nope", "messages": MESSAGES}, 404, "model_not_found"),
        ({"model": "sim-chat", "messages": MESSAGES, "max_tokens": 0}, 400, None),
        ({"model": "sim-chat", "messages": MESSAGES, "sim": {"tokens": -1}}, 400, None),
    ]
    for body, code, error_code in cases:
        kw = {"data": body} if isinstance(body, bytes) else {"json": body}
        async with session.post(url + "/chat/completions", **kw) as resp:
            assert resp.status == code, body
            error = (await resp.json())["error"]
        assert set(error) >= {"message", "type", "code"}
        assert error["message"] and error["type"] == "invalid_request_error"
        if error_code:
            assert error["code"] == error_code
    async with session.get(url + "/nowhere") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "unknown_url"
    assert app.stats.requests == len(cases) and app.stats.rejected == len(cases)


async def test_api_key_is_required_when_configured() -> None:
    app = create_simulator(SimulatorConfig(speed=50.0, first_token_delay_scale=0.0,
                                           api_key="sk-sim-secret"))
    body = {"model": "sim-fast", "messages": MESSAGES, "stream": True,
            "stream_options": {"include_usage": True}}
    async with running_asgi(app) as url, aiohttp.ClientSession() as session:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, _, raw = await post(session, url + "/v1", body, headers=headers)
            assert status == 401
            assert orjson.loads(raw)["error"]["code"] == "invalid_api_key"
        async with session.get(url + "/v1/models") as resp:
            assert resp.status == 401
        good = {"Authorization": "Bearer sk-sim-secret"}
        status, _, raw = await post(session, url + "/v1", body, headers=good)
        assert status == 200 and events_of(raw)[-1] == "[DONE]"
    assert app.last_request_headers["authorization"] == "Bearer sk-sim-secret"
    assert app.last_request_body is not None
    assert app.last_request_body["stream_options"] == {"include_usage": True}


async def test_sim_field_overrides_length_and_fast_model_batches_writes(sim: Any) -> None:
    _, url, session = sim
    events = await stream(session, url, model="sim-fast", sim={"tokens": 3000})
    assert content_chunks(events) == build_text("sim-fast", MESSAGES, length=3000)
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


async def test_fast_model_writes_many_chunks_per_send() -> None:
    """Checked at the ASGI boundary: the write pattern is the feature here."""
    app = create_simulator(FAST)
    request = orjson.dumps({"model": "sim-fast", "messages": MESSAGES, "stream": True,
                            "sim": {"tokens": 2000}})
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await inbox.put({"type": "http.request", "body": request, "more_body": False})
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    await app(scope, inbox.get, send)
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body"]
    assert not sent[-1]["more_body"]
    assert len(bodies) < 2000 / 20  # dozens of chunks per send
    assert max(len(b) for b in bodies) <= 17 * 1024
    assert content_chunks(events_of(b"".join(bodies))) == build_text(
        "sim-fast", MESSAGES, length=2000)


async def test_wait_for_resolves_on_the_counter_and_not_before(sim: Any) -> None:
    app, url, session = sim
    waiter = asyncio.create_task(app.wait_completed(2))
    await stream(session, url, model="sim-fast")
    await asyncio.sleep(0)
    assert not waiter.done()
    await stream(session, url, model="sim-fast")
    await asyncio.wait_for(waiter, WAIT)
    assert app.stats.completed == 2 and app.stats.requests == 2


async def test_official_openai_sdk_reads_streams_tools_and_completions(sim: Any) -> None:
    import openai

    _, url, _ = sim
    async with openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0) as client:
        text, usage = "", None
        stream = await client.chat.completions.create(
            model="sim-chat", messages=MESSAGES, stream=True, seed=5,  # type: ignore[arg-type]
            stream_options={"include_usage": True}, extra_body={"sim": {"tokens": 40}},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            usage = chunk.usage or usage
        assert text == "".join(build_text("sim-chat", MESSAGES, 5, length=40))
        assert usage is not None and usage.completion_tokens == 40

        arguments: dict[int, str] = {}
        stream = await client.chat.completions.create(
            model="sim-tools", messages=MESSAGES, stream=True,  # type: ignore[arg-type]
        )
        async for chunk in stream:
            for call in chunk.choices[0].delta.tool_calls or () if chunk.choices else ():
                assert call.function is not None
                arguments[call.index] = arguments.get(call.index, "") + (
                    call.function.arguments or "")
        assert [orjson.loads(a) for a in arguments.values()] == [
            orjson.loads(args) for _, _, args in build_tool_calls("sim-tools", MESSAGES)]

        done = await client.chat.completions.create(
            model="sim-reasoner", messages=MESSAGES, max_tokens=5,  # type: ignore[arg-type]
        )
        assert done.choices[0].message.content == "".join(
            build_text("sim-reasoner", MESSAGES, None, 5))
        assert done.choices[0].finish_reason == "length"

        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(
                model="nope", messages=MESSAGES)  # type: ignore[arg-type]


async def test_non_streaming_disconnect_is_detected(sim: Any) -> None:
    app, url, session = sim
    body = {"model": "sim-chat", "messages": MESSAGES, "sim": {"tokens_per_s": 1}}
    request = asyncio.create_task(post(session, url, body))
    await asyncio.wait_for(app.wait_for("active", 1), WAIT)
    request.cancel()  # the client gives up while the answer is "being generated"
    with pytest.raises(asyncio.CancelledError):
        await request
    await asyncio.wait_for(app.wait_disconnected(1), WAIT)
    assert app.stats.completed == 0 and app.stats.active == 0


async def test_stop_string_ends_the_text_before_it_with_finish_stop(sim: Any) -> None:
    _, url, session = sim
    full = "".join(build_text("sim-chat", MESSAGES, 4))
    stop = full[40:46]
    for value in (stop, [stop]):
        events = await stream(session, url, seed=4, stop=value)
        text = content_of(events)
        assert text == full[: full.find(stop)]
        assert len(text) <= 40
        assert stop not in text
        assert events[-2]["choices"][0]["finish_reason"] == "stop"
        assert events[-1] == "[DONE]"


async def test_stop_sequence_spanning_two_chunks_is_never_emitted(sim: Any) -> None:
    _, url, session = sim
    full = build_text("sim-chat", MESSAGES, 5)
    # The last character of token 10 and the first of token 11: split across two chunks.
    at = sum(map(len, full[:10])) - 1
    stop = "".join(full)[at : at + 2]
    events = await stream(session, url, seed=5, stop=["never-in-the-text", stop])
    text = content_of(events)
    expected = "".join(full)[: "".join(full).find(stop)]
    assert text == expected
    assert stop not in text


async def test_the_earliest_of_several_stops_wins_and_non_streaming_honours_it(sim: Any) -> None:
    _, url, session = sim
    full = "".join(build_text("sim-chat", MESSAGES, 6))
    late, early = full[120:125], full[30:34]
    body = {"model": "sim-chat", "messages": MESSAGES, "seed": 6, "stop": [late, early]}
    status, _, raw = await post(session, url, body)
    assert status == 200
    choice = orjson.loads(raw)["choices"][0]
    assert choice["message"]["content"] == full[: full.find(early)]
    assert choice["finish_reason"] == "stop"


async def test_a_stop_beyond_max_tokens_leaves_finish_length(sim: Any) -> None:
    _, url, session = sim
    full = build_text("sim-chat", MESSAGES, 3)
    stop = "".join(full[20:])[:5]  # only after the first 9 tokens
    assert stop not in "".join(full[:9])
    events = await stream(session, url, seed=3, max_tokens=9, stop=stop)
    assert content_chunks(events) == full[:9]
    assert events[-2]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("stop", [["a", "b", "c", "d", "e"], [""], "", [1], {"x": 1}])
async def test_bad_stop_values_are_refused_with_400(sim: Any, stop: Any) -> None:
    _, url, session = sim
    body = {"model": "sim-chat", "messages": MESSAGES, "stream": True, "stop": stop}
    status, _, raw = await post(session, url, body)
    assert status == 400
    assert orjson.loads(raw)["error"]["param"] == "stop"


# ---- issue 15: assistant prefill (continuing a cut answer) ------------------------------


@pytest.mark.parametrize("cut", [5, 40])
async def test_an_assistant_prefix_of_the_answer_is_continued_exactly(sim: Any, cut: int) -> None:
    _, url, session = sim
    full = build_text("sim-chat", MESSAGES, 4)
    prefix = "".join(full[:cut]) + full[cut][:1]  # ends inside a token
    messages = [*MESSAGES, {"role": "assistant", "content": prefix}]
    events = await stream(session, url, seed=4, messages=messages)
    assert prefix + content_of(events) == "".join(full)


async def test_a_reasoner_continuing_does_not_think_again(sim: Any) -> None:
    _, url, session = sim
    full = build_text("sim-reasoner", MESSAGES)
    messages = [*MESSAGES, {"role": "assistant", "content": "".join(full[:3])}]
    events = await stream(session, url, model="sim-reasoner", messages=messages)
    assert content_of(events) == "".join(full[3:])
    assert not any(e["choices"][0]["delta"].get("reasoning_content")
                   for e in events if isinstance(e, dict) and e["choices"])


async def test_an_assistant_message_that_is_not_a_prefix_is_a_new_turn(sim: Any) -> None:
    _, url, session = sim
    messages = [*MESSAGES, {"role": "assistant", "content": "Something else entirely."}]
    events = await stream(session, url, messages=messages)
    assert content_of(events) == "".join(build_text("sim-chat", messages))


async def test_the_tools_model_refuses_prefill_with_a_400(sim: Any) -> None:
    _, url, session = sim
    messages = [*MESSAGES, {"role": "assistant", "content": "Let me"}]
    status, _, raw = await post(session, url, {"model": "sim-tools", "messages": messages,
                                               "stream": True})
    assert status == 400
    assert orjson.loads(raw)["error"]["code"] == "unsupported_prefill"
