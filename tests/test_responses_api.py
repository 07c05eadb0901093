"""The Responses API (``/v1/responses``) with the official ``openai`` SDK, over loopback.

The gateway translates it onto the simulator's chat completions; every expected text is
computed from the simulator (``build_text``), and every raw event is validated against the
SDK's own pydantic types, so a shape the SDK would not accept fails here.
"""

from __future__ import annotations

import asyncio
from typing import Any, get_args

import httpx
import openai
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.responses import ResponseStreamEvent

from support.gateway import running_gateway, serve_app
from tokenrelay.simulator import SimulatorConfig, build_reasoning, build_text, create_simulator

QUESTION = "What is SSE?"
ASKED = [{"role": "user", "content": QUESTION}]
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]},
}
KEYS = "alice:alice-key-0123456789,bob:bob-key-0123456789"
# The SDK's event classes by their ``type`` (the union's discriminator).
EVENT_TYPES = {
    get_args(cls.model_fields["type"].annotation)[0]: cls
    for cls in get_args(get_args(ResponseStreamEvent)[0])
}


def sdk(gateway: Any, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.base_url + "/v1", api_key=key, max_retries=0)


async def raw_events(
    base_url: str, method: str, path: str, *, json: Any = None, headers: Any = None
) -> list[dict[str, Any]]:
    """The SSE events of a response as sent (id line checked against sequence_number)."""
    events = []
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as client:
        async with client.stream(method, path, json=json, headers=headers) as resp:
            assert resp.status_code == 200, await resp.aread()
            assert resp.headers["content-type"].startswith("text/event-stream")
            fields: dict[str, str] = {}
            async for line in resp.aiter_lines():
                if line == "":
                    if "data" in fields:
                        event = orjson.loads(fields["data"])
                        assert int(fields["id"]) == event["sequence_number"]
                        assert fields["event"] == event["type"]
                        events.append(event)
                    fields = {}
                elif not line.startswith(":"):
                    name, _, value = line.partition(": ")
                    fields[name] = value
    return events


def assert_valid(events: list[dict[str, Any]]) -> None:
    """Strictly increasing sequence numbers, and each event a valid SDK event type."""
    numbers = [e["sequence_number"] for e in events]
    assert numbers == sorted(set(numbers))
    for event in events:
        EVENT_TYPES[event["type"]].model_validate(event, strict=True)


