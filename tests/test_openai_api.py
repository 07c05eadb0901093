"""The official ``openai`` package pointed at tokenrelay's ``/v1``."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tokenrelay.simulator import build_text

MESSAGES = [{"role": "user", "content": "What is SSE?"}]


def sdk(gateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.base_url + "/v1", api_key="unused", max_retries=0)


async def test_streaming_with_the_sdk(gateway):
    client = sdk(gateway)
    stream = await client.chat.completions.create(
        model="sim-chat", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    text, finish, usage = "", None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == "".join(build_text("sim-chat", MESSAGES))
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens > 0
    await client.close()


async def test_non_streaming_with_the_sdk(gateway):
    client = sdk(gateway)
    result = await client.chat.completions.create(model="sim-chat", messages=MESSAGES,
                                                  max_tokens=12)
    tokens = build_text("sim-chat", MESSAGES, max_tokens=12)
    assert result.choices[0].message.content == "".join(tokens)
    assert result.choices[0].finish_reason == "length"
    assert result.usage.completion_tokens == 12
    await client.close()


async def test_tool_calls_and_reasoning_through_the_sdk(gateway):
    client = sdk(gateway)
    stream = await client.chat.completions.create(model="sim-tools", messages=MESSAGES,
                                                  stream=True)
    calls: dict[int, dict[str, str]] = {}
    async for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
                if call.function.name:
                    entry["name"] = call.function.name
                entry["arguments"] += call.function.arguments or ""
    assert len(calls) == 2
    assert all(c["name"] and c["arguments"].startswith("{") for c in calls.values())
    result = await client.chat.completions.create(model="sim-reasoner", messages=MESSAGES)
    assert result.choices[0].message.content
    assert result.choices[0].message.model_extra.get("reasoning_content")
    await client.close()


async def test_models_and_errors_through_the_sdk(gateway, simulator):
    client = sdk(gateway)
    models = await client.models.list()
    assert models.data is not None
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="sim-chat", messages=[])
    await client.close()


async def test_disconnecting_sdk_client_cancels_the_upstream(gateway, simulator):
    sim, _ = simulator
    client = sdk(gateway)
    stream = await client.chat.completions.create(
        model="sim-chat", messages=MESSAGES, stream=True, extra_body={"sim": {"tokens_per_s": 20}}
    )
    async for _chunk in stream:
        break
    await stream.close()
    await asyncio.wait_for(sim.wait_disconnected(1), 10)
    await client.close()
