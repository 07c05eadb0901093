"""OpenAI API parity on ``/v1`` (issue 13, part 1), with the official ``openai`` SDK:
fields tokenrelay does not own reach the upstream unchanged, errors have OpenAI's shape
and status, a streaming call's status waits for the upstream's verdict, ``model`` is the
model that answered, and ``models.retrieve`` works."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from support.client import chat_body, read_stream
from support.fault_upstream import (
    FaultUpstream,
    hang,
    in_stream_error,
    ok,
    stall_first,
    status,
)
from support.gateway import Gateway, running_gateway
from support.servers import STREAMING_PROTOCOL
from tokenrelay.simulator import build_text

MESSAGES = [{"role": "user", "content": "What is SSE?"}]
TOKENS = ["Server", "-sent", " events", "."]


def sdk(gateway: Gateway, **options: Any) -> openai.AsyncOpenAI:
    options.setdefault("api_key", "unused")
    return openai.AsyncOpenAI(base_url=gateway.base_url + "/v1", max_retries=0, **options)


@pytest.fixture
async def upstream() -> AsyncIterator[FaultUpstream]:
    async with FaultUpstream() as up:
        yield up


@pytest.fixture
async def fault_gateway(upstream: FaultUpstream) -> AsyncIterator[Gateway]:
    """A gateway whose one (passthrough) upstream is the recording fault upstream."""
    async with running_gateway(
        TOKENRELAY_UPSTREAM_URL=upstream.base_url, TOKENRELAY_DATABASE_URL="none",
        TOKENRELAY_RETRY_MAX_ATTEMPTS="2", TOKENRELAY_RETRY_BASE_DELAY_S="0.01",
        TOKENRELAY_RETRY_MAX_DELAY_S="0.02", TOKENRELAY_HEARTBEAT_S="0.2",
    ) as gw:
        yield gw


@pytest.fixture
async def table_gateway() -> AsyncIterator[Gateway]:
    """A gateway with a model table (the built-in simulator): unknown models are 404."""
    async with running_gateway(TOKENRELAY_DATABASE_URL="none") as gw:
        yield gw


# -- fields tokenrelay does not own --------------------------------------------------------

NAMED_FIELDS: dict[str, Any] = {
    "store": False,
    "service_tier": "flex",
    "prompt_cache_key": "cache-key-1",
    "verbosity": "low",
    "safety_identifier": "user-7f3a",
    "modalities": ["text"],
    "functions": [{"name": "lookup", "parameters": {"type": "object", "properties": {}}}],
    "metadata": {"team": "search"},
    "temperature": 0.3,
}
EXTRA_BODY: dict[str, Any] = {
    "top_k": 40,
    "min_p": 0.05,
    "repetition_penalty": 1.1,
    "chat_template_kwargs": {"enable_thinking": False},
    "x_vendor_option": {"nested": [1, {"deep": None}], "flag": True},
    "nullable_vendor_field": None,
}


@pytest.mark.parametrize("stream", [True, False])
async def test_named_and_extra_body_fields_reach_the_upstream_unchanged(
    fault_gateway, upstream, stream
):
    upstream.script(ok(TOKENS))
    client = sdk(fault_gateway)
    messages = [
        *MESSAGES,
        {"role": "assistant", "content": "Earlier answer", "reasoning_content": "thought"},
        {"role": "user", "content": "And WebSockets?"},
    ]
    result = await client.chat.completions.create(
        model="vendor/model-7b", messages=messages, stream=stream, n=None,
        extra_body=EXTRA_BODY, **NAMED_FIELDS,
    )
    if stream:
        text = "".join([c.choices[0].delta.content or "" async for c in result if c.choices])
    else:
        text = result.choices[0].message.content
    assert text == "".join(TOKENS)
    sent = upstream.requests[-1].json
    for key, value in {**NAMED_FIELDS, **EXTRA_BODY}.items():
        assert key in sent and sent[key] == value, key
    assert sent["messages"][1]["reasoning_content"] == "thought"  # message fields too
    assert sent["model"] == "vendor/model-7b" and sent["stream"] is True
    assert "n" not in sent  # null is the default: one choice
    await client.close()


async def test_api_chat_forwards_unknown_fields_too_but_keeps_its_own(fault_gateway, upstream):
    upstream.script(ok(TOKENS))
    body = chat_body("hi", "any-model", top_k=7, conversation_id="c-1",
                     chat_template_kwargs={"enable_thinking": True})
    async with aiohttp.ClientSession() as http:
        async with http.post(fault_gateway.base_url + "/api/chat", json=body) as r:
            assert r.status == 200
            assert (await read_stream(r)).text == "".join(TOKENS)
    sent = upstream.requests[-1].json
    assert sent["top_k"] == 7 and sent["chat_template_kwargs"] == {"enable_thinking": True}
    assert "conversation_id" not in sent  # tokenrelay's own field


async def test_n_null_is_one_choice_and_n_above_one_is_a_clear_400(table_gateway):
    client = sdk(table_gateway)
    result = await client.chat.completions.create(
        model="sim-fast", messages=MESSAGES, n=None, extra_body={"sim": {"tokens": 3}})
    assert len(result.choices) == 1 and result.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="sim-fast", messages=MESSAGES, n=2)
    assert info.value.status_code == 400
    assert (info.value.type, info.value.param, info.value.code) == (
        "invalid_request_error", "n", "invalid_parameter")
    assert "n=1" in info.value.message
    assert not table_gateway.hub.generations
    await client.close()


# -- errors in OpenAI's shape ----------------------------------------------------------------

async def test_validation_errors_name_type_param_and_code(table_gateway):
    client = sdk(table_gateway)
    cases = [
        ({"messages": []}, "messages", "invalid_messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.[0].role",
         "invalid_messages"),
        ({"max_tokens": 0}, "max_tokens", "invalid_parameter"),
        ({"temperature": "hot"}, "temperature", "invalid_parameter"),
        ({"stream_options": "yes"}, "stream_options", "invalid_parameter"),
    ]
    for fields, param, code in cases:
        kwargs = {"model": "sim-fast", "messages": MESSAGES, **fields}
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(**kwargs)
        error = info.value
        assert (error.type, error.param, error.code) == ("invalid_request_error", param, code)
        assert set(error.body) == {"message", "type", "param", "code"}
        assert error.body["message"]
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert (info.value.type, info.value.param, info.value.code) == (
        "not_found_error", "model", "model_not_found")
    with pytest.raises(openai.NotFoundError) as info:
        await client.get("/no/such/path", cast_to=object)
    assert info.value.type == "not_found_error" and info.value.code == "not_found"
    await client.close()


async def test_body_too_large_and_oversized_headers_are_openai_errors_on_v1_only():
    async with running_gateway(TOKENRELAY_DATABASE_URL="none",
                               TOKENRELAY_MAX_BODY_BYTES="2000") as gw:
        client = sdk(gw)
        with pytest.raises(openai.APIStatusError) as info:
            await client.chat.completions.create(
                model="sim-fast", messages=[{"role": "user", "content": "x" * 5000}])
        assert info.value.status_code == 413
        assert (info.value.type, info.value.code) == ("invalid_request_error", "body_too_large")
        await client.close()
        async with aiohttp.ClientSession() as http:
            big = {"X-Big": "a" * 70_000}
            async with http.get(gw.base_url + "/v1/models", headers=big) as r:
                assert r.status == 431
                error = (await r.json())["error"]
                assert set(error) == {"message", "type", "param", "code"}
                assert (error["type"], error["code"]) == ("invalid_request_error",
                                                          "headers_too_large")
            # /api keeps its documented shape.
            async with http.post(gw.base_url + "/api/chat", data=b"{",
                                 headers={"Content-Type": "application/json"}) as r:
                assert r.status == 400
                assert await r.json() == {"error": {
                    "code": "invalid_json", "message": (await r.json())["error"]["message"],
                    "retryable": False}}


async def test_auth_and_rate_limit_errors_from_middleware_and_limiter(http):
    async with running_gateway(
        TOKENRELAY_DATABASE_URL="none", TOKENRELAY_API_KEYS="alice:alice-key-0123456789",
        TOKENRELAY_RPM="1",
    ) as gw:
        stranger = sdk(gw, api_key="wrong-key-0123456789")
        with pytest.raises(openai.AuthenticationError) as info:
            await stranger.models.list()
        assert (info.value.type, info.value.code) == ("authentication_error", "unauthorized")
        assert "wrong-key" not in info.value.message
        await stranger.close()
        alice = sdk(gw, api_key="alice-key-0123456789")
        kwargs = {"model": "sim-fast", "messages": MESSAGES, "extra_body": {"sim": {"tokens": 2}}}
        await alice.chat.completions.create(**kwargs)
        with pytest.raises(openai.RateLimitError) as info:
            await alice.chat.completions.create(**kwargs)
        assert (info.value.type, info.value.code) == ("rate_limit_error", "rate_limited")
        assert info.value.body["limit"] == "requests_per_minute"
        assert int(info.value.response.headers["Retry-After"]) >= 1
        await alice.close()
        async with http.get(gw.base_url + "/api/models") as r:  # /api: its own shape
            assert r.status == 401
            assert (await r.json())["error"]["code"] == "unauthorized"
            assert "type" not in (await r.json())["error"]


# -- the status of a streaming call waits for the upstream's verdict -----------------------

REJECTION = {"error": {"message": "Unrecognized request argument supplied: top_k",
                       "type": "invalid_request_error", "param": "top_k", "code": None}}


@pytest.mark.parametrize("stream", [True, False])
async def test_a_request_the_upstream_rejects_raises_bad_request_error(
    fault_gateway, upstream, stream
):
    upstream.script(status(400, REJECTION))
    client = sdk(fault_gateway)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="strict-model", messages=MESSAGES,
                                             stream=stream, extra_body={"top_k": 40})
    error = info.value
    assert error.status_code == 400
    assert (error.type, error.param, error.code) == (
        "invalid_request_error", "top_k", "upstream_rejected")
    assert "Unrecognized request argument supplied: top_k" in error.message
    assert len(upstream.requests) == 1  # a 400 is not retried
    await client.close()


async def test_a_stream_no_route_accepts_is_a_real_5xx_or_429(fault_gateway, upstream):
    client = sdk(fault_gateway)
    kwargs = {"model": "m", "messages": MESSAGES, "stream": True}
    upstream.script(status(503))
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(**kwargs)
    assert info.value.status_code == 502 and info.value.type == "server_error"
    assert info.value.code == "upstream_error"
    assert len(upstream.requests) == 2  # retried first (TOKENRELAY_RETRY_MAX_ATTEMPTS=2)
    upstream.script(status(429, headers={"Retry-After": "0"}))
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(**kwargs)
    assert (info.value.type, info.value.code) == ("rate_limit_error", "upstream_rate_limited")
    upstream.script(status(401, {"error": {"message": "bad key", "type": "auth"}}))
    with pytest.raises(openai.InternalServerError) as info:  # our key: our problem
        await client.chat.completions.create(**kwargs)
    assert info.value.status_code == 502
    await client.close()


async def test_a_retried_stream_answers_200_once_a_route_accepts(fault_gateway, upstream):
    upstream.script(status(500), ok(TOKENS))
    client = sdk(fault_gateway)
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "".join(TOKENS) and len(upstream.requests) == 2
    await client.close()


async def test_once_accepted_heartbeats_carry_the_stream_while_the_model_thinks(
    fault_gateway, upstream, http
):
    upstream.script(stall_first(None))  # 200 and headers, then silence
    body = {"model": "thinker", "messages": MESSAGES, "stream": True}
    async with http.post(fault_gateway.base_url + "/v1/chat/completions", json=body) as r:
        assert r.status == 200  # before any token: the upstream accepted
        assert r.headers["Content-Type"].startswith("text/event-stream")
        seen = b""
        while seen.count(b": heartbeat\n\n") < 2:
            seen += await asyncio.wait_for(r.content.readany(), 10)
        assert seen.count(b"data:") == 1 and b'"content":""' in seen  # the role chunk only


@pytest.mark.parametrize("http_protocol", [STREAMING_PROTOCOL, "httptools"])
@pytest.mark.parametrize("stream", [True, False])
async def test_a_client_leaving_before_the_verdict_cancels_the_upstream(
    upstream, http_protocol, stream
):
    # Under our protocol the disconnect arrives by callback; under plain httptools the
    # route's own task waiting in receive() notices it.
    upstream.script(hang())  # no headers at all
    async with running_gateway(
        TOKENRELAY_UPSTREAM_URL=upstream.base_url, TOKENRELAY_DATABASE_URL="none",
        server={"http": http_protocol},
    ) as gw:
        client = sdk(gw, timeout=0.5)
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(model="m", messages=MESSAGES, stream=stream)
        await asyncio.wait_for(upstream.wait_client_closed(1), 10)
        await client.close()
        for gen in list(gw.hub.generations.values()):
            await asyncio.wait_for(gen.finished.wait(), 10)
        assert not gw.hub.generations  # ended, its limiter lease freed


async def test_an_error_after_the_200_is_in_band_in_openai_shape(fault_gateway, upstream):
    upstream.script(in_stream_error(TOKENS, 2, message="model crashed"))
    client = sdk(fault_gateway)
    stream = await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
    text = ""
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert text == "".join(TOKENS[:2])  # the partial answer came first
    assert "model crashed" in info.value.message
    assert info.value.body["type"] == "server_error"
    await client.close()


# -- the model that answered ------------------------------------------------------------------

@pytest.fixture
async def fallback_gateway(upstream: FaultUpstream, tmp_path: Path) -> AsyncIterator[Gateway]:
    config = tmp_path / "tokenrelay.toml"
    config.write_text(
        f"""