def text_of(events: list[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


async def test_create_returns_the_response_object_with_the_upstream_answer(gateway, simulator):
    sim, _ = simulator
    client = sdk(gateway)
    response = await client.responses.create(
        model="sim-chat", input=QUESTION, instructions="Be brief.", temperature=0.5,
        metadata={"ticket": "42"})
    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.status == "completed"
    assert response.model == "sim-chat"
    assert response.instructions == "Be brief."
    assert response.metadata == {"ticket": "42"}
    sent = sim.last_request_body["messages"]
    assert sent == [{"role": "system", "content": "Be brief."}, *ASKED]
    assert sim.last_request_body["temperature"] == 0.5
    assert response.output_text == "".join(build_text("sim-chat", sent))
    [message] = response.output
    assert message.type == "message" and message.role == "assistant"
    assert response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens
    await client.close()


async def test_streamed_events_come_in_openais_order_and_shapes(gateway):
    events = await raw_events(gateway.base_url, "POST", "/v1/responses",
                              json={"model": "sim-reasoner", "input": QUESTION, "stream": True})
    assert_valid(events)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    types = [e["type"] for e in events]
    deltas = {"response.reasoning_summary_text.delta", "response.output_text.delta"}
    assert [t for t in types if t not in deltas] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.done", "response.reasoning_summary_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.completed",
    ]
    reasoning = "".join(e["delta"] for e in events
                        if e["type"] == "response.reasoning_summary_text.delta")
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert reasoning == "".join(build_reasoning("sim-reasoner", ASKED))
    assert text == "".join(build_text("sim-reasoner", ASKED))
    completed = events[-1]["response"]
    assert [item["type"] for item in completed["output"]] == ["reasoning", "message"]
    assert completed["output"][1]["content"][0]["text"] == text
    assert completed["output"][0]["summary"][0]["text"] == reasoning


async def test_the_sdk_streams_text(gateway):
    client = sdk(gateway)
    stream = await client.responses.create(model="sim-chat", input=QUESTION, stream=True)
    events = [event async for event in stream]
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert events[0].response.status == "in_progress"
    assert text_of(events) == "".join(build_text("sim-chat", ASKED))
    assert events[-1].response.output_text == text_of(events)
    await client.close()


async def test_the_stream_helper_assembles_text_and_function_calls(gateway):
    client = sdk(gateway)
    async with client.responses.stream(model="sim-chat", input=QUESTION) as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == final.output_text == "".join(build_text("sim-chat", ASKED))

    async with client.responses.stream(model="sim-tools", input="Weather in two cities?",
                                       tools=[WEATHER]) as stream:
        done = [e async for e in stream if e.type == "response.function_call_arguments.done"]
        final = await stream.get_final_response()
    calls = [item for item in final.output if item.type == "function_call"]
    assert len(calls) == 2 and len(done) == 2
    for call, event in zip(calls, done, strict=True):
        assert call.name == "get_weather" and call.call_id.startswith("call_")
        assert call.arguments == event.arguments
        assert set(orjson.loads(call.arguments)) == {"city"}
    await client.close()


async def test_previous_response_id_continues_with_function_call_outputs(gateway, simulator):
    sim, _ = simulator
    client = sdk(gateway)
    first = await client.responses.create(model="sim-tools", input="Weather in two cities?",
                                          tools=[WEATHER])
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 2
    second = await client.responses.create(
        model="sim-tools", previous_response_id=first.id, tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": c.call_id, "output": "sunny"}
               for c in calls])
    sent = sim.last_request_body["messages"]
    assert sent[0] == {"role": "user", "content": "Weather in two cities?"}
    assert [c["id"] for c in sent[1]["tool_calls"]] == [c.call_id for c in calls]
    assert [c["function"]["arguments"] for c in sent[1]["tool_calls"]] == [
        c.arguments for c in calls]
    assert sent[2:] == [{"role": "tool", "tool_call_id": c.call_id, "content": "sunny"}
                        for c in calls]
    assert second.previous_response_id == first.id
    listed = await client.responses.input_items.list(second.id, order="asc")
    assert [(i.type, i.call_id, i.output) for i in listed.data] == [
        ("function_call_output", c.call_id, "sunny") for c in calls]  # its own input only
    assert second.output_text == "".join(build_text("sim-tools", sent)) != ""

    third = await client.responses.create(model="sim-chat", previous_response_id=second.id,
                                          input="And tomorrow?")
    sent = sim.last_request_body["messages"]
    assert sent[-2] == {"role": "assistant", "content": second.output_text}
    assert sent[-1] == {"role": "user", "content": "And tomorrow?"}
    assert third.output_text
    with pytest.raises(openai.NotFoundError) as missing:
        await client.responses.create(model="sim-chat", previous_response_id="resp_nothing",
                                      input="hi")
    assert missing.value.body["param"] == "previous_response_id"
    await client.close()


async def test_background_stream_resumes_after_a_dropped_connection_exactly_once(gateway):
    client = sdk(gateway)
    pace = {"sim": {"tokens": 80, "tokens_per_s": 40}}
    stream = await client.responses.create(model="sim-chat", input=QUESTION, stream=True,
                                           background=True, extra_body=pace)
    before = []
    async for event in stream:
        before.append(event)
        if event.type == "response.output_text.delta" and len(before) >= 8:
            break
    await stream.close()  # the connection drops mid-answer
    response_id, last_seen = before[0].response.id, before[-1].sequence_number
    assert before[0].response.background is True
    assert before[0].response.status == "queued"

    resumed = await client.responses.retrieve(response_id, stream=True,
                                              starting_after=last_seen)
    after = [event async for event in resumed]
    numbers = [e.sequence_number for e in before + after]
    assert numbers == list(range(len(numbers)))  # every event, once, in order
    assert after[-1].type == "response.completed"
    expected = "".join(build_text("sim-chat", ASKED, length=80))
    assert text_of(before + after) == expected

    # The full replay is the same events with the same numbers, and GET agrees.
    replay = await client.responses.retrieve(response_id, stream=True)
    assert [e.model_dump() for e in [event async for event in replay]] == [
        e.model_dump() for e in before + after]
    got = await client.responses.retrieve(response_id)
    assert got.status == "completed" and got.output_text == expected

    # Last-Event-ID works like starting_after.
    raw = await raw_events(gateway.base_url, "GET", f"/v1/responses/{response_id}?stream=true",
                           headers={"Last-Event-ID": str(last_seen)})
    assert_valid(raw)
    assert [e["sequence_number"] for e in raw] == [e.sequence_number for e in after]
    await client.close()


async def test_background_create_returns_at_once_and_retrieve_reports_progress(gateway):
    client = sdk(gateway)
    created = await client.responses.create(
        model="sim-chat", input=QUESTION, background=True,
        extra_body={"sim": {"tokens": 30, "tokens_per_s": 30}})
    assert created.status in ("queued", "in_progress") and created.background is True
    follow = await client.responses.retrieve(created.id, stream=True)
    ended = [e async for e in follow][-1]
    assert ended.type == "response.completed"
    got = await client.responses.retrieve(created.id)
    assert got.status == "completed"
    assert got.output_text == "".join(build_text("sim-chat", ASKED, length=30))
    await client.close()


async def test_cancel_stops_the_upstream_and_ends_the_response_cancelled(gateway, simulator):
    sim, _ = simulator
    client = sdk(gateway)
    created = await client.responses.create(
        model="sim-chat", input=QUESTION, background=True,
        extra_body={"sim": {"tokens": 400, "tokens_per_s": 10}})
    follow = await client.responses.retrieve(created.id, stream=True)
    async for event in follow:
        if event.type == "response.output_text.delta":
            break
    cancelled = await client.responses.cancel(created.id)
    assert cancelled.status == "cancelled"
    await asyncio.wait_for(sim.wait_disconnected(1), 10)  # the upstream was hung up on
    rest = [event async for event in follow]  # the live stream ends too
    assert all(e.type != "response.completed" for e in rest)
    got = await client.responses.retrieve(created.id)
    assert got.status == "cancelled" and got.output_text  # the partial text is kept
    assert (await client.responses.cancel(created.id)).status == "cancelled"  # idempotent

    foreground = await client.responses.create(model="sim-chat", input=QUESTION)
    with pytest.raises(openai.BadRequestError):
        await client.responses.cancel(foreground.id)
    await client.close()


async def test_delete_forgets_the_response(gateway):
    client = sdk(gateway)
    response = await client.responses.create(model="sim-chat", input=QUESTION)
    assert (await client.responses.retrieve(response.id)).status == "completed"
    await client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.delete(response.id)
    await client.close()


async def test_responses_are_invisible_to_other_tenants(gateway_factory):
    async with gateway_factory(TOKENRELAY_API_KEYS=KEYS) as gw:
        alice = sdk(gw, "alice-key-0123456789")
        bob = sdk(gw, "bob-key-0123456789")
        mine = await alice.responses.create(model="sim-chat", input=QUESTION, background=True)
        for attempt in (bob.responses.retrieve(mine.id),
                        bob.responses.retrieve(mine.id, stream=True, starting_after=0),
                        bob.responses.cancel(mine.id),
                        bob.responses.delete(mine.id),
                        bob.responses.input_items.list(mine.id),
                        bob.responses.create(model="sim-chat", input="hi",
                                             previous_response_id=mine.id)):
            with pytest.raises(openai.NotFoundError) as refused:
                await attempt
            assert refused.value.body["type"] == "not_found_error"
        assert (await alice.responses.retrieve(mine.id)).id == mine.id
        await alice.close()
        await bob.close()