[providers.big]
base_url = "{upstream.base_url}"
retry = {{ max_attempts = 1, base_delay = 0.01, max_delay = 0.02 }}

[providers.small]
base_url = "{upstream.base_url}"

[models.primary]
provider = "big"
upstream_model = "big-model"
fallbacks = ["backup"]

[models.backup]
provider = "small"
upstream_model = "small-model"
""",
        encoding="utf-8",
    )
    async with running_gateway(TOKENRELAY_CONFIG=str(config),
                               TOKENRELAY_DATABASE_URL="none") as gw:
        yield gw


async def test_chunks_and_body_name_the_fallback_model_that_answered(
    fallback_gateway, upstream
):
    client = sdk(fallback_gateway)
    upstream.script(status(503), ok(TOKENS))
    stream = await client.chat.completions.create(
        model="primary", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert len(chunks) >= 4  # role, text, finish, usage
    assert {chunk.model for chunk in chunks} == {"backup"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(
        TOKENS)
    assert [r.json["model"] for r in upstream.requests] == ["big-model", "small-model"]
    upstream.script(status(503), ok(TOKENS))
    result = await client.chat.completions.create(model="primary", messages=MESSAGES)
    assert result.model == "backup" and result.choices[0].message.content == "".join(TOKENS)
    upstream.script(ok(TOKENS))  # no fallback: the model asked for
    result = await client.chat.completions.create(model="primary", messages=MESSAGES)
    assert result.model == "primary"
    await client.close()


# -- GET /v1/models/{id} ------------------------------------------------------------------------

async def test_models_retrieve_with_a_model_table(table_gateway):
    client = sdk(table_gateway)
    model = await client.models.retrieve("sim-chat")
    assert (model.id, model.object, model.owned_by) == ("sim-chat", "model",
                                                       "tokenrelay-simulator")
    assert model.id in {m.id for m in (await client.models.list()).data}
    for unknown in ("no-such-model", "org/no-such-model"):
        with pytest.raises(openai.NotFoundError) as info:
            await client.models.retrieve(unknown)
        assert (info.value.type, info.value.param, info.value.code) == (
            "not_found_error", "model", "model_not_found")
    await client.close()


async def test_models_retrieve_through_a_passthrough_upstream(gateway):
    client = sdk(gateway)  # every name goes to the simulator, which lists its models
    assert (await client.models.retrieve("sim-reasoner")).id == "sim-reasoner"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("not-listed-upstream")
    await client.close()


async def test_models_retrieve_hides_models_outside_allowed_models():
    async with running_gateway(TOKENRELAY_DATABASE_URL="none",
                               TOKENRELAY_ALLOWED_MODELS="sim-chat") as gw:
        client = sdk(gw)
        assert (await client.models.retrieve("sim-chat")).id == "sim-chat"
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("sim-fast")
        await client.close()


async def test_simulator_text_is_unchanged_through_the_sdk(table_gateway):
    client = sdk(table_gateway)
    result = await client.chat.completions.create(model="sim-chat", messages=MESSAGES,
                                                  max_tokens=5)
    assert result.choices[0].message.content == "".join(
        build_text("sim-chat", MESSAGES, max_tokens=5))
    assert result.model == "sim-chat"
    await client.close()


async def test_the_providers_param_and_message_are_redacted_of_keys(upstream):
    secret = "sk-upstream-secret-0123456789"
    upstream.script(status(400, {"error": {"message": f"key {secret} may not use top_k",
                                           "type": "invalid_request_error", "param": secret}}))
    async with running_gateway(
        TOKENRELAY_UPSTREAM_URL=upstream.base_url, TOKENRELAY_UPSTREAM_API_KEY=secret,
        TOKENRELAY_DATABASE_URL="none",
    ) as gw:
        client = sdk(gw)
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="m", messages=MESSAGES, stream=True)
        await client.close()
    assert upstream.requests[0].headers["authorization"] == f"Bearer {secret}"
    assert secret not in str(info.value.body) and secret not in info.value.message
    assert info.value.param == "[redacted]"