async def test_store_false_is_answered_but_not_kept(gateway):
    client = sdk(gateway)
    response = await client.responses.create(model="sim-chat", input=QUESTION, store=False)
    assert response.status == "completed" and response.store is False
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)
    await client.close()


async def test_max_output_tokens_ends_incomplete(gateway):
    client = sdk(gateway)
    response = await client.responses.create(model="sim-chat", input=QUESTION,
                                             max_output_tokens=5)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "".join(build_text("sim-chat", ASKED, max_tokens=5))
    await client.close()


async def test_input_items_and_fields_reach_the_upstream_translated(gateway, simulator):
    sim, _ = simulator
    client = sdk(gateway)
    response = await client.responses.create(
        model="sim-chat",
        input=[
            {"role": "developer", "content": "Answer in French."},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "Hello"}]},
            {"type": "message", "role": "assistant",
             "content": [{"type": "output_text", "text": "Bonjour"}]},
            {"role": "user", "content": "Again"},
        ],
        tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=7, top_p=0.9, reasoning={"effort": "low"}, store=True,
        text={"format": {"type": "json_object"}}, extra_body={"top_k": 40})
    body = sim.last_request_body
    assert body["messages"] == [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "Again"},
    ]
    assert body["tools"] == [{"type": "function", "function": {
        k: WEATHER[k] for k in ("name", "description", "parameters")}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["max_tokens"] == 7 and body["top_p"] == 0.9
    assert body["response_format"] == {"type": "json_object"}
    assert body["top_k"] == 40  # a field tokenrelay does not know passes through
    # The input as items again, newest first by default, one page at a time.
    listed = [item async for item in client.responses.input_items.list(response.id, limit=1)]
    assert [(i.role, i.content[0].text) for i in listed] == [
        ("user", "Again"), ("assistant", "Bonjour"), ("user", "Hello"),
        ("system", "Answer in French.")]
    assert len({i.id for i in listed}) == 4
    assert body["reasoning_effort"] == "low"
    assert "reasoning" not in body and "max_output_tokens" not in body and "store" not in body
    await client.close()


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": "sim-chat"}, 400, "input"),
        ({"model": "sim-chat", "input": [{"type": "computer_call_output"}]}, 400,
         "input[0].type"),
        ({"model": "sim-chat", "input": "hi", "tools": [{"type": "web_search"}]}, 400,
         "tools[0]"),
        ({"model": "sim-chat", "input": "hi", "background": True, "store": False}, 400,
         "store"),
        ({"model": "sim-chat", "input": "hi", "max_output_tokens": 0}, 400,
         "max_output_tokens"),
        ({"model": "sim-chat", "input": "hi", "conversation": "conv_1"}, 400, "conversation"),
        ({"model": "sim-chat", "input": "hi", "stream": "yes"}, 400, "stream"),
        ({"model": "sim-chat", "input": "hi", "messages": []}, 400, "messages"),
        ({"model": "sim-chat", "input": "hi", "max_tokens": 10**9}, 400, "max_tokens"),
    ],
)
async def test_bad_requests_get_openai_shaped_errors_before_any_upstream_call(
    gateway, simulator, body, status, param
):
    sim, _ = simulator
    async with httpx.AsyncClient(base_url=gateway.base_url) as client:
        resp = await client.post("/v1/responses", json=body)
    assert resp.status_code == status
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"]
    assert error["type"] == "invalid_request_error"
    assert sim.stats.requests == 0


async def test_a_model_the_upstream_does_not_know_is_a_not_found_error(gateway):
    client = sdk(gateway)
    with pytest.raises(openai.NotFoundError) as refused:
        await client.responses.create(model="no-such-model", input=QUESTION)
    assert refused.value.body["type"] == "not_found_error"
    with pytest.raises(openai.NotFoundError):  # streaming too: a real status, not in-band
        await client.responses.create(model="no-such-model", input=QUESTION, stream=True)
    await client.close()


async def test_an_upstream_failure_mid_answer_ends_with_error_and_response_failed(gateway):
    events = await raw_events(gateway.base_url, "POST", "/v1/responses",
                              json={"model": "sim-drop", "input": QUESTION, "stream": True})
    assert_valid(events)
    assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
    failed = events[-1]["response"]
    assert events[-2]["code"] == "upstream_incomplete" and events[-2]["message"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    partial = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert partial and failed["output"][0]["content"][0]["text"] == partial
    assert failed["output"][0]["status"] == "incomplete"


async def test_item_references_resolve_to_earlier_output_items(gateway, simulator):
    sim, _ = simulator
    client = sdk(gateway)
    first = await client.responses.create(model="sim-chat", input=QUESTION)
    await client.responses.create(model="sim-chat", input=[
        {"role": "user", "content": QUESTION},
        {"type": "item_reference", "id": first.output[0].id},
        {"role": "user", "content": "And tomorrow?"},
    ])
    assert sim.last_request_body["messages"] == [
        *ASKED, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And tomorrow?"}]
    for unknown in ("msg_nothing_0", first.output[0].id[:-1] + "7", "nonsense"):
        with pytest.raises(openai.NotFoundError) as missing:
            await client.responses.create(model="sim-chat", input=[
                {"type": "item_reference", "id": unknown}])
        assert missing.value.body["param"] == "input[0].id"
    await client.close()


async def test_a_dropped_foreground_stream_cancels_the_upstream(gateway, simulator):
    sim, _ = simulator
    client = sdk(gateway)
    stream = await client.responses.create(
        model="sim-chat", input=QUESTION, stream=True,
        extra_body={"sim": {"tokens": 400, "tokens_per_s": 20}})
    async for event in stream:
        if event.type == "response.created":
            response_id = event.response.id
        if event.type == "response.output_text.delta":
            break
    await stream.close()
    await asyncio.wait_for(sim.wait_disconnected(1), 10)  # no grace: nobody resumes it
    replay = await client.responses.retrieve(response_id, stream=True)
    assert "response.completed" not in [e.type async for e in replay]  # read to its end
    got = await client.responses.retrieve(response_id)
    assert got.status == "cancelled"
    await client.close()


async def test_a_chain_of_previous_responses_cannot_outgrow_a_request_body(gateway_factory):
    async with gateway_factory(TOKENRELAY_MAX_BODY_BYTES="3000") as gw:
        client = sdk(gw)
        previous = None
        with pytest.raises(openai.BadRequestError) as refused:
            for _ in range(20):
                previous = (await client.responses.create(
                    model="sim-chat", input=QUESTION, previous_response_id=previous,
                    extra_body={"sim": {"tokens": 40}})).id
        assert refused.value.body["code"] == "conversation_too_long"
        assert previous is not None  # the first turns were answered
        await client.close()


# -- fuzz: whatever the body, a 4xx with OpenAI's error shape or an answer, never a 5xx ---

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                  max_size=4),
    max_leaves=12,
)
_items = st.sampled_from([
    {"role": "user", "content": "hi"},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a"}]},
    {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
    {"type": "function_call_output", "call_id": "c", "output": "ok"},
    {"type": "item_reference", "id": "msg_x_0"},
    {"type": "reasoning", "summary": []},
])
_valid = st.fixed_dictionaries({"model": st.just("sim-fast"), "input": st.lists(_items,
                                                                                 min_size=1)})
_fields = st.sampled_from(["input", "instructions", "tools", "tool_choice", "text",
                           "reasoning", "max_output_tokens", "metadata", "store", "background",
                           "previous_response_id", "temperature", "model", "conversation"])


def _set(body: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    return {**body, key: value}


def _set_in_item(body: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    return {**body, "input": [{**body["input"][0], key: value}, *body["input"][1:]]}


_bodies = st.one_of(
    _valid, st.builds(_set, _valid, _fields, _json),
    st.builds(_set_in_item, _valid, st.sampled_from(["type", "role", "content", "call_id",
                                                     "output", "arguments", "id"]), _json),
    _json,
)


@pytest.fixture
async def fuzz_gateway():
    sim = create_simulator(SimulatorConfig(speed=1000, first_token_delay_scale=0))
    async with serve_app(sim, lifespan="off") as url, running_gateway(
        TOKENRELAY_UPSTREAM_URL=url + "/v1", TOKENRELAY_DATABASE_URL="none",
        TOKENRELAY_RETRY_MAX_ATTEMPTS="1",
    ) as gw, httpx.AsyncClient(base_url=gw.base_url, timeout=30) as client:
        yield client


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=_bodies)
async def test_fuzzed_responses_bodies_never_get_a_5xx(fuzz_gateway, body):
    resp = await fuzz_gateway.post("/v1/responses", json=body)
    assert resp.status_code < 500, resp.text
    data = resp.json()
    if resp.status_code >= 400:
        assert set(data["error"]) >= {"message", "type", "param", "code"}
    else:
        assert data["object"] == "response" and data["status"] in (
            "completed", "incomplete", "in_progress", "queued")


async def test_the_model_reported_is_the_one_that_answered_after_a_fallback(
    simulator, tmp_path, refused_port
):
    _, url = simulator
    config = tmp_path / "tokenrelay.toml"
    config.write_text(f"""
[providers.dead]
base_url = "http://127.0.0.1:{refused_port}/v1"
retry = {{ max_attempts = 1 }}

[providers.sim]
base_url = "{url}"

[models.primary]
provider = "dead"
fallbacks = ["backup"]

[models.backup]
provider = "sim"
upstream_model = "sim-chat"
""", encoding="utf-8")
    async with running_gateway(TOKENRELAY_CONFIG=str(config)) as gw:
        client = sdk(gw)
        response = await client.responses.create(model="primary", input=QUESTION)
        assert response.model == "backup"
        assert response.output_text == "".join(build_text("sim-chat", ASKED))
        events = [e async for e in await client.responses.create(
            model="primary", input=QUESTION, stream=True)]
        assert events[-1].type == "response.completed"
        assert events[-1].response.model == "backup"
        await client.close()


async def test_heartbeats_between_events_do_not_break_the_sdk(gateway_factory):
    """openai-python dispatches an empty event at a comment's blank line once any event had
    an ``id:`` (it keeps the last id, as the spec says, but then forgets that an event needs
    data): so a Responses heartbeat is a comment line with no blank line after it."""
    pace = {"sim": {"tokens": 6, "tokens_per_s": 5}}  # 200 ms between tokens
    async with gateway_factory(TOKENRELAY_HEARTBEAT_S="0.05") as gw:
        client = sdk(gw)
        stream = await client.responses.create(model="sim-chat", input=QUESTION, stream=True,
                                               background=True, extra_body=pace)
        events = [event async for event in stream]
        assert events[-1].type == "response.completed"
        expected = "".join(build_text("sim-chat", ASKED, length=6))
        assert text_of(events) == expected
        # The heartbeats were there: the same stream, as bytes, live from its start.
        async with httpx.AsyncClient(base_url=gw.base_url, timeout=60) as http:
            created = await client.responses.create(
                model="sim-chat", input=QUESTION, background=True, extra_body=pace)
            async with http.stream("GET", f"/v1/responses/{created.id}?stream=true") as resp:
                body = await resp.aread()
        assert b": heartbeat" in body.split(b"response.output_text.delta", 1)[1]
        replay = await client.responses.retrieve(created.id, stream=True)
        assert text_of([event async for event in replay]) == expected
        await client.close()
